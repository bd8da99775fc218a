"""Continuous batching: one thread owns the model and steps every running sequence together.

Each turn of the loop: drop cancelled rows; admit waiting sequences into free rows and prefill
them (in groups bounded by a token budget, chunked if a prompt is long); run one batched decode
step over all rows; hand each row's new text to its request; drop finished rows. A request that
arrives while others decode joins at the next turn; one that finishes or is cancelled leaves at
the next turn and frees its row. Rows are left-padded and share one `SlabCache`.

The thread talks to asyncio only through each sequence's `emit` callback (which the backend
makes thread-safe with `loop.call_soon_threadsafe`), so the event loop never waits on torch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog
import torch

from schemas.events import FinishReason
from worker.backend import Finish
from worker.engine_cache import SlabCache, merge, repeat, select
from worker.engine_sampling import apply_penalties, penalty_index, sample, token_logprobs
from worker.engine_text import Describe, Found, TextStream, token_logprob
from worker.grammar import Constraint, constrain
from worker.toolcalls import Output

log = structlog.get_logger(__name__)

Emit = Callable[[object], None]  # receives Piece, Finish, or the exception that ended the sequence
Choice = tuple[int, "Found | None"]  # a row's next token, and its logprobs if asked for


@dataclass(frozen=True, slots=True)
class SeqParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int = -1  # -1: none; else the sampled token's logprob and this many alternatives


class Sequence:
    """One choice of one request. `cancelled` may be set from any thread; the rest belongs to the
    engine thread once submitted. `constraint`, if any, limits which tokens may come next."""

    __slots__ = (
        "index",
        "prompt",
        "params",
        "emit",
        "text",
        "constraint",
        "generated",
        "counts",
        "cancelled",
        "done",
        "_generator",
    )

    def __init__(
        self,
        index: int,
        prompt: list[int],
        params: SeqParams,
        emit: Emit,
        text: TextStream,
        constraint: Constraint | None = None,
    ) -> None:
        self.index = index
        self.prompt = prompt
        self.params = params
        self.emit = emit
        self.text = text
        self.constraint = constraint
        self.generated: list[int] = []
        self.counts: dict[int, int] = {}  # token -> occurrences in `generated`, for penalties
        self.cancelled = False
        self.done = False
        self._generator = torch.Generator()
        if params.seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(params.seed)

    def draw(self) -> float:
        """The next U[0,1) number of this sequence's own random stream."""
        return float(torch.rand((), generator=self._generator))


@dataclass(slots=True)
class EngineStats:
    """Counters for benchmarks and logs; written by the engine thread only."""

    decode_steps: int = 0
    decode_seconds: float = 0.0
    prefill_tokens: int = 0  # padded prompt tokens run through the model
    prefill_seconds: float = 0.0
    regroup_seconds: float = 0.0  # joining and leaving: cache merges and selections


class EngineStoppedError(RuntimeError):
    """The engine shut down before the sequence finished."""


class GrammarViolationError(RuntimeError):
    """A constrained sequence's matcher refused the token sampled under its own mask (a bug in
    the constraint library or its tokenizer view, never the request's fault)."""


