"""keyedbus.blocking: the sync facade, driven from plain sync tests, from inside a running asyncio loop (as in
a notebook), and interrupted with Ctrl-C in a real process."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

import keyedbus
import keyedbus.blocking
from keyedbus.testing import NatsServer

FAST_RETRY = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=0.01, jitter=0.0)


class SyncOrder:
    """Records what sync handlers (in several threads) saw: per key, in order, never two at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self.expected: dict[str, list[bytes]] = {}
        self.seen: dict[str, list[bytes]] = {}
        self.overlaps: list[str] = []
        self.threads: set[int] = set()

    def published(self, key: str, data: bytes) -> None:
        self.expected.setdefault(key, []).append(data)

    def handler(self, msg: keyedbus.Message) -> None:
        assert msg.key is not None
        with self._lock:
            if msg.key in self._running:
                self.overlaps.append(msg.key)
            self._running.add(msg.key)
            self.threads.add(threading.get_ident())
        # Another thread would get the GIL here if it were running the same key.
        threading.Event().wait(0.0005)
        with self._lock:
            self._running.discard(msg.key)
            self.seen.setdefault(msg.key, []).append(msg.data)

    def assert_in_order(self) -> None:
        assert self.overlaps == []
        assert self.seen == self.expected


def test_sync_handlers_run_in_worker_threads_in_key_order() -> None:
    checker = SyncOrder()
    with keyedbus.blocking.open_bus(sync_handler_threads=4) as bus:
        bus.subscribe("orders", checker.handler)  # a plain function: runs in worker threads
        for i in range(200):
            key = f"order-{i % 7}"
            checker.published(key, str(i).encode())
            bus.publish("orders", str(i).encode(), key=key)
    # Leaving the block drained: everything published was handled, each key in order, one at a time.
    checker.assert_in_order()
    assert threading.get_ident() not in checker.threads
    assert 2 <= len(checker.threads) <= 4  # concurrent across keys, bounded by sync_handler_threads


def test_async_handlers_run_in_the_portal_and_statistics_are_readable() -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def on_audit(msg: keyedbus.Message) -> None:
        await trio.lowlevel.checkpoint()  # a trio call works: this runs in the portal's trio thread
        seen.append((msg.key, msg.data))

    with keyedbus.blocking.open_bus() as bus:
        sub = bus.subscribe("audit", on_audit)
        assert (sub.topic, sub.group) == ("audit", None)
        bus.publish("audit", b"a", key="k")
        bus.publish_envelope(
            "audit",
            keyedbus.Envelope(aggregate_id="k", event_type="Noted", event_version=1, payload={"n": 1}),
        )
        sub.unsubscribe()
        stats = bus.statistics()
    assert [key for key, _ in seen] == ["k", "k"]
    assert seen[0][1] == b"a"
    assert stats.handled == 2
    assert "handled=2" in str(stats)


def test_envelopes_retries_and_dead_letters_behave_as_in_the_async_api() -> None:
    attempts: list[int] = []
    dead: list[keyedbus.Message] = []

    def failing(event: keyedbus.Envelope) -> None:
        attempts.append(1)
        raise RuntimeError(f"cannot handle {event.aggregate_id}")

    def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    with keyedbus.blocking.open_bus() as bus:  # the default policy: 5 attempts
        sub = bus.subscribe_envelope("orders", failing, group="billing", retry=FAST_RETRY)
        assert sub.group == "billing"
        bus.subscribe("orders.dead-letter", on_dead)
        bus.publish_envelope(
            "orders",
            keyedbus.Envelope(aggregate_id="order-9", event_type="Placed", event_version=1, payload={}),
        )
    assert len(attempts) == 2
    assert [m.key for m in dead] == ["order-9"]
    assert dead[0].headers["Keyedbus-Error"] == "RuntimeError: cannot handle order-9"


def test_the_same_errors_as_the_async_api() -> None:
    async def ok(msg: keyedbus.Message) -> None:
        pass

    with keyedbus.blocking.open_bus() as bus:
        with pytest.raises(keyedbus.InvalidTopicError, match=r"invalid topic"):
            bus.publish("bad topic", b"x")
        with pytest.raises(keyedbus.ArgumentTypeError):
            bus.publish("orders", "not bytes")  # type: ignore[arg-type]
        bus.subscribe("orders", ok)
        with pytest.raises(keyedbus.DuplicateSubscriptionError):
            bus.subscribe("orders", ok)
        with pytest.raises(keyedbus.InvalidHandlerError):
            bus.subscribe("other", 42)  # type: ignore[arg-type]
    with pytest.raises(
        keyedbus.BusClosedError,
        match=r"^this blocking bus is closed: use it inside its 'with keyedbus.blocking.open_bus\(\)' block$",
    ):
        bus.publish("orders", b"late")
    with pytest.raises(keyedbus.InvalidConfigError), keyedbus.blocking.open_bus("memory://nope"):
        pass
    with pytest.raises(keyedbus.InvalidConfigError, match=r"sync_handler_threads"):
        keyedbus.blocking.open_bus(sync_handler_threads=0).__enter__()


