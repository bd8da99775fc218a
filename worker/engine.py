"""The transformers backend: real models on the worker's own CPU or GPU, continuously batched.

`TransformersBackend` adapts the `worker.backend.Backend` interface to the step-loop thread in
`worker.engine_batch`: it renders the chat template, checks the request against the context
length, turns each choice into an engine `Sequence`, and relays what the engine thread emits
through an asyncio queue. A raw-prompt completion (`schemas.tasks`) skips the template: each
prompt is tokenized as it is, and choice `p * n + j` is a sequence of prompt p. Closing the
`generate` iterator cancels its sequences, which leave the batch at the engine's next step.

    backend = TransformersBackend.from_settings(settings)   # or .from_model(model, tokenizer, ...)
    await backend.start()                                   # loads (and converts) off the loop
    backend.check("SmolLM2-135M-Instruct", request)         # raises a 400-class error, or not
    async for item in backend.generate("SmolLM2-135M-Instruct", request): ...
    await backend.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog

from schemas.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, UnsupportedError
from schemas.jobs import ModelAdvert
from schemas.tasks import prompts, task_of
from worker.backend import Finish, Output, Sampling, Usage, check_text_only
from worker.engine_batch import BatchEngine, SeqParams, Sequence
from worker.engine_load import LoadedModel, load, prepare, resolve_device, resolve_dtype, resolve_source
from worker.engine_text import Decode, TextStream
from worker.engine_tools import ToolPlan, detect_format, markup_tokens, plan_tools, template_messages
from worker.grammar import Grammars, request_grammar
from worker.settings import WorkerSettings
from worker.smollm import MODEL_ID
from worker.toolcalls import ToolCallParser
from worker.toolformats import Format

log = structlog.get_logger(__name__)

DEFAULT_REPETITION_PENALTY = 1.1  # mild: small models loop without it
_GREEDY_BELOW = 1e-4  # temperatures this low are argmax (dividing by them overflows)
_MIN_SHARED_PREFIX = 8  # tokens; shorter shared prompt starts are not worth caching
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads the seeds of a request's choices apart


@dataclass(frozen=True, slots=True)
class _Plan:
    """A checked request: its prompts (one, or a completion's several), one parameter set per
    choice (choice i reads prompt i // n), tools and grammar."""

    prompts: list[list[int]]
    params: list[SeqParams]
    n: int
    tools: ToolPlan
    grammar: str  # empty: unconstrained


class TransformersBackend:
    """Serves one causal LM under one or more public model ids."""

    def __init__(
        self,
        *,
        model_ids: Seq[str],
        load_model: Callable[[], LoadedModel],
        slots: int = 16,
        max_context: int = 0,
        repetition_penalty: float = DEFAULT_REPETITION_PENALTY,
        prefill_budget: int = 2048,
        threads: int = 0,
        share_prefix: bool = True,
        tool_parser: str = "auto",
    ) -> None:
        if not model_ids:
            raise ValueError("a backend needs at least one public model id")
        self._ids = tuple(model_ids)
        self._load_model = load_model
        self._slots = max(1, slots)
        self._max_context = max_context
        self._repetition = repetition_penalty
        self._budget = prefill_budget
        self._threads = threads
        self._share_prefix = share_prefix
        self._tool_parser = tool_parser
        self._format: Format | None = None  # the model's tool-call markup, once loaded
        self._markup: dict[int, str] = {}
        self._grammars: Grammars | None = None
        self._token_text: dict[int, tuple[str, bytes]] = {}  # for logprobs; filled on the engine thread
        self._loaded: LoadedModel | None = None
        self._engine: BatchEngine | None = None
        self._decode: Decode | None = None
        self._context = max_context

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> TransformersBackend:
        def load_model() -> LoadedModel:
            device = resolve_device(settings.device)
            path = resolve_source(settings.model_path, settings.data_dir)
            return load(path, device=device, dtype=resolve_dtype(settings.dtype, device), threads=settings.threads)

        ids = settings.models or (_default_id(settings.model_path),)
        return cls(
            model_ids=ids,
            load_model=load_model,
            slots=settings.slots,
            max_context=settings.max_context,
            threads=settings.threads,
            tool_parser=settings.tool_parser,
        )

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, model_id: str, **options: Any) -> TransformersBackend:
        """Serve a model already in memory (tests, embedding); options as for the constructor."""
        return cls(model_ids=(model_id,), load_model=lambda: prepare(model.eval(), tokenizer), **options)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def context_length(self) -> int:
        return self._context

    def models(self) -> list[ModelAdvert]:
        # a trailing assistant message is continued (`_prompt`): an answer cut elsewhere can go on here
        return [
            ModelAdvert(id=i, context_length=self._context, owned_by="tokenyard", assistant_prefill=True)
            for i in self._ids
        ]

    async def start(self) -> None:
        if self._engine is not None:
            return
        loaded = await asyncio.to_thread(self._load_model)
        limit = loaded.context_length
        self._context = min(self._max_context, limit) if self._max_context > 0 else limit
        self._loaded, self._decode = loaded, _decoder(loaded.tokenizer)
        self._format = detect_format(loaded.tokenizer, self._tool_parser)
        self._markup = markup_tokens(loaded.tokenizer, self._format)
        self._grammars = await asyncio.to_thread(_grammars, loaded)
        prefix = self._template_prefix() if self._share_prefix else []
        engine = BatchEngine(
            loaded.model,
            rows=self._slots,
            eos_ids=loaded.eos_ids,
            pad_id=loaded.pad_id,
            prefill_budget=self._budget,
            threads=self._threads,
            prefix=prefix,
            describe=self._describe,
        )
        engine.start()
        self._engine = engine
        await asyncio.to_thread(self._warm_up, engine, loaded, prefix)
        log.info(
            "engine.started",
            models=list(self._ids),
            slots=self._slots,
            context=self._context,
            tool_parser=self._format.name if self._format else "none",
            grammars=self._grammars is not None,
        )

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)

    def check(self, model: str, request: dict[str, Any]) -> None:
        self._plan(model, request)

    async def generate(self, model: str, request: dict[str, Any]) -> AsyncGenerator[Output, None]:
        engine = self._engine
        if engine is None or self._decode is None:
            raise RuntimeError("the transformers backend is not started")
        plan = self._plan(model, request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        decode, grammars = self._decode, self._grammars
        seqs = [
            Sequence(
                i,
                plan.prompts[i // plan.n],
                p,
                emit,
                TextStream(decode, p.stops, parser=_parser(plan.tools), markup=self._markup),
                grammars.constraint(plan.grammar) if grammars is not None and plan.grammar else None,
            )
            for i, p in enumerate(plan.params)
        ]
        engine.submit(seqs)
        try:
            running = len(seqs)
            while running:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Finish):
                    running -= 1
                yield cast(Output, item)
            prompt_tokens = sum(len(prompt) for prompt in plan.prompts)
            yield Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(len(s.generated) for s in seqs))
        finally:
            engine.cancel(seqs)  # no-op for finished ones; the rest leave the batch at the next step

    def healthy(self) -> bool:
        return True

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        if task_of(request) == "completion":
            prompt_tokens = sum(len(self._raw_prompt(text)) for text in prompts(request))
        else:
            prompt_tokens = len(self._prompt(request, plan_tools(request, self._format)))
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    # -- request planning ---------------------------------------------------------------------

    def _plan(self, model: str, request: dict[str, Any]) -> _Plan:
        """Validate a request and turn it into prompt tokens, per-choice parameters, the tools
        it offers and the grammar its output must follow."""
        if model not in self._ids:
            raise ModelNotFoundError(f"The model '{model}' is not served by this worker.", param="model")
        task = task_of(request)
        if task == "embedding":
            raise UnsupportedError(f"The model '{model}' does not produce embeddings.", param="model")
        check_text_only(request, tools=True, response_format=True, logprobs=True)
        s = Sampling.of(request)
        _check_sampling(s)
        tools = plan_tools(request, self._format)
        grammar = request_grammar(self._grammars, request, tools)
        if task == "completion":
            all_prompts = [self._raw_prompt(text) for text in prompts(request)]
            if not all_prompts or not all(all_prompts):
                raise InvalidRequestError("prompt must not be empty.", param="prompt")
        else:
            all_prompts = [self._prompt(request, tools)]
        prompt = max(all_prompts, key=len)
        limit = self._context
        wanted = s.max_tokens if s.max_tokens is not None else 1
        if limit and len(prompt) + wanted > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + wanted} tokens ({len(prompt)} in the messages, {wanted} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        max_new = s.max_tokens if s.max_tokens is not None else limit - len(prompt)
        temperature = s.temperature if s.temperature >= _GREEDY_BELOW else 0.0
        params = [
            SeqParams(
                max_new_tokens=max_new,
                temperature=temperature,
                top_p=s.top_p,
                stops=s.stop,
                repetition_penalty=self._repetition,
                presence_penalty=s.presence_penalty,
                frequency_penalty=s.frequency_penalty,
                seed=None if s.seed is None else (int(s.seed) ^ (i * _SEED_MIX)) % 2**63,
                logprobs=s.logprobs,
            )
            for i in range(s.n * len(all_prompts))
        ]
        return _Plan(all_prompts, params, s.n, tools, grammar)

    def _describe(self, token: int) -> tuple[str, bytes]:
        """A token's text and bytes, for logprobs (engine thread only)."""
        found = self._token_text.get(token)
        if found is None:
            if self._grammars is not None:
                raw = self._grammars.token_bytes(token)
            else:
                assert self._decode is not None
                raw = self._decode([token]).encode()
            found = (raw.decode("utf-8", errors="replace"), raw)
            self._token_text[token] = found
        return found

    def _prompt(self, request: dict[str, Any], tools: ToolPlan = ToolPlan()) -> list[int]:
        if self._loaded is None:
            raise RuntimeError("the transformers backend is not started")
        from jinja2 import TemplateError

        tokenizer = self._loaded.tokenizer
        messages = template_messages(request, self._format)
        if not messages:
            raise InvalidRequestError("messages must not be empty.", param="messages")
        # A trailing assistant message is a prefix to continue (assistant prefill; the gateway
        # uses it to carry an interrupted answer on), not a finished turn.
        prefill = messages[-1]["role"] == "assistant"
        extra: dict[str, Any] = {"tools": list(tools.tools)} if tools.tools else {}
        try:
            if getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=not prefill,
                    continue_final_message=prefill,
                    tokenize=False,
                    **extra,
                )
            else:  # a base model without a template: plain role-prefixed turns
                text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
                text = text[:-1] if prefill else text + "assistant:"
        except TemplateError as e:
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {e}", param="messages"
            ) from e
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def _raw_prompt(self, text: str) -> list[int]:
        """A completion's prompt as it is: no chat template, the tokenizer's own special tokens
        (a begin-of-text token, where the model has one)."""
        if self._loaded is None:
            raise RuntimeError("the transformers backend is not started")
        return list(self._loaded.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _template_prefix(self) -> list[int]:
        """The tokens every prompt starts with under this chat template (say a default system
        prompt), if there are enough of them to be worth computing once and sharing."""
        try:
            a, b = (self._prompt({"messages": [{"role": "user", "content": c}]}, ToolPlan()) for c in ("A", "B"))
        except InvalidRequestError:
            return []
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:common] if common >= _MIN_SHARED_PREFIX else []

    def _warm_up(self, engine: BatchEngine, loaded: LoadedModel, prefix: list[int]) -> None:
        """One tiny generation, so the first real request pays neither for lazy initialisation
        nor for computing the shared prompt prefix."""
        done = threading.Event()
        params = SeqParams(max_new_tokens=2, temperature=0.0)
        seq = Sequence(
            0,
            [*prefix, loaded.pad_id, loaded.pad_id],
            params,
            lambda item: done.set() if isinstance(item, (Finish, BaseException)) else None,
            TextStream(self._decode or (lambda ids: ""), ()),
        )
        engine.submit([seq])
        done.wait(timeout=120.0)


