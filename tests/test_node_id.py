"""A node's id is stable: made once in `<data dir>/node_id`, the same after a restart of the real
worker process, overridden by `--node-id`, and never shared by two workers running at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.helpers import watch_adverts
from tests.stack import Stack
from worker.node_id import FILE, stable_node_id, valid_node_id


def test_the_id_is_made_once_and_reused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with stable_node_id(data) as first:
        assert valid_node_id(first)
        assert (data / FILE).read_text() == first + "\n"
    with stable_node_id(data) as again:
        assert again == first


def test_a_second_worker_on_the_same_data_dir_gets_its_own_id(tmp_path: Path) -> None:
    with stable_node_id(tmp_path) as held, stable_node_id(tmp_path) as other:
        assert other != held and valid_node_id(other)
    assert (tmp_path / FILE).read_text().strip() == held  # the second one stored nothing


def test_an_id_written_by_join_is_used_and_a_bad_one_refused(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text("enrolled-node-7\n")
    with stable_node_id(tmp_path) as node_id:
        assert node_id == "enrolled-node-7"
    (tmp_path / FILE).write_text("not a node id!\n")
    with pytest.raises(SystemExit, match="not a node id"), stable_node_id(tmp_path):
        pass


async def advertised(stack: Stack, seen: set[str], timeout: float = 15.0) -> str:
    adverts = await watch_adverts(stack)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fresh = set(adverts.latest) - seen
        if fresh:
            return fresh.pop()
        await asyncio.sleep(0.05)
    raise AssertionError("no worker advertised")


async def test_a_restarted_worker_is_the_same_node(stack: Stack) -> None:
    worker = stack.start_worker()
    first = await advertised(stack, set())
    assert (stack.tmp / "data" / FILE).read_text().strip() == first
    assert worker.stop() == 0
    stack.start_worker()
    adverts = await watch_adverts(stack)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and first not in adverts.latest:
        await asyncio.sleep(0.05)
    assert first in adverts.latest  # the same id again
    stack.start_worker(TOKENYARD_NODE_ID="chosen-id")  # an override, beside it
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "chosen-id" not in adverts.latest:
        await asyncio.sleep(0.05)
    assert "chosen-id" in adverts.latest
    assert (stack.tmp / "data" / FILE).read_text().strip() == first
