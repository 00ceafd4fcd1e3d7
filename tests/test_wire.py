"""The wire as others write it: foreign clients, operators' servers, hostile bytes, limits (NATS side).

Each test starts its own nats-server; a foreign client is plain nats-py on plain asyncio in a subprocess.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import trio

import keyedbus
from keyedbus._backends.jetstream import consumer_name, stream_name
from keyedbus.testing import NatsServer, wait_until_handled

from .conftest import Backend


def test_an_untested_nats_py_version_is_refused_naming_the_supported_range() -> None:
    from keyedbus._backends import _natspy

    for version in ("2.15.1", "3.0.0"):
        with pytest.raises(keyedbus.ConnectionFailedError) as info:
            _natspy.check_version(version)
        assert str(info.value) == (
            f"nats-py {version} is installed, but keyedbus supports nats-py >=2.16,<3 only (it reads "
            "nats-py's subscription queues directly): pip install 'nats-py>=2.16,<3'"
        )
    _natspy.check_version()  # the installed one is supported
    _natspy.check_version("2.16.0rc1")


def test_jetstream_and_core_nats_share_a_connection_layer_without_importing_each_other() -> None:
    code = "import sys, keyedbus._backends.jetstream; print('keyedbus._backends.nats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


FOREIGN = Path(__file__).with_name("foreign_nats.py")


async def foreign(url: str, *ops: dict[str, Any]) -> list[Any]:
    """Run operations in a plain nats-py client on plain asyncio, in another process (see foreign_nats.py)."""
    done = await trio.run_process(
        [sys.executable, str(FOREIGN), url, json.dumps(list(ops))],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def _recorder() -> tuple[list[keyedbus.Message], Any]:
    seen: list[keyedbus.Message] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg)

    return seen, handler


@pytest.mark.nats
async def test_a_message_with_its_own_status_header_is_handled_and_acked(nats_server: NatsServer) -> None:
    seen, handler = _recorder()
    with trio.fail_after(30):
        async with keyedbus.open_bus(nats_server.url, drain_timeout=20) as bus:
            await bus.subscribe("orders", handler)
            # What a Go or JS client may well send: its own header named Status.
            await foreign(
                nats_server.url,
                {"op": "publish", "subject": "orders", "data": "a", "headers": {"Status": "200"}},
                {
                    "op": "publish",
                    "subject": "orders",
                    "data": "b",
                    "headers": {"Status": "404", "X-Aggregate-ID": "k"},
                },
                {"op": "publish", "subject": "orders", "data": "c", "headers": {"X-Aggregate-ID": "k"}},
            )
            await wait_until_handled(bus)
            assert sorted(m.data for m in seen) == [b"a", b"b", b"c"]
            assert [m.headers["Status"] for m in seen if m.data != b"c"] in (["200", "404"], ["404", "200"])
        start = trio.current_time()
    [info] = await foreign(
        nats_server.url,
        {"op": "consumer_info", "stream": stream_name("orders"), "name": consumer_name("orders", "")},
    )
    assert (info["num_ack_pending"], info["num_pending"], info["num_redelivered"]) == (0, 0, 0)
    assert trio.current_time() - start < 10  # the drain did not wait for a message it could not see


@pytest.mark.nats
@pytest.mark.parametrize("persistence", ["persistent", "ephemeral"])
async def test_a_message_over_max_payload_with_its_headers_is_refused_and_the_connection_survives(
    nats_server: NatsServer, persistence: Literal["persistent", "ephemeral"]
) -> None:
    seen, handler = _recorder()
    max_payload = 1024 * 1024  # nats-server's default
    data = b"x" * (max_payload - 16)  # fits alone; with keyedbus's headers it does not
    with trio.fail_after(30):
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.configure_topic("files", keyedbus.TopicConfig(persistence=persistence))
            await bus.subscribe("files", handler)
            with pytest.raises(keyedbus.PublishError) as info:
                await bus.publish("files", data, key="file-1", message_id="big-1")
            message = str(info.value)
            size = int(re.search(r"is (\d+) bytes", message).group(1))  # type: ignore[union-attr]
            assert size > max_payload
            assert message == (
                f"message 'big-1' for 'files' is {size} bytes ({len(data)} of data + {size - len(data)} of "
                f"encoded headers), more than the server's max_payload ({max_payload}): send a reference to "
                "the data, or raise max_payload in nats-server's config"
            )
            assert (info.value.topic, info.value.message_id) == ("files", "big-1")
            assert bus.statistics().connected
            await bus.publish("files", b"small", key="file-1")
            fits = b"x" * (max_payload - size + len(data))  # the same headers, exactly max_payload
            await bus.publish("files", fits, key="file-1", message_id="big-2")
            await wait_until_handled(bus)
            assert bus.statistics().connected
    assert [len(m.data) for m in seen] == [5, max_payload - size + len(data)]


async def test_every_publish_carries_its_message_id_on_every_backend(backend: Backend) -> None:
    seen, handler = _recorder()
    with trio.fail_after(30):
        async with backend.open() as bus:
            await bus.subscribe("ticks", handler)
            await bus.publish("ticks", b"chosen", key="k", message_id="tick-1")
            await bus.publish("ticks", b"generated", key="k")
            await wait_until_handled(bus)
    assert [m.data for m in seen] == [b"chosen", b"generated"]
    assert seen[0].message_id == "tick-1"
    assert seen[1].message_id not in ("", "tick-1")


@pytest.mark.nats
async def test_an_ephemeral_publish_carries_nats_msg_id_on_the_wire(nats_server: NatsServer) -> None:
    with trio.fail_after(30):
        async with keyedbus.open_bus(nats_server.url) as bus, trio.open_nursery() as nursery:
            await bus.configure_topic("ticks", keyedbus.TopicConfig(persistence="ephemeral"))
            got: list[Any] = []

            async def read() -> None:
                got.extend(await foreign_reader(nats_server.url, "ticks", 1, ready))

            ready = trio.Event()
            nursery.start_soon(read)
            await ready.wait()
            await bus.publish("ticks", b"t", key="k", message_id="tick-9")
    [msg] = got
    assert msg["headers"]["Nats-Msg-Id"] == "tick-9"
    assert msg["headers"]["X-Aggregate-ID"] == "k"


async def foreign_reader(url: str, subject: str, count: int, ready: trio.Event) -> list[Any]:
    """A foreign core-NATS subscriber: sets `ready` once subscribed, returns `count` messages."""
    op = {"op": "read_core", "subject": subject, "count": count}
    process = await trio.lowlevel.open_process(
        [sys.executable, str(FOREIGN), url, json.dumps([op])], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        buffer = b""
        lines: list[Any] = []
        async for chunk in process.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                lines.append(json.loads(line))
                if lines[-1] == {"ready": True}:
                    ready.set()
        assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()
    return list(lines[-1])


@pytest.mark.nats
async def test_a_publish_without_a_store_ack_says_it_may_be_stored_and_a_retry_is_safe(
    nats_server: NatsServer,
) -> None:
    seen, handler = _recorder()
    assert nats_server.process is not None
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.configure_topic("orders", keyedbus.TopicConfig())
            nats_server.process.send_signal(signal.SIGSTOP)  # the server takes the message, answers later
            try:
                with pytest.raises(keyedbus.PublishError) as info:
                    await bus.publish("orders", b"placed", key="order-1", message_id="order-1-placed")
            finally:
                nats_server.process.send_signal(signal.SIGCONT)
            assert str(info.value) == (
                "no store ack for message 'order-1-placed' on 'orders' (TimeoutError: nats: timeout): it may "
                "or may not be stored; publishing it again with message_id='order-1-placed' is safe "
                "(JetStream stores it once)"
            )
            assert (info.value.topic, info.value.message_id) == ("orders", "order-1-placed")
            assert info.value.__cause__ is not None
            await bus.publish("orders", b"placed", key="order-1", message_id="order-1-placed")
            await bus.publish("orders", b"paid", key="order-1")
            await bus.subscribe("orders", handler)
            await wait_until_handled(bus)
    assert [m.data for m in seen] == [b"placed", b"paid"]
