"""Build the backend a worker's settings ask for. Heavy imports (torch, httpx) stay lazy so a
worker only loads what its backend needs."""

from __future__ import annotations

from pathlib import Path

from worker.backend import Backend
from worker.settings import WorkerSettings


async def build_backend(settings: WorkerSettings) -> Backend:
    """The backend, not started yet. Async: the engine backend first asks its engine what it serves."""
    if settings.backend == "echo":
        from worker.echo import EchoBackend

        return EchoBackend.from_settings(settings)
    if settings.backend == "transformers" and _embeds(settings):
        from worker.engine_embed import EmbeddingBackend

        return EmbeddingBackend.from_settings(settings)
    if settings.backend == "transformers":
        from worker.engine import TransformersBackend

        return TransformersBackend.from_settings(settings)
    if settings.backend == "cloud":
        from worker.cloud import CloudBackend

        return CloudBackend.from_settings(settings)
    if settings.backend == "engine":
        from worker.engine_url import EngineBackend, EngineError

        try:
            return await EngineBackend.open(settings)
        except EngineError as e:  # what the user must fix, not a traceback
            raise SystemExit(f"tokenyard worker: {e}") from None
    raise ValueError(f"unknown backend {settings.backend!r}")


def _embeds(settings: WorkerSettings) -> bool:
    """`--task embed`, or `auto` with a `--model-path` whose files say it is an embedding model."""
    if settings.task != "auto" or not settings.model_path:
        return settings.task == "embed"
    from worker.engine_embed import is_embedding_model

    return is_embedding_model(Path(settings.model_path).expanduser())
