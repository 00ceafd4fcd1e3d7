"""Message-level rules that hold on every backend: header names, the key header, keys from the wire,
hostile envelope bytes, and dead letters that can always be written and never act on the server."""

from __future__ import annotations

import json
import random

import pytest
import trio

import keyedbus
from keyedbus._messages import (
    dead_letter_headers,
    key_of_headers,
    replay_headers,
    wire_key_problem,
    wire_size,
)
from keyedbus.testing import wait_until_handled

from .test_envelope import _valid

# --- header names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X(odd)", "a/b", "a b", "a:b", "é", "a[1]", "a,b", "a;b", "a=b", '"q"', ""])
async def test_header_names_nats_refuses_are_refused_on_memory_too(name: str, autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        with pytest.raises(keyedbus.InvalidHeaderError, match=r"RFC 7230 token"):
            await bus.publish("orders", b"x", headers={name: "v"})


@pytest.mark.parametrize("name", ["X-Foo", "x_y.z", "A~!#$%&'*+^`|", "Nats-Expected-Stream", "0"])
async def test_header_names_nats_accepts_travel_unchanged(name: str, autojump_clock: object) -> None:
    seen: list[keyedbus.Message] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler)
        await bus.publish("orders", b"x", headers={name: "  v  "})
    assert seen[0].headers[name] == "v"  # trimmed, as NATS clients trim values


def test_a_header_value_with_a_lone_surrogate_is_refused() -> None:
    from keyedbus._messages import check_headers

    with pytest.raises(keyedbus.InvalidHeaderError, match=r"not valid Unicode"):
        check_headers({"X-Foo": "a\udcffb"})


# --- the key header --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X-Aggregate-ID", "X-Aggregate-Id", "x-aggregate-id", "X-AGGREGATE-ID"])
def test_the_key_header_is_found_in_any_case(name: str) -> None:
    assert key_of_headers({"Other": "1", name: "order-1"}) == "order-1"


def test_an_empty_key_header_means_keyless() -> None:
    assert key_of_headers({"X-Aggregate-Id": ""}) is None
    assert key_of_headers({}) is None


async def test_a_key_header_in_go_case_orders_like_key_on_memory(autojump_clock: object) -> None:
    running: set[str] = set()
    overlaps: list[str] = []
    done: list[tuple[str | None, bytes]] = []

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        if msg.key in running:
            overlaps.append(msg.key)
        running.add(msg.key)
        await trio.sleep(0.01 * (3 - int(msg.data)))  # earlier messages take longer
        running.discard(msg.key)
        done.append((msg.key, msg.data))

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler)
        for i in range(3):
            await bus.publish("orders", str(i).encode(), headers={"X-Aggregate-Id": "order-1"})
    assert overlaps == []
    assert done == [("order-1", b"0"), ("order-1", b"1"), ("order-1", b"2")]


async def test_publish_refuses_a_key_header_that_breaks_the_key_rule(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        with pytest.raises(keyedbus.InvalidKeyError, match=r"^header X-Aggregate-ID 'a b' has a space"):
            await bus.publish("orders", b"x", headers={"x-aggregate-id": "a b"})
        with pytest.raises(keyedbus.InvalidHeaderError, match=r"given twice"):
            await bus.publish("orders", b"x", headers={"X-Aggregate-ID": "a", "X-Aggregate-Id": "a"})
        with pytest.raises(keyedbus.InvalidHeaderError, match=r"contradicts key="):
            await bus.publish("orders", b"x", key="b", headers={"X-Aggregate-Id": "a"})


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("order 123", "has a space"),
        ("a" * 300, "too long (300)"),
        ("ordér-1", "has a non-ASCII character 'é'"),
        ("user@example.com", "has an invalid character '@'"),
        ("a\nb", "has a whitespace character '\\n'"),
        ("a\tb", "has a whitespace character '\\t'"),
    ],
)
def test_keys_from_the_wire_that_break_the_rule_get_a_reason(key: str, problem: str) -> None:
    reason = wire_key_problem(key)
    assert reason is not None
    assert reason.startswith("InvalidKeyError: X-Aggregate-ID header ")
    assert problem in reason
    assert wire_key_problem("tenant:7/user_9.profile-v2") is None


def test_a_key_with_a_line_break_is_not_reported_as_a_space() -> None:
    with pytest.raises(keyedbus.InvalidKeyError, match=r"^key 'a\\nb' has a whitespace character '\\n'; "):
        keyedbus._messages.check_key("a\nb")


