"""Shared fixtures: the backends every conformance test runs against."""

from __future__ import annotations

import pytest
import trio
import trio.testing

#: Bus URLs the conformance suite runs against. The NATS backends join this list when they exist.
BACKENDS = ["memory://"]


@pytest.fixture(params=BACKENDS)
def bus_url(request: pytest.FixtureRequest) -> str:
    """The URL of a backend to run a guarantee against."""
    return str(request.param)


@pytest.fixture
def clock(bus_url: str) -> trio.testing.MockClock | None:
    """A virtual clock that jumps while every task waits (memory only: real sockets need real time)."""
    return trio.testing.MockClock(autojump_threshold=0) if bus_url.startswith("memory") else None
