"""Message rules against messages other clients wrote (NATS side): the key header as Go writes it, keys that
break the rule, repeated and non-UTF-8 headers, header names NATS clients refuse, hostile envelopes.

The foreign party is plain nats-py on plain asyncio in a subprocess (tests/foreign_nats.py), or the raw NATS
protocol over a socket for bytes no client library would send.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import pytest
import trio

import keyedbus
from keyedbus.testing import NatsServer

from .test_wire import foreign

pytestmark = pytest.mark.nats

Persistence = Literal["ephemeral", "persistent"]


async def raw_publish(url: str, subject: str, messages: Sequence[tuple[Sequence[bytes], bytes]]) -> None:
    """Publish with the raw NATS protocol (HPUB): header lines exactly as given, no client library."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        info = b""
        while not info.endswith(b"\r\n"):
            info += await stream.receive_some(4096)
        assert info.startswith(b"INFO ")
        await stream.send_all(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        for lines, payload in messages:
            block = b"NATS/1.0\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
            size = len(block) + len(payload)
            await stream.send_all(
                b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(block), size, block, payload)
            )
        await stream.send_all(b"PING\r\n")
        reply = b""
        while b"PONG\r\n" not in reply:
            chunk = await stream.receive_some(4096)
            assert chunk, reply
            assert b"-ERR" not in chunk, chunk
            reply += chunk


class Recorder:
    """Records what a handler saw and wakes the test when `count` messages have arrived."""

    def __init__(self, count: int, *, fail_on: bytes | None = None) -> None:
        self.seen: list[keyedbus.Message] = []
        self.count = count
        self.fail_on = fail_on
        self.all_in = trio.Event()

    async def __call__(self, msg: keyedbus.Message) -> None:
        if self.fail_on is not None and msg.data.startswith(self.fail_on) and msg.attempt == 1:
            self.seen.append(msg)
            self._check()
            raise RuntimeError("refused on purpose")
        self.seen.append(msg)
        self._check()

    def _check(self) -> None:
        if len(self.seen) >= self.count:
            self.all_in.set()


@pytest.mark.parametrize("persistence", ["ephemeral", "persistent"])
async def test_key_headers_in_go_case_from_a_foreign_client_keep_key_order(
    nats_server: NatsServer, persistence: Persistence
) -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    done: list[tuple[str | None, int]] = []
    all_in = trio.Event()
    names = ["X-Aggregate-Id", "x-aggregate-id", "X-AGGREGATE-ID", "X-Aggregate-ID"]
    count = 24

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        if msg.key in running:
            overlaps.append(msg.key)
        running.add(msg.key)
        seq = int(msg.data)
        await trio.sleep(0.02 if seq < 4 else 0)  # early messages are slow: later ones would overtake
        running.discard(msg.key)
        done.append((msg.key, seq))
        if len(done) == count:
            all_in.set()

    op = "publish" if persistence == "persistent" else "core_publish"
    ops = [
        {"op": op, "subject": "orders", "data": str(i), "headers": {names[i % 4]: f"order-{i % 2}"}}
        for i in range(count)
    ]
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, pool=keyedbus.PoolConfig(workers=4)) as bus:
            await bus.configure_topic("orders", keyedbus.TopicConfig(persistence=persistence))
            await bus.subscribe("orders", handler)
            await foreign(nats_server.url, *ops)
            await all_in.wait()
    assert overlaps == []
    for key in ("order-0", "order-1"):
        assert [seq for k, seq in done if k == key] == [i for i in range(count) if f"order-{i % 2}" == key]


@pytest.mark.parametrize("persistence", ["ephemeral", "persistent"])
async def test_foreign_keys_that_break_the_key_rule_are_dead_lettered_with_the_reason(
    nats_server: NatsServer, persistence: Persistence
) -> None:
    bad = {
        "order 123": "has a space",
        "a" * 300: "too long (300)",
        "ordér-1": "has a non-ASCII character 'é'",
        "user@example.com": "has an invalid character '@'",
    }
    handled = Recorder(2)
    dead = Recorder(len(bad))
    op = "publish" if persistence == "persistent" else "core_publish"
    ops: list[dict[str, Any]] = [
        {"op": op, "subject": "orders", "data": key, "headers": {"X-Aggregate-Id": key}} for key in bad
    ]
    ops.append({"op": op, "subject": "orders", "data": "empty", "headers": {"X-Aggregate-Id": ""}})
    ops.append({"op": op, "subject": "orders", "data": "fine", "headers": {"X-Aggregate-Id": "order-1"}})
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            config = keyedbus.TopicConfig(persistence=persistence)
            await bus.configure_topic("orders", config)
            await bus.configure_topic("orders.dead-letter", config)
            await bus.subscribe("orders", handled)
            await bus.subscribe("orders.dead-letter", dead)
            await foreign(nats_server.url, *ops)
            await handled.all_in.wait()
            await dead.all_in.wait()
    assert sorted((m.data, m.key) for m in handled.seen) == [(b"empty", None), (b"fine", "order-1")]
    assert len(dead.seen) == len(bad)
    for letter in dead.seen:
        key = letter.data.decode()
        error = letter.headers["Keyedbus-Error"]
        assert error.startswith("InvalidKeyError: X-Aggregate-ID header "), error
        assert bad[key] in error
        assert letter.key is None  # the dead letter is keyless ...
        assert letter.headers["Keyedbus-Original-X-Aggregate-ID"] == key  # ... and keeps the bad key
    assert bus.statistics().dead_lettered == len(bad)


