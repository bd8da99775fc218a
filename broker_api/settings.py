"""Gateway settings: flags and TOKENYARD_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from schemas.settings import add_common, add_setting


@dataclass(frozen=True, slots=True)
class ApiSettings:
    nats_url: str
    log_level: str
    log_json: bool
    host: str
    port: int
    data_dir: str
    admin_key: str  # empty: read or create <data_dir>/admin_key
    request_timeout: float  # seconds from arrival to the last byte of the answer
    attempt_silence: float  # seconds without a word from a running attempt before it counts as dead
    max_dispatches: int  # placements of one job (first + re-dispatches after failed attempts)
    max_body_bytes: int
    submit_timeout: float  # seconds to wait for the scheduler's answer before asking again

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard api", description="Run the Tokenyard OpenAI-compatible gateway.")
        add_common(p)
        add_setting(p, "--host", default="127.0.0.1", help="address to listen on")
        add_setting(p, "--port", default=8000, type=int, help="port to listen on")
        add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="where the admin key is kept")
        add_setting(p, "--admin-key", default="", help="bootstrap admin API key (default: generated into the data dir)")
        add_setting(p, "--request-timeout", default=300.0, type=float, help="seconds a request may take in all")
        add_setting(p, "--attempt-silence", default=5.0, type=float,
                    help="seconds of silence after which a running attempt counts as dead")
        add_setting(p, "--max-dispatches", default=3, type=int, help="placements of one job before giving up")
        add_setting(p, "--max-body-bytes", default=4 << 20, type=int, help="largest request body accepted")
        add_setting(p, "--submit-timeout", default=2.0, type=float, help="seconds to wait for the scheduler")
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> ApiSettings:
        a = cls.parser().parse_args(argv)
        return cls.build(**{k: v for k, v in vars(a).items()})

    @classmethod
    def build(cls, **overrides: object) -> ApiSettings:
        """Defaults (from the environment) with `overrides`: how tests and embedders make settings."""
        values = vars(cls.parser().parse_args([]))
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
