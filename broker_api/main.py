"""`tokenyard api`: the gateway under uvicorn."""

from __future__ import annotations

import sys

import structlog
import uvicorn

from broker_api.app import create_app
from broker_api.auth import load_or_create_admin_key
from broker_api.connection import Deadlines, guarded_protocol
from broker_api.settings import ApiSettings
from schemas.logs import configure_logging

log = structlog.get_logger(__name__)


def main(argv: list[str] | None = None) -> None:
    settings = ApiSettings.from_args(argv)
    configure_logging(settings.log_level, settings.log_json, role="api")
    admin_key, created = load_or_create_admin_key(settings.data_dir, settings.admin_key)
    if created:
        print(
            f"tokenyard api: created an admin key (kept in {settings.data_dir}/admin_key):\n  {admin_key}",
            file=sys.stderr,
        )
    app = create_app(settings, admin_key=admin_key)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,  # uvicorn's loggers go through schemas.logs' pipeline, not their own handlers
        access_log=False,
        loop="auto",
        http=guarded_protocol(
            Deadlines(settings.header_timeout, settings.body_timeout, write_stall=settings.stream_stall_timeout)
        ),
        timeout_graceful_shutdown=10,
        ssl_certfile=settings.tls_cert or None,
        ssl_keyfile=settings.tls_key or None,
    )


if __name__ == "__main__":
    main()
