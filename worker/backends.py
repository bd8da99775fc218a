"""Build the backend a worker's settings ask for. Heavy imports (torch, httpx) stay lazy so a
worker only loads what its backend needs."""

from __future__ import annotations

from worker.backend import Backend
from worker.settings import WorkerSettings


async def build_backend(settings: WorkerSettings) -> Backend:
    """The backend, not started yet. Async: the engine backend first asks its engine what it serves."""
    if settings.backend == "echo":
        from worker.echo import EchoBackend

        return EchoBackend.from_settings(settings)
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
