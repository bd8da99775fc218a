"""What nats-server's memory grows with as the usage stream fills: one subject per record or not.

    .venv/bin/python bench/usage_memory.py --records 200000

Starts a nats-server of its own (JetStream on disk, fsync off: only memory is measured), makes
the usage stream as `schemas.streams.USAGE` declares it, and publishes `--records` records of
the usage record's size, first each on its own subject (`ty.usage.<job id>`, as
`broker_api/accounting.py` does), then, on a fresh server, all on one subject with the job id
as `Nats-Msg-Id` only. Prints nats-server's RSS and its own memory figure (`/varz`) after each
tenth: what a retained record costs in memory, and whether that is per record or per subject.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.procs import free_port, rss_mb  # noqa: E402
from broker_api.embedded_nats import NatsServer  # noqa: E402
from schemas import streams, subjects  # noqa: E402
from schemas.jetstream import ensure  # noqa: E402

RECORD_BYTES = 450  # about a usage record's msgpack size


async def fill(tmp: Path, records: int, *, per_subject: bool) -> list[dict[str, float]]:
    monitor = free_port()
    server = NatsServer(tmp, sync_always=False, extra_config=f"http: 127.0.0.1:{monitor}").start()
    rows: list[dict[str, float]] = []
    try:
        nc = await nats.connect(server.url)
        await ensure(nc, streams.USAGE, replicas=1)
        js = nc.jetstream()
        body = b"x" * RECORD_BYTES
        step = max(1, records // 10)
        for i in range(records):
            job_id = uuid.uuid4().hex
            subject = subjects.usage_subject(job_id if per_subject else "all")
            await js.publish(subject, body, headers={"Nats-Msg-Id": job_id})
            if (i + 1) % step == 0:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as r:
                    mem = json.loads(r.read())["mem"] / 1e6
                rows.append({"records": i + 1, "rss_mb": rss_mb(server.pid), "varz_mem_mb": mem})
                print(f"# {'per subject' if per_subject else 'one subject'}: {rows[-1]}", file=sys.stderr, flush=True)
        await nc.close()
    finally:
        server.stop()
    return rows


async def main(a: argparse.Namespace) -> None:
    out = {}
    for per_subject in (True, False):
        with tempfile.TemporaryDirectory(prefix="tokenyard-usage-mem-") as tmp:
            started = time.monotonic()
            rows = await fill(Path(tmp), a.records, per_subject=per_subject)
            name = "per_subject" if per_subject else "one_subject"
            out[name] = {"rows": rows, "seconds": time.monotonic() - started}
            first, last = rows[0], rows[-1]
            per_record = (last["rss_mb"] - first["rss_mb"]) * 1e6 / max(last["records"] - first["records"], 1)
            print(f"{name}: RSS {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB, {per_record:.0f} bytes per record")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--json", type=Path)
    asyncio.run(main(p.parse_args()))
