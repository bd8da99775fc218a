"""Build the backend a worker's settings ask for. Heavy imports (torch, httpx) stay lazy so a
worker only loads what its backend needs."""

from __future__ import annotations

from worker.backend import Backend
from worker.settings import WorkerSettings


def build_backend(settings: WorkerSettings) -> Backend:
    if settings.backend == "echo":
        from worker.echo import EchoBackend

        return EchoBackend.from_settings(settings)
    if settings.backend == "transformers":
        from worker.engine import TransformersBackend

        return TransformersBackend.from_settings(settings)
    if settings.backend == "cloud":
        from worker.cloud import CloudBackend

        return CloudBackend.from_settings(settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
