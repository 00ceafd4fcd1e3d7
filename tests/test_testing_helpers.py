"""keyedbus.testing as users meet it: the plugin fixtures (through pytester), the wait, the order checker."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

import keyedbus
from keyedbus.testing import NatsServer, OrderChecker, wait_until_handled

pytest_plugins = ["pytester"]

USER_TESTS = """
import pytest, trio, keyedbus
from keyedbus.testing import OrderChecker, wait_until_handled

async def test_memory_bus_fixture(keyedbus_bus):
    checker = OrderChecker()
    async def handler(msg):
        await trio.sleep(0)
    await keyedbus_bus.subscribe("orders", checker.wrap(handler))
    for i in range(20):
        checker.published(f"k{i % 3}", str(i).encode())
        await keyedbus_bus.publish("orders", str(i).encode(), key=f"k{i % 3}")
    await wait_until_handled(keyedbus_bus)
    checker.assert_in_order()

@pytest.mark.nats
async def test_nats_fixtures(keyedbus_nats_server, keyedbus_nats_bus):
    got = []
    async def handler(msg):
        got.append(msg.data)
    await keyedbus_nats_bus.subscribe("orders", handler)
    await keyedbus_nats_bus.publish("orders", b"hello", key="k")
    with trio.fail_after(20):
        await wait_until_handled(keyedbus_nats_bus)
    assert got == [b"hello"]
    assert keyedbus_nats_server.url.startswith("nats://127.0.0.1:")
"""


def test_the_plugin_fixtures_work_in_a_users_test_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\nmarkers = nats\n")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=2)


async def test_wait_until_handled_waits_for_retries_and_dead_letters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts = 0
    dead: list[bytes] = []

    async def flaky(msg: keyedbus.Message) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("always")

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg.data)

    retry = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=5, jitter=0)
    async with keyedbus.open_bus(retry=retry) as bus:
        await bus.subscribe("orders", flaky)
        await bus.subscribe("orders.dead-letter", on_dead)
        await bus.publish("orders", b"x", key="k")
        start = trio.current_time()
        await wait_until_handled(bus)
        assert trio.current_time() - start == 5 + 10  # both backoffs, then the dead letter
        assert (attempts, dead) == (3, [b"x"])


async def test_the_order_checker_catches_reordering_and_missing_messages() -> None:
    checker = OrderChecker()
    for value in (b"1", b"2", b"3"):
        checker.published("k", value)

    async def handler(_: keyedbus.Message) -> None:
        await trio.lowlevel.checkpoint()

    wrapped = checker.wrap(handler)
    for value in (b"1", b"3"):
        await wrapped(keyedbus.Message(topic="t", data=value, key="k", headers={}, attempt=1, message_id="m"))
    with pytest.raises(AssertionError) as info:
        checker.assert_in_order()
    assert "b'3' handled where b'2' was next" in str(info.value)
    assert "never handled" in str(info.value)


def test_a_nats_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path: Path) -> None:
    # free_port() closes the port it found, so another process may bind it before nats-server does (the CI
    # rehearsal of 2026-12-02: a three-node cluster test failed, "bind: address already in use", and the
    # server that failed was left unreaped). A first start now takes another port.
    server = NatsServer(tmp_path / "js")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", server.port))
        taken.listen()
        with server:
            assert server.running
            assert server.port != taken.getsockname()[1]
            assert server.url == f"nats://127.0.0.1:{server.port}"


def test_a_nats_server_that_cannot_start_raises_with_its_log_and_is_not_left_running(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "js", args=("--no-such-flag",))
    with pytest.raises(RuntimeError, match=f"nats-server did not start on port {server.port}") as raised:
        server.start()
    assert "no-such-flag" in str(raised.value)  # its own log says why
    assert server.process is not None
    assert server.process.returncode is not None  # reaped: not a zombie, no ResourceWarning
    assert server.process.stderr is not None
    assert server.process.stderr.closed