async def test_a_key_function_returning_a_key_that_breaks_the_rule_dead_letters(
    autojump_clock: object,
) -> None:
    dead: list[keyedbus.Message] = []
    handled: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        handled.append(msg.data)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("users", handler, key=lambda m: m.headers.get("Email"))
        await bus.subscribe("users.dead-letter", on_dead)
        await bus.publish("users", b"1", headers={"Email": "user@example.com"})
        await bus.publish("users", b"2", headers={"Email": "user-example.com"})
    assert handled == [b"2"]
    assert [m.data for m in dead] == [b"1"]
    assert dead[0].headers["Keyedbus-Error"] == (
        "InvalidKeyError: key function returned 'user@example.com', which has an invalid character '@'"
    )


# --- hostile envelope bytes ------------------------------------------------------------------------------


def _hostile() -> list[bytes]:
    valid = [line.encode() for line in _valid()]
    base = json.loads(_valid()[0])
    cases = [
        b"",
        b" ",
        b"\xff\xfe",
        b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"9" * 5000,
        b"1e999",
        b"NaN",
        b'"\\ud800"',
        json.dumps({**base, "timestamp": "2025-10-13T08:15:00+99:00"}).encode(),
        json.dumps({**base, "timestamp": "2025-10-13T08:15:00+23:60"}).encode(),
        json.dumps({**base, "timestamp": "0000-01-01T00:00:00Z"}).encode(),
        json.dumps({**base, "timestamp": "2025-02-30T00:00:00Z"}).encode(),
        json.dumps({**base, "timestamp": "2025-10-13T25:00:00Z"}).encode(),
        json.dumps({**base, "timestamp": "２０２５-10-13T00:00:00Z"}).encode(),  # noqa: RUF001 - wide digits
        json.dumps({**base, "event_version": 10**30}).encode(),
        json.dumps({**base, "event_version": 1.5}).encode(),
        json.dumps({**base, "event_version": True}).encode(),
        json.dumps({**base, "tenant_id": -1}).encode(),
        json.dumps({**base, "tenant_id": 10**30}).encode(),
        json.dumps({**base, "payload": 1e308}).encode().replace(b"1e+308", b"1e999"),
        json.dumps({**base, "payload": "x"}).encode().replace(b'"x"', b'"\\udc00"'),
        json.dumps({**base, "event_type": "x"}).encode().replace(b'"x"', b'"\\ud800"'),
        json.dumps({**base, "payload": [[[]]]}).encode().replace(b"[[[]]]", b"[" * 5000 + b"]" * 5000),
        json.dumps({**base, "aggregate_id": "x" * 10_000}).encode(),
        json.dumps({**base, "aggregate_id": None}).encode(),
        json.dumps({**base, "timestamp": 17}).encode(),
    ]
    rng = random.Random(20261130)
    for _ in range(400):  # mutations of valid envelopes: flipped bytes, cuts, splices
        sample = bytearray(rng.choice(valid))
        kind = rng.randrange(3)
        if kind == 0:
            for _ in range(rng.randrange(1, 4)):
                sample[rng.randrange(len(sample))] = rng.randrange(256)
        elif kind == 1:
            del sample[rng.randrange(len(sample)) :]
        else:
            at = rng.randrange(len(sample))
            sample[at:at] = rng.choice(valid)[: rng.randrange(40)]
        cases.append(bytes(sample))
    cases += [rng.randbytes(rng.randrange(64)) for _ in range(100)]
    return cases


def test_envelope_decode_raises_only_invalid_envelope_error_whatever_the_bytes() -> None:
    refused = 0
    reasons: list[str] = []
    for data in _hostile():
        try:
            envelope = keyedbus.Envelope.decode(data)
        except keyedbus.InvalidEnvelopeError as exc:
            refused += 1
            reasons.append(exc.reason)
        else:
            # Whatever decodes must encode again (nothing that cannot be sent back as UTF-8 gets in).
            assert keyedbus.Envelope.decode(envelope.encode()) == envelope
    assert all(reasons)
    assert refused > 400  # the catalogue is mostly hostile; a parser that accepted everything fails here


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty payload (0 bytes)"),
        (b"[" * 100_000, "nested too deeply"),
        (b"9" * 5000, "not JSON (a number too long to read)"),
        (b"\xff", "invalid UTF-8"),
    ],
)
def test_hostile_envelopes_are_refused_naming_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(keyedbus.InvalidEnvelopeError) as info:
        keyedbus.Envelope.decode(data)
    assert info.value.reason == reason


