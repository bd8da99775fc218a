"""The embedding backend: an encoder model on the worker's own CPU or GPU serves `/v1/embeddings`.

`tokenyard worker --model-path DIR --task embed` (or a model whose files say it is one:
`is_embedding_model`) loads the model with `AutoModel`, and answers a job of the embedding task
(`schemas.tasks`) with one vector per input: the last hidden states pooled (the mean over the
input's tokens, or its first token where a sentence-transformers pooling config says `cls`),
cut to `dimensions` when asked (Matryoshka-style) and L2-normalised, as float32 bytes
(`Piece.embedding`). Inputs run in batches of `BATCH` on one thread, one job at a time; every
input must fit the model's context (a 400 naming it, otherwise).

Only local files are read (HF_HUB_OFFLINE, `local_files_only`), as for the generative engine.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from schemas.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, UnsupportedError
from schemas.events import Piece
from schemas.jobs import ModelAdvert
from schemas.tasks import prompts, task_of
from worker.backend import Finish, Output, Usage
from worker.engine_load import resolve_device, resolve_dtype
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

BATCH = 16  # inputs per forward pass
_GENERATIVE = ("CausalLM", "LMHead", "ConditionalGeneration")
_FALLBACK_CONTEXT = 512


@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    model: Any  # a transformers encoder (AutoModel), in eval mode on its device
    tokenizer: Any
    context_length: int
    dimensions: int  # the model's hidden size: the longest vector it gives
    pooling: str  # "mean" | "cls"


def is_embedding_model(path: Path) -> bool:
    """Whether a model directory holds an embedding model: a sentence-transformers model, or one
    whose architectures are encoders without a language-model head."""
    if (path / "modules.json").is_file() or (path / "sentence_bert_config.json").is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") or []
    return bool(architectures) and not any(g in str(a) for a in architectures for g in _GENERATIVE)


def load_embedding_model(path: Path, *, device: torch.device, dtype: torch.dtype) -> EmbeddingModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
    loaded = prepare_embedding(model.eval(), tokenizer, pooling=_pooling(path))
    log.info("model.loaded", path=str(path), task="embed", device=str(device), dimensions=loaded.dimensions)
    return loaded


def prepare_embedding(model: Any, tokenizer: Any, *, pooling: str = "mean") -> EmbeddingModel:
    config = model.config
    context = int(getattr(config, "max_position_embeddings", 0) or 0) or _FALLBACK_CONTEXT
    return EmbeddingModel(model, tokenizer, context, int(config.hidden_size), pooling)


def _pooling(path: Path) -> str:
    try:
        config = json.loads((path / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "mean"
    return "cls" if config.get("pooling_mode_cls_token") else "mean"


class EmbeddingBackend:
    """Serves one embedding model under one or more public model ids."""

    def __init__(
        self, *, model_ids: Seq[str], load_model: Callable[[], EmbeddingModel], slots: int = 4, max_context: int = 0
    ) -> None:
        if not model_ids:
            raise ValueError("a backend needs at least one public model id")
        self._ids = tuple(model_ids)
        self._load_model = load_model
        self._slots = max(1, slots)
        self._max_context = max_context
        self._loaded: EmbeddingModel | None = None
        self._lock = asyncio.Lock()  # one job at a time on the model: batches within a job

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> EmbeddingBackend:
        path = Path(settings.model_path).expanduser()

        def load_model() -> EmbeddingModel:
            device = resolve_device(settings.device)
            return load_embedding_model(path, device=device, dtype=resolve_dtype(settings.dtype, device))

        ids = settings.models or (path.name,)
        return cls(model_ids=ids, load_model=load_model, slots=settings.slots, max_context=settings.max_context)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, model_id: str, **options: Any) -> EmbeddingBackend:
        return cls(model_ids=(model_id,), load_model=lambda: prepare_embedding(model.eval(), tokenizer), **options)

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def _context(self) -> int:
        limit = self._loaded.context_length if self._loaded is not None else 0
        return min(self._max_context, limit) if self._max_context > 0 and limit else limit or self._max_context

    def models(self) -> list[ModelAdvert]:
        return [ModelAdvert(id=i, context_length=self._context, owned_by="tokenyard") for i in self._ids]

    async def start(self) -> None:
        if self._loaded is None:
            self._loaded = await asyncio.to_thread(self._load_model)
            log.info("engine.started", models=list(self._ids), task="embed", context=self._context)

    async def close(self) -> None:
        self._loaded = None

    def healthy(self) -> bool:
        return True

    def check(self, model: str, request: dict[str, Any]) -> None:
        """What can be refused without tokenizing (on the worker's loop, so kept cheap); each
        input's length is checked once, in `generate`, off the loop."""
        self._dimensions(model, request)

    async def generate(self, model: str, request: dict[str, Any]) -> AsyncIterator[Output]:
        loaded = self._need()
        ids, dimensions = await asyncio.to_thread(self._inputs, model, request)
        async with self._lock:
            for start in range(0, len(ids), BATCH):
                batch = ids[start : start + BATCH]
                vectors = await asyncio.to_thread(_embed, loaded, batch, dimensions)
                for k, vector in enumerate(vectors):
                    yield Piece(start + k, embedding=vector)
        for i in range(len(ids)):
            yield Finish(i, "stop")
        yield Usage(sum(len(t) for t in ids), 0)

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        ids, _ = self._inputs(model, request)
        return Usage(sum(len(t) for t in ids), 0)

    def _dimensions(self, model: str, request: dict[str, Any]) -> int:
        """The vector length asked for, once the model, the task and the inputs are ones this
        backend serves."""
        if model not in self._ids:
            raise ModelNotFoundError(f"The model '{model}' is not served by this worker.", param="model")
        if task_of(request) != "embedding":
            raise UnsupportedError(f"The model '{model}' serves embeddings only (/v1/embeddings).", param="model")
        loaded = self._need()
        texts = prompts(request)
        if not texts:
            raise InvalidRequestError("input must not be empty.", param="input")
        dimensions = int(request.get("dimensions") or loaded.dimensions)
        if not 1 <= dimensions <= loaded.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {loaded.dimensions} for this model.", param="dimensions"
            )
        return dimensions

    def _inputs(self, model: str, request: dict[str, Any]) -> tuple[list[list[int]], int]:
        """The request's inputs as token ids, and the vector length asked for."""
        dimensions = self._dimensions(model, request)
        tokenizer = self._need().tokenizer
        ids = [list(tokenizer(t, add_special_tokens=True, truncation=False)["input_ids"]) for t in prompts(request)]
        limit = self._context
        for i, tokens in enumerate(ids):
            if not tokens:
                raise InvalidRequestError(f"input[{i}] must not be empty.", param="input")
            if limit and len(tokens) > limit:
                raise ContextLengthError(
                    f"This model's maximum context length is {limit} tokens, however input[{i}] has "
                    f"{len(tokens)} tokens. Please reduce its length.",
                    param="input",
                )
        return ids, dimensions

    def _need(self) -> EmbeddingModel:
        if self._loaded is None:
            raise RuntimeError("the embedding backend is not started")
        return self._loaded


@torch.inference_mode()
def _embed(loaded: EmbeddingModel, batch: list[list[int]], dimensions: int) -> list[bytes]:
    """One batch's vectors (engine thread): padded on the right, pooled, cut, normalised."""
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    width = max(len(t) for t in batch)
    device = next(loaded.model.parameters()).device
    ids = torch.tensor([t + [pad] * (width - len(t)) for t in batch], device=device)
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in batch], device=device)
    hidden = loaded.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    if loaded.pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    pooled = torch.nn.functional.normalize(pooled[:, :dimensions], dim=-1)
    return [row.contiguous().numpy().astype("<f4").tobytes() for row in pooled.cpu()]