def _check_sampling(s: Sampling) -> None:
    if s.n < 1:
        raise InvalidRequestError("n must be at least 1.", param="n")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise InvalidRequestError("max_tokens must be at least 1.", param="max_tokens")
    if not 0.0 <= s.temperature <= 2.0:
        raise InvalidRequestError("temperature must be between 0 and 2.", param="temperature")
    if not 0.0 < s.top_p <= 1.0:
        raise InvalidRequestError("top_p must be greater than 0 and at most 1.", param="top_p")
    if any(not isinstance(stop, str) for stop in s.stop):
        raise InvalidRequestError("stop must be a string or a list of strings.", param="stop")


def _parser(tools: ToolPlan) -> ToolCallParser | None:
    if tools.fmt is None:
        return None
    # A forced mistral call is a bare array (its marker is a special token a grammar cannot write).
    forced = bool(tools.forced) and tools.fmt.name == "mistral"
    return ToolCallParser(tools.fmt, names=tools.names, max_calls=tools.max_calls, forced=forced)


def _grammars(loaded: LoadedModel) -> Grammars | None:
    """Constrained decoding for this model, if llguidance is installed (slow-ish: off the loop)."""
    try:
        vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
        return Grammars(loaded.tokenizer, vocab_size=vocab, eos_ids=loaded.eos_ids)
    except ImportError:
        log.warning("engine.no_grammars", reason="llguidance is not installed")
    except (ValueError, TypeError, AttributeError, RuntimeError) as e:  # a tokenizer llguidance cannot read
        log.warning("engine.no_grammars", reason=f"{type(e).__name__}: {e}")
    return None


def _decoder(tokenizer: Any) -> Decode:
    """The fastest faithful way to turn ids into text with this tokenizer."""
    fast = getattr(tokenizer, "backend_tokenizer", None)
    if fast is not None:
        return lambda ids: fast.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _default_id(model_path: str) -> str:
    if not model_path:
        return MODEL_ID
    path = Path(model_path).expanduser()
    return (path.stem if path.is_file() else path.name) or MODEL_ID