def test_a_timestamp_offset_beyond_a_day_is_not_rfc_3339() -> None:
    line = json.loads(_valid()[0])
    line["timestamp"] = "2025-10-13T08:15:00+99:00"
    with pytest.raises(keyedbus.InvalidEnvelopeError) as info:
        keyedbus.Envelope.decode(json.dumps(line).encode())
    assert info.value.reason == "timestamp not RFC 3339"


async def test_hostile_envelopes_are_dead_lettered_and_the_bus_goes_on(autojump_clock: object) -> None:
    cases = [c for c in _hostile()[:30] if c]  # the catalogue's named cases
    handled: list[str] = []
    dead: list[keyedbus.Message] = []

    async def on_event(env: keyedbus.Envelope) -> None:
        handled.append(env.event_type)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe_envelope("orders", on_event)
        await bus.subscribe("orders.dead-letter", on_dead)
        for data in cases:
            await bus.publish("orders", data, key="k")
        await bus.publish("orders", b"")
        await bus.publish_envelope(
            "orders", keyedbus.Envelope(aggregate_id="k", event_type="Last", event_version=1)
        )
        await wait_until_handled(bus)
    accepted = [c for c in cases if _decodes(c)]
    assert len(handled) == len(accepted) + 1
    assert handled[-1] == "Last"
    assert len(dead) == len(cases) - len(accepted) + 1
    assert all(m.headers["Keyedbus-Error"].startswith("InvalidEnvelopeError: ") for m in dead)
    # The keyless one runs concurrently with key k's messages (no order across keys): find it by its key.
    [empty] = [m for m in dead if m.key is None]
    assert empty.headers["Keyedbus-Error"].startswith("InvalidEnvelopeError: empty payload (0 bytes)")


def _decodes(data: bytes) -> bool:
    try:
        keyedbus.Envelope.decode(data)
    except keyedbus.InvalidEnvelopeError:
        return False
    return True


# --- dead letters ----------------------------------------------------------------------------------------

SERVER_HEADERS = {
    "Nats-Expected-Stream": "KB_orders",
    "Nats-Expected-Last-Sequence": "7",
    "Nats-Expected-Last-Subject-Sequence": "3",
    "Nats-Expected-Last-Msg-Id": "m-6",
    "Nats-Msg-Id": "m-7",
    "Nats-Rollup": "sub",
    "Nats-TTL": "1s",
    "Nats-Batch-Id": "b1",
    "Nats-Batch-Sequence": "1",
    "Nats-Batch-Commit": "1",
}


def test_dead_letter_headers_keep_server_headers_only_under_the_original_prefix() -> None:
    out = dead_letter_headers(
        {**SERVER_HEADERS, "X-Aggregate-Id": "order-1", "Trace": "t1"},
        key="order-1",
        error="RuntimeError: boom",
        attempts=5,
        topic="orders",
    )
    assert not [name for name in out if name.lower().startswith("nats-")]
    for name, value in SERVER_HEADERS.items():
        assert out[f"Keyedbus-Original-{name}"] == value
    assert out["X-Aggregate-ID"] == "order-1"
    assert "X-Aggregate-Id" not in out
    assert out["Trace"] == "t1"
    assert (out["Keyedbus-Error"], out["Keyedbus-Attempts"], out["Keyedbus-Original-Topic"]) == (
        "RuntimeError: boom",
        "5",
        "orders",
    )
    assert "Keyedbus-Rewritten-Headers" not in out
    keyedbus._messages.check_headers(out)  # sendable on every backend


def test_a_dead_letter_is_sendable_whatever_the_original_headers_were() -> None:
    out = dead_letter_headers(
        {"X(odd)": "1", "a/b": "2", "Bad-Bytes": "caf\udce9", "X-Aggregate-ID": "order 1"},
        key="order 1",
        error="InvalidKeyError: ...\nsecond line",
        attempts=1,
        topic="orders",
    )
    keyedbus._messages.check_headers(out)
    assert out["Keyedbus-Original-X%28odd%29"] == "1"
    assert out["Keyedbus-Original-a%2Fb"] == "2"
    assert out["Bad-Bytes"] == "caf\ufffd"
    assert "X-Aggregate-ID" not in out  # the key broke the rule: the dead letter is keyless
    assert out["Keyedbus-Original-X-Aggregate-ID"] == "order 1"
    assert out["Keyedbus-Error"] == "InvalidKeyError: ... second line"
    notes = out["Keyedbus-Rewritten-Headers"]
    assert "'X(odd)' (a name NATS refuses: sent as Keyedbus-Original-X%28odd%29)" in notes
    assert "Bad-Bytes (value not UTF-8 or not one line: re-encoded)" in notes


