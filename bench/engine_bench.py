"""Benchmark the transformers engine against transformers' own ways of serving a batch.

Run by hand (it takes a few minutes on a 2-core CPU):

    .venv/bin/python bench/engine_bench.py --data-dir ~/.tokenyard [--max-tokens 128] [--threads 0]

Measures, in one run and on the same model and prompts:
- the engine with 1, 4 and 16 concurrent streams (aggregate completion tokens/s, TTFT);
- (a) the same requests one at a time through the engine;
- (b) transformers' padded `generate` on the same batch;
- (c) transformers' built-in continuous batching (`generate_batch`);
- a closed loop of 16 streams where each finished request is replaced by a new one of a
  different length (requests join and leave mid-flight all the time);
- time to first token of a new request while 15 others are decoding.
Greedy decoding everywhere. Only real tokens count (up to and including end-of-sequence).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from schemas.events import Piece
from worker.backend import Usage  # noqa: E402
from worker.engine import TransformersBackend  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.smollm import MODEL_ID  # noqa: E402

TOPICS = [
    "the ocean",
    "volcanoes",
    "the history of bread",
    "honeybees",
    "the moon landing",
    "trains",
    "coffee",
    "the Roman empire",
    "rain forests",
    "chess",
    "jazz music",
    "glaciers",
    "the printing press",
    "octopuses",
    "deserts",
    "bicycles",
    "tea",
    "comets",
    "lighthouses",
    "the violin",
]


def prompt(i: int) -> str:
    return f"Write a long, detailed essay about {TOPICS[i % len(TOPICS)]}."


@dataclass
class Run:
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


async def one(backend: TransformersBackend, i: int, max_tokens: int) -> tuple[int, float]:
    req = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": prompt(i)}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    start, ttft, tokens = time.perf_counter(), -1.0, 0
    async for item in backend.generate(MODEL_ID, req):
        if isinstance(item, Piece) and ttft < 0:
            ttft = time.perf_counter() - start
        if isinstance(item, Usage):
            tokens = item.completion_tokens
    return tokens, ttft


async def concurrent(backend: TransformersBackend, streams: int, max_tokens: int) -> Run:
    start = time.perf_counter()
    results = await asyncio.gather(*(one(backend, i, max_tokens) for i in range(streams)))
    return Run(sum(r[0] for r in results), time.perf_counter() - start, [r[1] for r in results])


async def sequential(backend: TransformersBackend, count: int, max_tokens: int) -> Run:
    start, tokens, ttfts = time.perf_counter(), 0, []
    for i in range(count):
        n, ttft = await one(backend, i, max_tokens)
        tokens += n
        ttfts.append(ttft)
    return Run(tokens, time.perf_counter() - start, ttfts)


async def closed_loop(
    backend: TransformersBackend,
    streams: int,
    seconds: float,
    warm: float,
    max_tokens: int,
    *,
    mixed: bool,
    stagger: float = 0.0,
) -> Run:
    """`streams` clients, each sending its next request as soon as its last one ends; request
    lengths vary, so requests join and leave the running batch at different steps. Counts the
    tokens delivered in a steady-state window after `warm` seconds."""
    start = time.perf_counter()
    window = (start + warm, start + warm + seconds)
    stamps: list[tuple[float, int]] = []
    ttfts: list[float] = []

    async def client(c: int) -> None:
        i = c
        await asyncio.sleep(stagger * c)
        while time.perf_counter() < window[1]:
            req = {
                "model": MODEL_ID,
                "messages": [{"role": "user", "content": prompt(i)}],
                "temperature": 0,
                "max_tokens": max_tokens // 4 + (i * 37) % (max_tokens * 3 // 4) if mixed else max_tokens,
            }
            sent = time.perf_counter()
            first = True
            async for item in backend.generate(MODEL_ID, req):
                if isinstance(item, Piece):
                    now = time.perf_counter()
                    stamps.append((now, item.tokens))
                    if first and window[0] <= sent:
                        ttfts.append(now - sent)
                    first = False
                if time.perf_counter() > window[1]:
                    break
            i += streams

    await asyncio.gather(*(client(c) for c in range(streams)))
    tokens = sum(n for t, n in stamps if window[0] <= t < window[1])
    return Run(tokens, seconds, ttfts)


async def ttft_under_load(backend: TransformersBackend, busy: int, probes: int) -> list[float]:
    load = [asyncio.create_task(one(backend, i, 400)) for i in range(busy)]
    await asyncio.sleep(3.0)  # all of them are decoding now
    ttfts = []
    for p in range(probes):
        _, ttft = await one(backend, 100 + p, 4)
        ttfts.append(ttft)
        await asyncio.sleep(0.3)
    for task in load:
        task.cancel()
    await asyncio.gather(*load, return_exceptions=True)
    return ttfts


def encoded(tokenizer: Any, i: int) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt(i)}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def real_tokens(ids: list[int], eos: frozenset[int], pad: int) -> int:
    for n, t in enumerate(ids):
        if t in eos:
            return n + 1
    return len([t for t in ids if t != pad]) if pad not in eos else len(ids)


def padded_generate(model: Any, tokenizer: Any, eos: frozenset[int], batch: int, max_tokens: int) -> Run:
    prompts = [encoded(tokenizer, i) for i in range(batch)]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=1.1,
            pad_token_id=pad,
        )
    seconds = time.perf_counter() - start
    return Run(sum(real_tokens(row[width:].tolist(), eos, pad) for row in out), seconds, [])


def builtin_continuous(model: Any, tokenizer: Any, batch: int, max_tokens: int) -> Run:
    from transformers import GenerationConfig

    prompts = [encoded(tokenizer, i) for i in range(batch)]
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    start = time.perf_counter()
    with torch.no_grad():  # generate_batch runs its own thread; inference tensors would break it
        results = model.generate_batch(inputs=prompts, generation_config=config)
    seconds = time.perf_counter() - start
    return Run(sum(len(r.generated_tokens) for r in results.values()), seconds, [])


def row(name: str, run: Run) -> str:
    ttft = f"{statistics.median(run.ttfts):.2f} / {max(run.ttfts):.2f}" if run.ttfts else "-"
    return f"| {name} | {run.tokens} | {run.seconds:.1f} | {run.rate:.1f} | {ttft} |"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.path.expanduser("~/.tokenyard"))
    p.add_argument("--model-path", default="")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated: streams,sequential,padded,builtin,loop,ttft")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    a = p.parse_args()
    skip = set(a.skip.split(","))
    settings = WorkerSettings.from_args(
        ["--data-dir", a.data_dir, "--model-path", a.model_path, "--threads", str(a.threads), "--slots", "16"]
    )
    backend = TransformersBackend.from_settings(settings)
    await backend.start()
    loaded = backend._loaded
    assert loaded is not None
    model, tokenizer, mt = loaded.model, loaded.tokenizer, a.max_tokens
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, max_tokens {mt}", flush=True)
    results: dict[str, Run] = {}

    def record(name: str, run: Run) -> None:
        results[name] = run
        print(row(name, run), flush=True)
        engine = backend._engine
        if engine is not None and os.environ.get("ENGINE_BENCH_STATS"):
            print(f"    {engine.stats}", flush=True)

    print("| run | tokens | seconds | tokens/s | TTFT median / max (s) |\n|---|---|---|---|---|")
    for streams in () if "streams" in skip else (1, 4, 16):
        record(f"engine, {streams} concurrent", await concurrent(backend, streams, mt))
    if "sequential" not in skip:
        record("(a) engine, one at a time (4 requests)", await sequential(backend, 4, mt))
    if "padded" not in skip:
        for batch in (1, 4, 16):
            record(f"(b) padded generate, batch {batch}", padded_generate(model, tokenizer, loaded.eos_ids, batch, mt))
    if "builtin" not in skip:
        for batch in (4, 16):
            record(f"(c) generate_batch, {batch}", builtin_continuous(model, tokenizer, batch, mt))
    if "loop" not in skip:
        record(
            f"engine, 16 clients in a closed loop, staggered starts, {mt} tokens each (steady 30 s window)",
            await closed_loop(backend, 16, 30.0, 10.0, mt, mixed=False, stagger=0.5),
        )
        record(
            f"engine, 16 clients in a closed loop, mixed lengths {mt // 4}-{mt} (steady 30 s window)",
            await closed_loop(backend, 16, 30.0, 8.0, mt, mixed=True),
        )
    if "ttft" not in skip:
        ttfts = await ttft_under_load(backend, 15, 5)
        print(
            f"\nTTFT of a new request while 15 others decode: median {statistics.median(ttfts):.2f} s, "
            f"max {max(ttfts):.2f} s ({', '.join(f'{t:.2f}' for t in ttfts)})"
        )
    await backend.close()
    if a.json:
        Path(a.json).write_text(json.dumps({k: vars(v) for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
