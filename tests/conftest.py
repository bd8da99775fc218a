"""Fixtures: a real nats-server per test, and the stack layered on it.

`stack` / `echo_stack` / `client` are fresh for every test: for tests that kill processes, count
what the ledger holds, or otherwise need a clean slate. `shared_echo_stack` / `shared_client`
are one stack per test module, for read-only cases (bad input, shapes, scoping checks): such
tests run in the module's event loop, marked `pytest.mark.asyncio(loop_scope="module")`, since
the stack's gateway serves from the loop it was started in.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from tests.cluster import NatsCluster
from tests.helpers import ECHO, end_leftover_tasks
from tests.postgres import Postgres, data_dir
from tests.stack import ADMIN_KEY, Stack


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-long",
        action="store_true",
        default=False,
        help="run the long chaos run (tests/test_chaos.py: 10,000+ requests, by hand; bench/RESULTS.md)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long chaos run takes up to ~20 minutes a variant: past the suite's per-test timeout."""
    if config.getoption("--chaos-long"):
        for item in items:
            if "test_chaos" in item.nodeid:
                item.add_marker(pytest.mark.timeout(1800))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """nats-server and a scheduler; tests add workers and the API as they need."""
    s = Stack(tmp_path)
    s.start_nats()
    s.start_scheduler()
    try:
        yield s
    finally:
        await s.close()
        await end_leftover_tasks()


@pytest.fixture
async def echo_stack(stack: Stack) -> Stack:
    """The whole stack with one echo worker, ready to serve `tokenyard/echo`."""
    stack.start_worker()
    await stack.start_api()
    await stack.wait_for_model(ECHO)
    return stack


@pytest.fixture
async def client(echo_stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{echo_stack.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    try:
        yield c
    finally:
        await c.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_echo_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """One whole echo stack for a module's read-only tests (see the module docstring)."""
    s = Stack(tmp_path_factory.mktemp("shared-stack"))
    try:
        s.start_nats()
        s.start_scheduler()
        s.start_worker()
        await s.start_api()
        await s.wait_for_model(ECHO)
        yield s
    finally:
        await s.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_client(shared_echo_stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{shared_echo_stack.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="session")
def smol_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data dir where SmolLM2 is converted once per session (or TOKENYARD_TEST_DATA_DIR, to reuse one)."""
    configured = os.environ.get("TOKENYARD_TEST_DATA_DIR")
    yield Path(configured) if configured else tmp_path_factory.mktemp("tokenyard-data")


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A three-node JetStream cluster on loopback (fsync always), with a JetStream leader."""
    cluster = NatsCluster(tmp_path / "cluster").start()
    try:
        await cluster.wait_for_jetstream()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL server for the session, on a free loopback port."""
    server = Postgres(data_dir(tmp_path_factory.mktemp("postgres"))).start()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
async def database_url(postgres: Postgres) -> str:
    """A fresh database on the session's PostgreSQL (started again if a test left it stopped)."""
    if not postgres.running():
        postgres.start()
    return await postgres.create_database()