@pytest.mark.parametrize("persistence", ["ephemeral", "persistent"])
async def test_raw_protocol_headers_repeated_not_utf8_or_badly_named_never_park_a_key(
    nats_server: NatsServer, persistence: Persistence
) -> None:
    messages: list[tuple[list[bytes], bytes]] = [
        ([b"X-Aggregate-ID: k", b"X-Tag: a", b"X-Tag: b"], b"repeated"),
        ([b"X-Aggregate-ID: k", b"X-Tag: a", b"X-Tag: b"], b"fail-repeated"),
        ([b"X-Aggregate-ID: k", b"X-Bad: caf\xe9"], b"not-utf8"),
        ([b"X-Aggregate-ID: k", b"X(odd): 1", b"a/b: 2"], b"fail-badly-named"),
        ([b"X-Aggregate-ID: a", b"X-Aggregate-Id: b"], b"two-keys"),
        ([b"X-Aggregate-ID: k", b"N\xe4me: 1"], b"name-not-utf8"),
        ([b"X-Aggregate-ID: k"], b"last"),
    ]
    handled = Recorder(4, fail_on=b"fail-")
    dead = Recorder(5)
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, retry=keyedbus.RetryPolicy(max_attempts=1)) as bus:
            config = keyedbus.TopicConfig(persistence=persistence)
            await bus.configure_topic("orders", config)
            await bus.configure_topic("orders.dead-letter", config)
            await bus.subscribe("orders", handled)
            await bus.subscribe("orders.dead-letter", dead)
            await raw_publish(nats_server.url, "orders", messages)
            await handled.all_in.wait()
            await dead.all_in.wait()
    by_data = {m.data: m for m in handled.seen}
    # Every value of a repeated header is kept; the key's later messages ran (nothing parked).
    assert by_data[b"repeated"].headers["X-Tag"] == "a, b"
    assert [m.data for m in handled.seen] == [b"repeated", b"fail-repeated", b"fail-badly-named", b"last"]
    letters = {m.data: m.headers for m in dead.seen}
    assert set(letters) == {b"fail-repeated", b"not-utf8", b"fail-badly-named", b"two-keys", b"name-not-utf8"}
    assert letters[b"name-not-utf8"]["Keyedbus-Error"] == (
        "InvalidHeaderError: header name 'N\ufffdme' is not valid UTF-8"
    )
    assert letters[b"name-not-utf8"]["Keyedbus-Original-N%DCE4me"] == "1"
    assert letters[b"fail-repeated"]["X-Tag"] == "a, b"
    assert letters[b"not-utf8"]["Keyedbus-Error"] == "InvalidHeaderError: header 'X-Bad' is not valid UTF-8"
    assert letters[b"not-utf8"]["X-Bad"] == "caf\ufffd"
    assert "X-Bad (value not UTF-8" in letters[b"not-utf8"]["Keyedbus-Rewritten-Headers"]
    assert letters[b"fail-badly-named"]["Keyedbus-Original-X%28odd%29"] == "1"
    assert letters[b"fail-badly-named"]["Keyedbus-Original-a%2Fb"] == "2"
    assert "is repeated in the message" in letters[b"two-keys"]["Keyedbus-Error"]
    assert bus.statistics().dead_lettered == 5


