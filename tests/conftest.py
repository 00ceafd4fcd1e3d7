"""Shared fixtures: the backends every conformance test runs against, and a real nats-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import keyedbus
from keyedbus.testing import NatsServer


@attrs.frozen
class Backend:
    """How to open a bus on one backend for a test."""

    name: str
    url: str
    default_topic: keyedbus.TopicConfig

    @property
    def virtual_time(self) -> bool:
        return self.name == "memory"

    def open(self, **kwargs: Any) -> Any:
        return keyedbus.open_bus(self.url, default_topic=self.default_topic, **kwargs)


#: Backends the conformance suite runs against; the NATS ones start their own nats-server.
BACKENDS = ["memory", "nats-core", "jetstream"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream on a free loopback port, stopped after the test."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """A backend to run a guarantee against."""
    name = str(request.param)
    if name == "memory":
        yield Backend(name, "memory://", keyedbus.TopicConfig())
        return
    request.applymarker(pytest.mark.nats)
    gap = request.node.get_closest_marker("memory_only")
    if gap is not None:
        pytest.skip(f"{name}: {gap.args[0]}")
    excluded = request.node.get_closest_marker("not_on")
    if excluded is not None and name in excluded.args:
        pytest.skip(f"{name}: {excluded.kwargs['reason']}")
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    topic = keyedbus.TopicConfig(persistence="ephemeral" if name == "nats-core" else "persistent")
    try:
        yield Backend(name, server.url, topic)
    finally:
        server.stop()


@pytest.fixture
def clock(backend: Backend) -> trio.testing.MockClock | None:
    """A virtual clock that jumps while every task waits (memory only: real sockets need real time)."""
    return trio.testing.MockClock(autojump_threshold=0) if backend.virtual_time else None


def all_tasks() -> int:
    """Tasks alive in this trio run, the root task included (for tests of what outlives what)."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count, stack = 0, [root]
    while stack:
        task = stack.pop()
        count += 1
        stack.extend(t for n in task.child_nurseries for t in n.child_tasks)
    return count
