"""Pick a constrained-decoding library by measurement: llguidance, xgrammar, outlines-core.

Run by hand (a few minutes on a 2-core CPU; SmolLM2 converted). Only llguidance is a project
dependency; install the other two for the comparison (`pip install outlines-core` and
`pip install --no-deps xgrammar apache-tvm-ffi`: xgrammar otherwise pulls triton). A library that
is not installed is skipped.

    PYTHONPATH=$PWD .venv/bin/python bench/grammar_bench.py --data-dir ~/.tokenyard [--samples 4]

For each library, on the tiny in-code test model's tokenizer (258 tokens) and SmolLM2-135M's
(49152 tokens), measures:
- tokenizer set-up (once per model);
- grammar compile time, cold, for a few realistic schemas and for "any JSON object";
- the per-token mask cost while walking a valid instance token by token, at batch 1 and 16
  (16 independent matchers, each filled in turn, as the engine's step loop does): computing the
  bitmask, and applying it to the logits;
- correctness: SmolLM2 sampling at temperature 1 under the mask, `--samples` answers per schema:
  how many finished (end of sequence before the token limit), and whether every finished
  answer parses and validates (`jsonschema`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jsonschema  # noqa: E402
import torch  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
    },
    "required": ["name", "age", "email"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
                "required": ["sku", "qty", "price"],
                "additionalProperties": False,
            },
        },
        "gift": {"type": "boolean"},
    },
    "required": ["order_id", "status", "items", "gift"],
    "additionalProperties": False,
}
TOOLS = {  # an OpenAI-style call: one of three functions with its arguments
    "anyOf": [
        {
            "type": "object",
            "properties": {
                "name": {"const": name},
                "arguments": {
                    "type": "object",
                    "properties": params,
                    "required": list(params),
                    "additionalProperties": False,
                },
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, params in (
            ("get_weather", {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}),
            ("search", {"query": {"type": "string"}, "limit": {"type": "integer"}}),
            ("send_email", {"to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}}),
        )
    ]
}
ANY_OBJECT = {"type": "object"}
SCHEMAS: dict[str, dict[str, Any]] = {"person": PERSON, "order": ORDER, "tool call": TOOLS, "json_object": ANY_OBJECT}
INSTANCES = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "order": {
        "order_id": "A-1001",
        "status": "shipped",
        "items": [{"sku": "X1", "qty": 2, "price": 9.5}, {"sku": "Y22", "qty": 1, "price": 120.0}],
        "gift": False,
    },
    "tool call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
    "json_object": {"answer": "yes", "details": {"count": 3, "tags": ["a", "b"]}},
}
PROMPTS = {
    "person": "Give me a JSON object describing a famous scientist: name, age, email.",
    "order": "Give me a JSON object for an online order with two items.",
    "tool call": "What is the weather in Paris? Answer with a function call as JSON.",
    "json_object": "Describe the planet Mars as a JSON object.",
}


# -- one adapter per library: compile(schema) -> factory of matchers ------------------------


class Matcher:
    """The common surface: fill a row of an int32 bitmask, accept a token, finished?"""

    def fill(self, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, token: int) -> None: ...


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        grammar = self._ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
        )
        first = self._ll.LLMatcher(self.tok, grammar, log_level=0)  # compiles (lexer, first mask)
        if first.is_error():
            raise RuntimeError(first.get_error())
        ll, tok = self._ll, self.tok

        class M(Matcher):
            def __init__(self) -> None:
                self.m = ll.LLMatcher(tok, grammar, log_level=0)

            def fill(self, bitmask: torch.Tensor, row: int) -> None:
                v = bitmask[row]
                self.m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * 4)

            def accept(self, token: int) -> None:
                self.m.consume_token(token)

        return M


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self._x = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        compiler = self._x.GrammarCompiler(self.info, cache_enabled=False, max_threads=1)
        if schema == ANY_OBJECT:
            compiled = compiler.compile_builtin_json_grammar()
        else:
            compiled = compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(", ", ": "), strict_mode=True
            )
        x = self._x

        class M(Matcher):
            def __init__(self) -> None:
                self.m = x.GrammarMatcher(compiled)

            def fill(self, bitmask: torch.Tensor, row: int) -> None:
                self.m.fill_next_token_bitmask(bitmask, row)

            def accept(self, token: int) -> None:
                self.m.accept_token(token)

        return M


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import outlines_core

        self._o = outlines_core
        self.eos = int(tokenizer.eos_token_id)
        decoder = _byte_decoder()
        specials = set(tokenizer.all_special_ids)
        mapping: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i in specials or i == self.eos:
                continue
            raw = bytes(decoder[c] for c in token) if all(c in decoder for c in token) else token.encode()
            mapping.setdefault(raw, []).append(i)
        self.vocab = outlines_core.Vocabulary(self.eos, mapping)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        regex = self._o.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[ ]?")
        index = self._o.Index(regex, self.vocab)
        o = self._o

        class M(Matcher):
            def __init__(self) -> None:
                self.g = o.Guide(index)

            def fill(self, bitmask: torch.Tensor, row: int) -> None:
                v = bitmask[row]
                self.g.write_mask_into(v.data_ptr(), v.numel(), 4)

            def accept(self, token: int) -> None:
                self.g.advance(token)

        return M


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: byte-level token characters to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


LIBRARIES = (LLGuidance, XGrammar, OutlinesCore)
_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    logits.masked_fill_(~allowed, float("-inf"))


# -- measurements --------------------------------------------------------------------------


def mask_cost(factory: Callable[[], Matcher], tokens: list[int], vocab: int, batch: int) -> tuple[float, float]:
    """Mean microseconds per decode step for the whole batch: (fill every row's mask, apply)."""
    matchers = [factory() for _ in range(batch)]
    words = (vocab + 31) // 32
    bitmask = torch.full((batch, words), -1, dtype=torch.int32)
    logits = torch.randn(batch, vocab)
    fills, applies = [], []
    for token in tokens:
        started = time.perf_counter()
        for row, m in enumerate(matchers):
            m.fill(bitmask, row)
        mid = time.perf_counter()
        apply_bitmask(logits, bitmask)
        done = time.perf_counter()
        for m in matchers:
            m.accept(token)
        fills.append(mid - started)
        applies.append(done - mid)
    return statistics.mean(fills) * 1e6, statistics.mean(applies) * 1e6


def generate(model: Any, prompt: list[int], factory: Callable[[], Matcher], samples: int, limit: int, eos: set[int]):
    """Sample `samples` answers at temperature 1 under the mask; their token lists and whether each finished."""
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    matchers = [factory() for _ in range(samples)]
    bitmask = torch.full((samples, (vocab + 31) // 32), -1, dtype=torch.int32)
    ids = torch.tensor([prompt] * samples)
    cache = DynamicCache()
    out_tokens: list[list[int]] = [[] for _ in range(samples)]
    finished = [False] * samples
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :].float()
        for _ in range(limit):
            for row, m in enumerate(matchers):
                m.fill(bitmask, row)
            apply_bitmask(logits, bitmask)
            probs = torch.softmax(logits, -1)
            chosen = torch.multinomial(probs, 1, generator=gen).squeeze(1).tolist()
            for row, t in enumerate(chosen):
                if finished[row]:
                    continue
                if t in eos:
                    finished[row] = True
                    continue
                matchers[row].accept(t)
                out_tokens[row].append(t)
            if all(finished):
                break
            logits = (
                model(input_ids=torch.tensor(chosen).unsqueeze(1), past_key_values=cache, use_cache=True)
                .logits[:, -1, :]
                .float()
            )
    return out_tokens, finished


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=os.path.expanduser("~/.tokenyard"))
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-generation", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_model import build
    from worker.smollm import ensure_default_model

    tiny_model, tiny_tok = build()
    path = ensure_default_model(a.data_dir)
    smol_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    smol = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    models = {"tiny": (tiny_tok, tiny_model.config.vocab_size), "SmolLM2": (smol_tok, smol.config.vocab_size)}
    rows: list[dict[str, Any]] = []
    for lib in LIBRARIES:
        for model_name, (tok, vocab) in models.items():
            started = time.perf_counter()
            try:
                adapter = lib(tok, vocab)
            except ImportError as e:
                print(json.dumps({"library": lib.name, "skipped": str(e)}), flush=True)
                break
            setup = time.perf_counter() - started
            for schema_name, schema in SCHEMAS.items():
                row: dict[str, Any] = {"library": lib.name, "model": model_name, "schema": schema_name}
                row["tokenizer_s"] = round(setup, 3)
                try:
                    started = time.perf_counter()
                    factory = adapter.compile(schema)
                    factory()
                    row["compile_ms"] = round((time.perf_counter() - started) * 1e3, 1)
                except Exception as e:  # a library that cannot take the schema is a result, not a crash
                    row["error"] = f"{type(e).__name__}: {e}"[:120]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                text = json.dumps(INSTANCES[schema_name], separators=(", ", ": "))
                tokens = tok(text, add_special_tokens=False)["input_ids"]
                for batch in (1, 16):
                    fill, apply = mask_cost(factory, tokens, vocab, batch)
                    row[f"fill_us_b{batch}"] = round(fill, 1)
                    row[f"apply_us_b{batch}"] = round(apply, 1)
                if model_name == "SmolLM2" and not a.skip_generation:
                    messages = [{"role": "user", "content": PROMPTS[schema_name]}]
                    rendered = smol_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    prompt = list(smol_tok(rendered, add_special_tokens=False)["input_ids"])
                    started = time.perf_counter()
                    outs, finished = generate(
                        smol, prompt, factory, a.samples, a.max_tokens, {int(smol_tok.eos_token_id)}
                    )
                    row["gen_s"] = round(time.perf_counter() - started, 1)
                    valid = 0
                    for out, fin in zip(outs, finished):
                        if not fin:
                            continue
                        try:
                            jsonschema.validate(json.loads(smol_tok.decode(out)), schema)
                            valid += 1
                        except (ValueError, jsonschema.ValidationError):
                            pass
                    row["finished"] = f"{sum(finished)}/{a.samples}"
                    row["valid_of_finished"] = f"{valid}/{sum(finished)}"
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