def test_an_error_in_the_block_propagates_as_itself() -> None:
    class Oops(Exception):
        pass

    def script() -> None:
        with keyedbus.blocking.open_bus() as bus:
            bus.publish("orders", b"x")
            raise Oops

    with pytest.raises(Oops):
        script()


NOTEBOOK = """
import asyncio, sys
import keyedbus, keyedbus.blocking

def cell(url):
    got = []
    with keyedbus.blocking.open_bus(url) as bus:
        bus.subscribe("cells", lambda msg: got.append(msg.data))
        for i in range(3):
            bus.publish("cells", str(i).encode(), key="k")
    return got

async def kernel():  # a notebook kernel: one asyncio loop runs every cell
    for url in sys.argv[1:]:
        print(url.partition(":")[0], cell(url), flush=True)
        await asyncio.sleep(0.001)  # the kernel's own loop keeps running between cells

asyncio.run(kernel())
"""


@pytest.mark.nats
def test_from_inside_a_running_asyncio_loop_as_in_a_notebook(nats_server: NatsServer) -> None:
    # A fresh interpreter, as a kernel is: this test process has imported trio-asyncio, which re-routes
    # the asyncio loops created after it. The nats:// cell imports it in the kernel, between memory cells.
    urls = ["memory://", nats_server.url, "memory://", nats_server.url]
    done = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, *urls], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{scheme} [b'0', b'1', b'2']" for scheme in ("memory", "nats") * 2]
    assert done.stderr == ""


def test_a_sync_handler_may_publish_through_the_blocking_bus() -> None:
    forwarded: list[bytes] = []

    with keyedbus.blocking.open_bus() as bus:

        def forward(msg: keyedbus.Message) -> None:
            bus.publish("out", msg.data.upper(), key=msg.key)

        bus.subscribe("in", forward)
        bus.subscribe("out", lambda msg: forwarded.append(msg.data))
        bus.publish("in", b"x", key="k")
    assert forwarded == [b"X"]


@pytest.mark.nats
def test_on_jetstream(nats_server: NatsServer) -> None:
    checker = SyncOrder()
    with keyedbus.blocking.open_bus(nats_server.url) as bus:
        bus.subscribe("orders", checker.handler)
        for i in range(50):
            key = f"k{i % 3}"
            checker.published(key, str(i).encode())
            bus.publish("orders", str(i).encode(), key=key)
    checker.assert_in_order()


INTERRUPTED = """
import os, signal, sys, threading
import keyedbus, keyedbus.blocking

# Ctrl-C as a terminal gives it, even when the test run itself was started in the background by a shell
# without job control (which makes its children inherit SIGINT ignored: this test then hung for 60 s).
signal.signal(signal.SIGINT, signal.default_int_handler)

started = threading.Event()

def slow(msg):
    os.write(1, b"handler running\\n")
    started.set()

try:
    with keyedbus.blocking.open_bus() as bus:
        bus.subscribe("orders", slow)
        bus.publish("orders", b"x", key="k")
        started.wait(30)
        os.write(1, b"ready\\n")
        threading.Event().wait(60)  # Ctrl-C comes here
except KeyboardInterrupt:
    # Idle daemon threads (trio's thread cache) may linger; none may keep the process alive.
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    os.write(1, f"interrupted; threads left: {others}\\n".encode())
"""


async def test_ctrl_c_stops_the_bus_and_its_thread_cleanly(tmp_path: Path) -> None:
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, str(script)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            assert process.stdout is not None
            assert process.stderr is not None
            out = b""
            while b"ready" not in out:
                chunk = await process.stdout.receive_some()
                assert chunk, out
                out += chunk
            process.send_signal(signal.SIGINT)
            async for chunk in process.stdout:
                out += chunk
            err = b""
            async for chunk in process.stderr:
                err += chunk
    assert process.returncode == 0, err
    assert out.decode().splitlines() == ["handler running", "ready", "interrupted; threads left: []"]
    assert err == b""


def test_import_keyedbus_does_not_import_anyio() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import sys, keyedbus; print('anyio' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ},
    )
    assert done.stdout == "False\n"
