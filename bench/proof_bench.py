"""What proving a node's identity costs: one ed25519 signature per attempt on the worker
(`worker.identity.Signer.prove`) and one verification per request on the gateway
(`broker_api.attribution.verifies`), with the 64 bytes it adds to the attempt's first event.

    .venv/bin/python bench/proof_bench.py [--n 5000]
"""

from __future__ import annotations

import argparse
import time
import uuid

from broker_api.attribution import verifies, verify_key
from broker_api.nats_jwt import USER, Key, creds
from schemas.events import Start, claim_message
from worker.identity import Signer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    n = p.parse_args().n
    key = Key.new(USER)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".creds", delete=False) as f:
        f.write(creds("jwt", key.seed))
    signer = Signer.from_creds(f.name)
    jobs = [uuid.uuid4().hex for _ in range(n)]
    started = time.perf_counter()
    proofs = [signer.prove(j, 1001, "nd-0123456789ab") for j in jobs]
    signed = (time.perf_counter() - started) / n
    started = time.perf_counter()
    public = verify_key(key.public)  # the gateway keeps each node's decoded key
    ok = sum(verifies(public, claim_message(j, 1001, "nd-0123456789ab"), pf) for j, pf in zip(jobs, proofs))
    verified = (time.perf_counter() - started) / n
    assert ok == n
    plain = len(Start(jobs[0], 1001, 0, "nd-0123456789ab").encode())
    proven = len(Start(jobs[0], 1001, 0, "nd-0123456789ab", proofs[0]).encode())
    print(f"sign   {signed * 1e6:7.1f} us per attempt (worker)")
    print(f"verify {verified * 1e6:7.1f} us per request (gateway)")
    print(f"first event {plain} -> {proven} bytes")


if __name__ == "__main__":
    main()