def test_replay_headers_never_restore_what_the_server_acts_on() -> None:
    letter = dead_letter_headers(
        {**SERVER_HEADERS, "Trace": "t1"}, key="k", error="E", attempts=2, topic="orders"
    )
    letter["Nats-Msg-Id"] = "m-7.dead-letter"  # as the backend stores it
    assert replay_headers(letter) == {
        "Trace": "t1",
        **{f"Keyedbus-Original-{name}": value for name, value in SERVER_HEADERS.items()},
    }


def test_wire_size_counts_headers_as_nats_encodes_them() -> None:
    assert wire_size(b"abc", {}) == 3
    # NATS/1.0\r\n + "K: v\r\n" + \r\n
    assert wire_size(b"abc", {"K": "v"}) == 3 + len(b"NATS/1.0\r\nK: v\r\n\r\n")
    assert wire_size(b"", {"K": "é"}) == len("NATS/1.0\r\nK: é\r\n\r\n".encode())


# --- a dead letter always fits -------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "kept"), [(450, True), (880, False)])
async def test_a_dead_letter_that_would_not_fit_max_payload_is_shrunk_never_parked(
    autojump_clock: object, size: int, kept: bool
) -> None:
    dead: list[keyedbus.Message] = []
    handled: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        if msg.data.startswith(b"x"):
            raise RuntimeError("e" * 600)  # a long error: the dead letter's headers outgrow the original's
        handled.append(msg.data)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    retry = keyedbus.RetryPolicy(max_attempts=1)
    async with keyedbus.open_bus(max_payload=1000, retry=retry) as bus:
        await bus.subscribe("orders", handler)
        await bus.subscribe("orders.dead-letter", on_dead)
        await bus.publish("orders", b"x" * size, key="k", headers={"Trace": "t1"})
        await bus.publish("orders", b"next", key="k")
        await wait_until_handled(bus)
    assert handled == [b"next"]  # the key moved on: the dead letter was written
    [letter] = dead
    assert letter.headers["Keyedbus-Original-Topic"] == "orders"
    assert letter.headers["Keyedbus-Error"].startswith("RuntimeError: eee")
    assert len(letter.headers["Keyedbus-Error"]) == 200
    assert letter.key == "k"
    if kept:
        assert letter.data == b"x" * size
        assert letter.headers["Keyedbus-Shrunk"] == "headers shortened to fit max_payload 1000"
    else:
        assert letter.data == b""
        assert letter.headers["Keyedbus-Shrunk"].startswith(f"payload of {size} bytes left out")
    assert letter.headers["Trace"] == "t1"


def test_shrinking_keeps_keyedbus_headers_when_the_original_headers_alone_are_too_big() -> None:
    from keyedbus._messages import shrink_dead_letter

    headers = dead_letter_headers({"Big": "b" * 2000}, key="k", error="E", attempts=1, topic="orders")
    data, out = shrink_dead_letter(b"payload", headers, message_id="m", limit=1000)
    assert data == b""
    assert "Big" not in out
    assert (out["X-Aggregate-ID"], out["Keyedbus-Error"], out["Keyedbus-Original-Topic"]) == (
        "k",
        "E",
        "orders",
    )
    assert "the original's headers left out" in out["Keyedbus-Shrunk"]
    assert wire_size(data, out, "m") <= 1000


async def test_an_empty_key_header_is_keyless_on_memory_too(autojump_clock: object) -> None:
    seen: list[keyedbus.Message] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler)
        await bus.publish("orders", b"x", headers={"X-Aggregate-Id": ""})
    assert seen[0].key is None
    assert not [name for name in seen[0].headers if name.lower() == "x-aggregate-id"]


def test_replay_headers_are_sendable_whatever_a_dead_letter_topic_holds() -> None:
    out = replay_headers({"X(odd)": "1", "Bad": "caf\udce9", "Fine": "v"})
    assert out == {"Keyedbus-Original-X%28odd%29": "1", "Bad": "caf\ufffd", "Fine": "v"}
    keyedbus._messages.check_headers(out)