@pytest.mark.parametrize("persistence", ["ephemeral", "persistent"])
async def test_hostile_envelopes_from_a_foreign_client_are_dead_lettered(
    nats_server: NatsServer, persistence: Persistence
) -> None:
    base = {"aggregate_id": "k", "event_type": "T", "event_version": 1, "timestamp": "2025-10-13T00:00:00Z"}
    hostile: list[dict[str, Any]] = [
        {"data": "[" * 100_000},  # RecursionError used to crash the bus, and every restart after it
        {"data": json.dumps({**base, "payload": 1, "timestamp": "2025-10-13T08:15:00+99:00"})},
        {"data": "9" * 5000},
        {"data": ""},
        {"data_b64": "/w=="},
        {"data": json.dumps({**base, "payload": 1}).replace('"k"', '"\\ud800"')},
    ]
    ok = keyedbus.Envelope(aggregate_id="k", event_type="Fine", event_version=1)
    handled: list[str] = []
    got_ok = trio.Event()
    dead = Recorder(len(hostile))

    async def on_event(env: keyedbus.Envelope) -> None:
        handled.append(env.event_type)
        got_ok.set()

    op = "publish" if persistence == "persistent" else "core_publish"
    ops = [{"op": op, "subject": "orders", "headers": {"X-Aggregate-Id": "k"}, **h} for h in hostile]
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            config = keyedbus.TopicConfig(persistence=persistence)
            await bus.configure_topic("orders", config)
            await bus.configure_topic("orders.dead-letter", config)
            await bus.subscribe_envelope("orders", on_event)
            await bus.subscribe("orders.dead-letter", dead)
            await foreign(nats_server.url, *ops)
            await dead.all_in.wait()
            await bus.publish_envelope("orders", ok)
            await got_ok.wait()
    assert handled == ["Fine"]
    errors = [m.headers["Keyedbus-Error"] for m in dead.seen]
    assert all(e.startswith("InvalidEnvelopeError: ") for e in errors), errors
    assert any("nested too deeply" in e for e in errors)
    assert any("timestamp not RFC 3339" in e for e in errors)
    assert any("empty payload (0 bytes)" in e for e in errors)


async def test_a_dead_letter_over_the_servers_max_payload_is_shrunk_and_the_key_moves_on(
    nats_server: NatsServer,
) -> None:
    size = 1024 * 1024 - 400  # fits with keyedbus's headers; not with a dead letter's
    handled: list[bytes] = []
    got_next = trio.Event()
    dead = Recorder(1)

    async def handler(msg: keyedbus.Message) -> None:
        if len(msg.data) == size:
            raise RuntimeError("e" * 900)
        handled.append(msg.data)
        got_next.set()

    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, retry=keyedbus.RetryPolicy(max_attempts=1)) as bus:
            await bus.subscribe("orders", handler)
            await bus.subscribe("orders.dead-letter", dead)
            await bus.publish("orders", b"x" * size, key="k")
            await bus.publish("orders", b"next", key="k")
            await got_next.wait()
            await dead.all_in.wait()
    assert handled == [b"next"]
    [letter] = dead.seen
    assert letter.data == b""
    assert letter.headers["Keyedbus-Shrunk"].startswith(f"payload of {size} bytes left out")
    assert letter.key == "k"


async def test_replayed_dead_letters_never_carry_the_headers_the_server_acts_on(
    nats_server: NatsServer,
) -> None:
    from .test_cli import cli

    got: list[keyedbus.Message] = []
    done = trio.Event()

    async def failing(msg: keyedbus.Message) -> None:
        raise RuntimeError("not yet")

    async def working(msg: keyedbus.Message) -> None:
        got.append(msg)
        if len(got) == 2:
            done.set()

    # Valid once, for the first message of the subject; restored on a replay it would be refused (10071).
    expect = {"Nats-Expected-Last-Subject-Sequence": "0"}
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, retry=keyedbus.RetryPolicy(max_attempts=1)) as bus:
            await bus.subscribe("orders", failing)
            await bus.publish("orders", b"m0", key="k", headers=expect)
        replay = await cli("dead-letters", "orders", "--replay", url=nats_server.url)
        assert replay.returncode == 0, replay.stderr
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.subscribe("orders", working, group="after-replay")
            await done.wait()
    original, replayed = got
    assert original.headers["Nats-Expected-Last-Subject-Sequence"] == "0"
    assert replayed.data == b"m0"
    assert replayed.key == "k"
    assert "Nats-Expected-Last-Subject-Sequence" not in replayed.headers
    assert replayed.headers["Keyedbus-Original-Nats-Expected-Last-Subject-Sequence"] == "0"
    assert not [
        name for name in replayed.headers if name.startswith("Keyedbus-") and "Original-Nats" not in name
    ]


def test_headers_of_messages_read_back_by_sequence_are_parsed_like_delivered_ones() -> None:
    import base64
    from types import SimpleNamespace

    from keyedbus._backends import _natspy
    from keyedbus._messages import parse_header_lines

    block = b"NATS/1.0\r\nX-Aggregate-Id: k\r\nX-Tag: caf\xc3\xa9\r\nX-Tag: b\r\nX-Bad: \xff\r\n\r\n"
    raw = SimpleNamespace(hdrs=base64.b64encode(block).decode(), headers={"X-Tag": object()})
    assert _natspy.stored_headers(raw, parse_header_lines) == {
        "X-Aggregate-ID": "k",
        "X-Tag": "café, b",
        "X-Bad": "\udcff",
    }
    assert _natspy.stored_headers(SimpleNamespace(hdrs=None), parse_header_lines) is None