class BatchEngine:
    """The step loop (see the module docstring). Thread-safe methods: submit, cancel, stop."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        rows: int,
        eos_ids: Iterable[int],
        pad_id: int,
        prefill_budget: int = 2048,
        threads: int = 0,
        prefix: Iterable[int] = (),
        describe: Describe = lambda token: (str(token), b""),
    ) -> None:
        self._model = model
        self._describe = describe  # a token's text and bytes, for logprobs
        self._prefix = list(prefix)  # a prompt start many requests share (e.g. a default system prompt)
        self._prefix_cache: SlabCache | None = None  # its keys and values, computed on first use
        self._threads = threads
        self._device = next(model.parameters()).device
        self._max_rows = rows
        self._eos = frozenset(eos_ids)
        self._pad = pad_id
        self._budget = max(1, prefill_budget)
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Batch state, touched only by the engine thread.
        self._rows: list[Sequence] = []
        self._cache: SlabCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long, device=self._device)  # [rows, columns]
        self._positions = torch.zeros(0, dtype=torch.long, device=self._device)  # next position
        self._last = torch.zeros(0, dtype=torch.long, device=self._device)  # not yet in the cache
        self.stats = EngineStats()

    # -- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tokenyard-engine", daemon=True)
        self._thread.start()

    def submit(self, seqs: Iterable[Sequence]) -> None:
        with self._cond:
            if self._stopping:
                raise EngineStoppedError("the engine is shut down")
            self._waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: Iterable[Sequence]) -> None:
        with self._cond:
            for seq in seqs:
                seq.cancelled = True
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def busy_rows(self) -> int:
        return len(self._rows)

    # -- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        if self._threads > 0:  # OpenMP thread counts are per calling thread: set it here too
            torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                admit = self._next_admissions()
                if admit is None:
                    break
                try:
                    self._turn(admit)
                except Exception as e:  # a failed step fails the sequences in it, not the engine
                    log.exception("engine.step_failed", rows=len(self._rows), admitted=len(admit))
                    self._fail(self._rows + admit, e)
                    self._reset()
        with self._cond:
            left = list(self._waiting)
            self._waiting.clear()
        self._fail(self._rows + left, EngineStoppedError("the engine shut down"))
        self._reset()

    def _next_admissions(self) -> list[Sequence] | None:
        with self._cond:
            while not self._stopping and not self._waiting and not self._rows:
                self._cond.wait(timeout=1.0)
            if self._stopping:
                return None
            admit: list[Sequence] = []
            free = self._max_rows - len(self._rows)
            while self._waiting and len(admit) < free:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    admit.append(seq)
            return admit

    def _turn(self, admit: list[Sequence]) -> None:
        self._keep([i for i, s in enumerate(self._rows) if not s.cancelled])
        shared = len(self._prefix)
        if shared:
            with_prefix = [s for s in admit if len(s.prompt) > shared and s.prompt[:shared] == self._prefix]
            others = [s for s in admit if not (len(s.prompt) > shared and s.prompt[:shared] == self._prefix)]
        else:
            with_prefix, others = [], admit
        for group in self._groups(with_prefix, shared):
            self._prefill(group, shared)
        for group in self._groups(others, 0):
            self._prefill(group, 0)
        if self._rows:
            started = time.perf_counter()
            self._decode()
            self.stats.decode_steps += 1
            self.stats.decode_seconds += time.perf_counter() - started

    def _groups(self, seqs: list[Sequence], shared: int) -> list[list[Sequence]]:
        """Prefill groups whose padded size stays within the token budget (at least one each)."""
        groups: list[list[Sequence]] = []
        current: list[Sequence] = []
        longest = 0
        for seq in sorted(seqs, key=lambda s: len(s.prompt)):
            width = max(longest, len(seq.prompt) - shared)
            if current and width * (len(current) + 1) > self._budget:
                groups.append(current)
                current, width = [], len(seq.prompt) - shared
            current.append(seq)
            longest = width
        if current:
            groups.append(current)
        return groups

    def _prefill(self, group: list[Sequence], shared: int) -> None:
        """Run the group's prompts (minus a `shared` cached prefix) and join them to the batch.

        Layout per row: [shared prefix][left padding][rest of the prompt]; the mask has a hole
        where the padding is, and positions count only real tokens, so that is exact.
        """
        width = max(len(s.prompt) - shared for s in group)
        ids = torch.full((len(group), width), self._pad, dtype=torch.long)
        mask = torch.zeros(len(group), shared + width, dtype=torch.long)
        mask[:, :shared] = 1
        for row, seq in enumerate(group):
            rest = seq.prompt[shared:]
            ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[row, shared + width - len(rest) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, shared:]
        started = time.perf_counter()
        cache = repeat(self._shared_prefix(), len(group), room=width) if shared else SlabCache()
        chunk = max(1, self._budget // len(group))
        logits: torch.Tensor | None = None
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            out = self._model(
                input_ids=ids[:, start:end],
                attention_mask=mask[:, : shared + end],
                position_ids=positions[:, start:end],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            logits = out.logits[:, -1, :]
        assert logits is not None
        self.stats.prefill_tokens += ids.numel()
        self.stats.prefill_seconds += time.perf_counter() - started
        choices = self._choose(group, logits)
        finished = self._accept(group, choices)
        keep = [i for i in range(len(group)) if i not in finished]
        if not keep:
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self._device)
        if len(keep) < len(group):
            cache = select(cache, rows)
        self._join(
            [group[i] for i in keep],
            cache,
            mask.index_select(0, rows),
            torch.tensor([len(group[i].prompt) for i in keep], device=self._device),
            torch.tensor([choices[i][0] for i in keep], device=self._device),
        )

    def _shared_prefix(self) -> SlabCache:
        if self._prefix_cache is None:
            cache = SlabCache()
            ids = torch.tensor([self._prefix], dtype=torch.long, device=self._device)
            self._model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._prefix_cache = cache
        return self._prefix_cache

    def _join(
        self, seqs: list[Sequence], cache: SlabCache, mask: torch.Tensor, positions: torch.Tensor, last: torch.Tensor
    ) -> None:
        if self._cache is None or not self._rows:
            self._rows, self._cache, self._mask = list(seqs), cache, mask
            self._positions, self._last = positions, last
            return
        started = time.perf_counter()
        width = max(self._mask.shape[1], mask.shape[1])
        self._cache = merge([self._cache, cache])
        self.stats.regroup_seconds += time.perf_counter() - started
        self._mask = torch.cat([_pad_left(self._mask, width), _pad_left(mask, width)])
        self._positions = torch.cat([self._positions, positions])
        self._last = torch.cat([self._last, last])
        self._rows.extend(seqs)

    def _decode(self) -> None:
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        out = self._model(
            input_ids=self._last.unsqueeze(1),
            attention_mask=mask,
            position_ids=self._positions.unsqueeze(1),
            past_key_values=self._cache,
            use_cache=True,
        )
        self._mask = mask
        self._positions = self._positions + 1
        choices = self._choose(self._rows, out.logits[:, -1, :])
        self._last = torch.tensor([t for t, _ in choices], dtype=torch.long, device=self._device)
        finished = self._accept(self._rows, choices)
        if finished:
            self._keep([i for i in range(len(self._rows)) if i not in finished])

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Choice]:
        """The next token of every row, with its logprobs where the row asked for them."""
        params = [s.params for s in seqs]
        logits = logits.float()

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=logits.device)

        logits = constrain(logits, [s.constraint for s in seqs])
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            index = penalty_index([s.counts for s in seqs], device=logits.device)
            logits = apply_penalties(
                logits,
                index,
                repetition=column([p.repetition_penalty for p in params]),
                presence=column([p.presence_penalty for p in params]),
                frequency=column([p.frequency_penalty for p in params]),
            )
        temperature = column([p.temperature for p in params])
        uniform = column([s.draw() if s.params.temperature > 0 else 0.0 for s in seqs])
        chosen = sample(logits, temperature=temperature, top_p=column([p.top_p for p in params]), uniform=uniform)
        tokens = [int(t) for t in chosen.tolist()]
        wanting = [i for i, p in enumerate(params) if p.logprobs >= 0]
        if not wanting:
            return [(t, None) for t in tokens]
        found = token_logprobs(logits, temperature, chosen, wanting, [params[i].logprobs for i in wanting])
        return [(t, found.get(i)) for i, t in enumerate(tokens)]

    def _accept(self, seqs: list[Sequence], choices: list[Choice]) -> set[int]:
        """Give each sequence its new token; the rows that finished (or whose client left)."""
        finished: set[int] = set()
        for row, (seq, (token, logprob)) in enumerate(zip(seqs, choices)):
            if seq.cancelled:
                finished.add(row)
                continue
            seq.generated.append(token)
            seq.counts[token] = seq.counts.get(token, 0) + 1
            if token in self._eos:
                seq.text.count_only()
                self._finish(seq, "stop", [])
            else:
                if seq.constraint is not None and not seq.constraint.accept(token):
                    self._fail([seq], GrammarViolationError(seq.constraint.error or "a token outside the grammar"))
                    finished.add(row)
                    continue
                out = seq.text.push(token, None if logprob is None else token_logprob(logprob, self._describe))
                if seq.text.stopped:
                    self._finish(seq, "stop", out)
                elif seq.text.spent:
                    self._finish(seq, "tool_calls", out)
                elif len(seq.generated) >= seq.params.max_new_tokens:
                    self._finish(seq, "length", out)
                elif out:
                    self._send_output(seq, out)
            if seq.done or seq.cancelled:
                finished.add(row)
        return finished

    def _finish(self, seq: Sequence, reason: FinishReason, out: Output) -> None:
        out = [*out, *seq.text.finish(length=reason == "length")]
        if reason == "stop" and seq.text.calls:
            reason = "tool_calls"
        self._send_output(seq, out)
        self._send(seq, Finish(seq.index, reason))
        seq.done = True

    def _send_output(self, seq: Sequence, out: Output) -> None:
        for piece in seq.text.pieces(seq.index, out):
            self._send(seq, piece)

    def _send(self, seq: Sequence, item: object) -> None:
        try:
            seq.emit(item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening
            seq.cancelled = True

    def _keep(self, rows: list[int]) -> None:
        """Shrink the batch to `rows`, dropping columns that are padding for every one left."""
        if len(rows) == len(self._rows):
            return
        if not rows:
            self._reset()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self._device)
        mask = self._mask.index_select(0, index)
        drop = int(mask.argmax(dim=1).min())  # first real column of the least padded row
        assert self._cache is not None
        started = time.perf_counter()
        self._cache = select(self._cache, index, drop_left=drop)
        self.stats.regroup_seconds += time.perf_counter() - started
        self._mask = mask[:, drop:]
        self._positions = self._positions.index_select(0, index)
        self._last = self._last.index_select(0, index)
        self._rows = [self._rows[i] for i in rows]

    def _reset(self) -> None:
        self._rows, self._cache = [], None
        self._mask = self._mask.new_zeros(0, 0)
        self._positions = self._positions.new_zeros(0)
        self._last = self._last.new_zeros(0)

    def _fail(self, seqs: list[Sequence], error: BaseException) -> None:
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._send(seq, error)


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    if mask.shape[1] == width:
        return mask
    return torch.cat([mask.new_zeros(mask.shape[0], width - mask.shape[1]), mask], dim=1)
