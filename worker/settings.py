"""Worker settings: flags and TOKENYARD_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from schemas.jobs import NodeKind
from schemas.settings import NatsSettings, add_common, add_metrics, add_setting
from worker.idle import CPU_PERCENT, GPU_PERCENT, IDLE_AFTER, parse_hours, parse_signal_spec
from worker.node_id import valid_node_id

BACKENDS = ("echo", "transformers", "cloud", "engine")
DEFAULT_SLOTS = {"echo": 64, "transformers": 16, "cloud": 32, "engine": 8}


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    nats_url: str
    log_level: str
    log_json: bool
    node_id: str  # "" = the data dir's stable id (worker.node_id), resolved when the worker starts
    pool: str
    kind: NodeKind  # own (dedicated), volunteer (idle-time; sees prompts only of tenants who allow it), cloud
    backend: str  # "echo" | "transformers" | "cloud" | "engine"
    models: tuple[str, ...]  # public model ids (echo: served names; transformers: the id to serve under)
    slots: int  # most jobs at once (transformers: max concurrent sequences)
    heartbeat: float  # seconds between job heartbeats and fleet adverts
    gateway_patience: float  # seconds a gateway may leave every beat unanswered before its jobs stop
    ack_wait: float  # JetStream redelivers a job whose worker went silent this long
    max_deliver: int  # after this many deliveries a job is given up (poison job)
    coalesce_ms: float  # token events closer together than this are sent as one message
    drain_timeout: float  # on SIGTERM, how long running jobs may take to finish
    data_dir: str
    # idle-time mode (worker.idle): volunteer nodes, or any node given an --idle-signal
    idle_signal: str  # "" (volunteer: machine; own: none), machine, file:PATH, none; comma-separated
    idle_cpu_percent: float  # other programs' CPU use above this: busy
    idle_gpu_percent: float  # other processes' GPU use above this: busy
    idle_after: float  # seconds every signal must say idle before pulling
    idle_hours: str  # local hours to pull in, e.g. "22:00-07:00"; "" = any time
    idle_input_minutes: float  # no user input this long; 0 = not used; < 0 = 3 on GPU and engine nodes
    idle_grace: float  # seconds a streaming job may finish once the owner is back
    idle_poll: float  # seconds between looks at the machine
    # echo backend
    echo_tokens: int
    echo_rate: float  # tokens per second per sequence; 0 = as fast as possible
    echo_context: int
    echo_script: str  # a file of model text the echo backend plays back (tool-call parsing tests)
    echo_directives: bool  # obey the fault directives ([[crash]], [[fail]], ...): tests only
    # transformers backend
    model_path: str  # a local HF model directory; empty = the default SmolLM2 (converted once)
    device: str  # "auto" | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str  # "auto" | "float32" | "bfloat16" | "float16"
    threads: int  # CPU threads for torch; 0 = torch's default
    max_context: int  # prompt + completion tokens per sequence; 0 = the model's own limit
    tool_parser: str  # tool-call markup: auto (from the chat template), hermes, llama3, mistral or none
    task: str  # transformers: auto (from the model's files), generate or embed (an embedding model)
    # cloud backend
    providers: str  # path of the operator's provider config (YAML)
    provider: str  # which provider of that file this worker forwards to; its pool is its name
    # engine backend (worker.engine_url)
    engine_url: str  # an OpenAI-compatible server this node fronts (http on loopback, else https)
    engine_key: str = field(default="", repr=False)  # its bearer token, if it wants one
    nats: NatsSettings = field(default_factory=NatsSettings)  # how it connects (credentials, TLS)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: off; the flag's default is 9465)
    otlp_endpoint: str = ""  # OpenTelemetry traces go here (schemas.otel); empty: none

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="tokenyard worker", description="Run a Tokenyard worker.")
        add_common(p)
        add_setting(
            p, "--node-id", default="", help="this node's id (letters, digits, -); default: kept in <data dir>/node_id"
        )
        add_setting(p, "--pool", default="own", help="the pool (capacity group) this node serves in")
        add_setting(p, "--kind", default="own", help="own (dedicated) or volunteer (idle-time) capacity")
        add_setting(
            p,
            "--backend",
            default="transformers",
            help="echo (deterministic test backend), transformers, cloud, or engine (implied by --engine-url)",
        )
        add_setting(p, "--models", default="", help="comma-separated public model ids served (default per backend)")
        add_setting(
            p, "--slots", default=0, type=int, help="jobs at once (default: echo 64, transformers 16, engine 8)"
        )
        add_setting(p, "--heartbeat", default=1.0, type=float, help="seconds between heartbeats")
        add_setting(
            p,
            "--gateway-patience",
            default=15.0,
            type=float,
            help="seconds a gateway may answer no heartbeat before its jobs are stopped (at least 3 heartbeats)",
        )
        add_setting(p, "--ack-wait", default=5.0, type=float, help="seconds of silence before a job is redelivered")
        add_setting(p, "--max-deliver", default=3, type=int, help="deliveries before a job is given up")
        add_setting(p, "--coalesce-ms", default=20.0, type=float, help="merge token events closer than this")
        add_setting(p, "--drain-timeout", default=30.0, type=float, help="seconds to finish jobs on SIGTERM")
        add_setting(
            p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="the node id and converted models"
        )
        add_idle_settings(p)
        add_setting(p, "--echo-tokens", default=16, type=int, help="echo backend: tokens per answer")
        add_setting(p, "--echo-rate", default=0.0, type=float, help="echo backend: tokens/s per sequence (0 = max)")
        add_setting(p, "--echo-context", default=4096, type=int, help="echo backend: context length")
        add_setting(p, "--echo-script", default="", help="echo backend: play this file's text as model output")
        add_setting(
            p,
            "--echo-directives",
            default=False,
            type=bool,
            help="echo backend: obey [[crash]], [[fail]], [[die-after=N]], [[delay=S]] in prompts (tests only)",
        )
        add_setting(
            p, "--model-path", default="", help="transformers: local model directory (default SmolLM2-135M-Instruct)"
        )
        add_setting(p, "--device", default="auto", help="transformers: auto, cpu, cuda[:N] or mps")
        add_setting(p, "--dtype", default="auto", help="transformers: auto, float32, bfloat16 or float16")
        add_setting(p, "--threads", default=0, type=int, help="transformers: CPU threads (0 = torch default)")
        add_setting(p, "--max-context", default=0, type=int, help="transformers: tokens per sequence (0 = model limit)")
        add_setting(
            p,
            "--tool-parser",
            default="auto",
            help="tool-call markup: auto (from the chat template), hermes, llama3, mistral or none",
        )
        add_setting(
            p, "--task", default="auto", help="transformers: generate, embed, or auto (embed for embedding models)"
        )
        add_setting(p, "--providers", default="", help="cloud: provider config file (YAML)")
        add_setting(p, "--provider", default="", help="cloud: the provider (of --providers) to forward to")
        add_setting(
            p, "--engine-url", default="", help="front this OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1"
        )
        add_setting(p, "--engine-key", default="", help="engine: its API key, if it wants one")
        add_metrics(p, port=9465)
        return p

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> WorkerSettings:
        a = cls.parser().parse_args(argv)
        if a.backend not in BACKENDS:
            raise SystemExit(f"tokenyard worker: unknown backend {a.backend!r} ({', '.join(BACKENDS)})")
        if a.node_id and not valid_node_id(a.node_id):
            raise SystemExit(f"tokenyard worker: --node-id may hold only letters, digits and '-': {a.node_id!r}")
        if a.tool_parser not in {"auto", "hermes", "llama3", "mistral", "none"}:
            raise SystemExit(
                f"tokenyard worker: --tool-parser must be auto, hermes, llama3, mistral or none, not {a.tool_parser!r}"
            )
        if a.task not in {"auto", "generate", "embed"}:
            raise SystemExit(f"tokenyard worker: --task must be auto, generate or embed, not {a.task!r}")
        if a.kind not in {"own", "volunteer"}:
            raise SystemExit(f"tokenyard worker: --kind must be own or volunteer, not {a.kind!r}")
        a.backend = _engine_backend(a)
        _check_idle(a)
        models = tuple(m.strip() for m in a.models.split(",") if m.strip())
        slots = a.slots or DEFAULT_SLOTS[a.backend]
        pool = a.provider if a.backend == "cloud" and a.pool == "own" and a.provider else a.pool
        return cls(
            nats_url=a.nats_url,
            log_level=a.log_level,
            log_json=a.log_json,
            node_id=a.node_id,
            pool=pool,
            kind="cloud" if a.backend == "cloud" else a.kind,
            backend=a.backend,
            models=models,
            slots=slots,
            heartbeat=a.heartbeat,
            gateway_patience=a.gateway_patience,
            ack_wait=a.ack_wait,
            max_deliver=a.max_deliver,
            coalesce_ms=a.coalesce_ms,
            drain_timeout=a.drain_timeout,
            data_dir=a.data_dir,
            idle_signal=a.idle_signal,
            idle_cpu_percent=a.idle_cpu_percent,
            idle_gpu_percent=a.idle_gpu_percent,
            idle_after=a.idle_after,
            idle_hours=a.idle_hours,
            idle_input_minutes=a.idle_input_minutes,
            idle_grace=a.idle_grace,
            idle_poll=a.idle_poll,
            echo_tokens=a.echo_tokens,
            echo_rate=a.echo_rate,
            echo_context=a.echo_context,
            echo_script=a.echo_script,
            echo_directives=a.echo_directives,
            model_path=a.model_path,
            device=a.device,
            dtype=a.dtype,
            threads=a.threads,
            max_context=a.max_context,
            tool_parser=a.tool_parser,
            task=a.task,
            providers=a.providers,
            provider=a.provider,
            engine_url=a.engine_url,
            engine_key=a.engine_key,
            nats=NatsSettings.of(a, roles=cls.creds_roles(a.backend, a.provider), data_dir=a.data_dir),
            metrics_host=a.metrics_host,
            metrics_port=a.metrics_port,
            otlp_endpoint=a.otlp_endpoint,
        )

    @staticmethod
    def creds_roles(backend: str, provider: str) -> tuple[str, ...]:
        """Whose credentials in the data dir a worker uses when not given `--nats-creds`: a
        cloud adapter's own (`tokenyard auth init --providers`), else the operator's worker's
        (what `tokenyard up` writes). An enrolled node is given its own (`tokenyard worker join`)."""
        own = (f"adapter-{provider}",) if backend == "cloud" and provider else ()
        return (*own, "worker")


def add_idle_settings(p: argparse.ArgumentParser) -> None:
    add_setting(
        p,
        "--idle-signal",
        default="",
        help="idle-time mode: machine, file:PATH (holding idle or busy), none, or several comma-separated "
        "(default: machine for --kind volunteer, none otherwise)",
    )
    add_setting(p, "--idle-cpu-percent", default=CPU_PERCENT, type=float, help="busy above this CPU use by others")
    add_setting(p, "--idle-gpu-percent", default=GPU_PERCENT, type=float, help="busy above this GPU use by others")
    add_setting(p, "--idle-after", default=IDLE_AFTER, type=float, help="seconds idle before taking work")
    add_setting(p, "--idle-hours", default="", help="only these local hours, e.g. 22:00-07:00 (default any time)")
    add_setting(
        p,
        "--idle-input-minutes",
        default=-1.0,
        type=float,
        help="busy after user input within this long; 0 = ignore input (default: 3 on GPU and engine nodes, else 0)",
    )
    add_setting(p, "--idle-grace", default=10.0, type=float, help="seconds running jobs may finish when busy")
    add_setting(p, "--idle-poll", default=1.0, type=float, help="seconds between looks at the machine")


def _engine_backend(a: argparse.Namespace) -> str:
    """`--engine-url` means the engine backend; it cannot be combined with another backend."""
    if not a.engine_url:
        if a.backend == "engine":
            raise SystemExit("tokenyard worker: the engine backend needs --engine-url URL")
        return str(a.backend)
    if a.backend not in {"transformers", "engine"}:  # transformers: the default, not a choice
        raise SystemExit(f"tokenyard worker: --engine-url fronts an engine; it cannot go with --backend {a.backend}")
    # Imported here: the engine module builds on the cloud adapter, which imports these settings.
    from worker.engine_url import engine_base_url

    try:
        engine_base_url(a.engine_url)
    except ValueError as e:
        raise SystemExit(f"tokenyard worker: {e}") from None
    return "engine"


def _check_idle(a: argparse.Namespace) -> None:
    try:
        parse_signal_spec(a.idle_signal)
        parse_hours(a.idle_hours)
    except ValueError as e:
        raise SystemExit(f"tokenyard worker: {e}") from None
    for flag in ("idle_cpu_percent", "idle_gpu_percent", "idle_after", "idle_grace"):
        if getattr(a, flag) < 0:
            raise SystemExit(f"tokenyard worker: --{flag.replace('_', '-')} must not be negative")
    if a.idle_poll <= 0:
        raise SystemExit("tokenyard worker: --idle-poll must be positive")
