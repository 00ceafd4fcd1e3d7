"""NATS-specific behaviour against a real nats-server started by the test."""

from __future__ import annotations

import pytest
import trio

import keyedbus

from .nats_server import NatsServer, free_port

pytestmark = pytest.mark.nats


async def test_an_unreachable_server_fails_within_connect_timeout_naming_the_url() -> None:
    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"
    start = trio.current_time()
    with pytest.raises(keyedbus.ConnectionFailedError) as info:
        async with keyedbus.open_bus(url, connect_timeout=1.0):
            pass  # pragma: no cover
    assert trio.current_time() - start < 5
    assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert "alice" not in str(info.value)


async def test_publish_and_consume_on_both_persistences(nats_server: NatsServer) -> None:
    got: dict[str, list[bytes]] = {"ephemeral": [], "persistent": []}
    both = trio.Event()

    def make(kind: str) -> keyedbus._bus.Handler[keyedbus.Message]:
        async def handler(msg: keyedbus.Message) -> None:
            got[kind].append(msg.data)
            if all(len(v) == 20 for v in got.values()):
                both.set()

        return handler

    with trio.fail_after(30):
        async with keyedbus.open_bus(nats_server.url) as bus:
            assert bus.statistics().connected
            await bus.configure_topic("ticks", keyedbus.TopicConfig(persistence="ephemeral"))
            await bus.subscribe("ticks", make("ephemeral"))
            await bus.subscribe("orders", make("persistent"))
            for i in range(20):
                await bus.publish("ticks", str(i).encode(), key="k")
                await bus.publish("orders", str(i).encode(), key="k")
            await both.wait()
    expected = [str(i).encode() for i in range(20)]
    assert got == {"ephemeral": expected, "persistent": expected}


async def test_a_retried_publish_is_stored_once_on_jetstream(nats_server: NatsServer) -> None:
    got: list[bytes] = []
    second = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        got.append(msg.data)
        if msg.data == b"after":
            second.set()

    with trio.fail_after(30):
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.subscribe("orders", handler)
            await bus.publish("orders", b"once", key="k", message_id="m-1")
            await bus.publish("orders", b"once", key="k", message_id="m-1")
            await bus.publish("orders", b"after", key="k")
            await second.wait()
    assert got == [b"once", b"after"]
