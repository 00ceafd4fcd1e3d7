"""The Go system's JSON envelope: interop samples, validation on construction, round trips."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pathlib
import re
import time
import types
import uuid
from typing import Any

import pytest

import keyedbus

# A copy of shared/interop/ from the Go system, kept in the repository so the tests stand alone.
INTEROP = pathlib.Path(__file__).resolve().parent / "interop"


def _valid() -> list[str]:
    return (INTEROP / "valid.jsonl").read_text().splitlines()


def _invalid() -> list[dict[str, str]]:
    return [json.loads(line) for line in (INTEROP / "invalid.jsonl").read_text().splitlines()]


def raw_bytes(case: dict[str, str]) -> bytes:
    """The bytes of an invalid sample (given as text, or as base64 when not valid UTF-8)."""
    return case["raw"].encode() if "raw" in case else base64.b64decode(case["raw_base64"])


def _instant(text: str) -> dt.datetime:
    # Independent of keyedbus's parser: truncate the fraction to microseconds, then fromisoformat.
    head, _, rest = text.partition(".")
    if rest:
        digits = re.match(r"\d*", rest).group()  # type: ignore[union-attr]
        zone = rest[len(digits) :]
        head = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    return dt.datetime.fromisoformat(head.replace("Z", "+00:00"))


@pytest.mark.parametrize("line", _valid())
def test_valid_samples_decode_with_every_field(line: str) -> None:
    raw = json.loads(line)
    env = keyedbus.Envelope.decode(line.encode())
    assert env.aggregate_id == raw["aggregate_id"]
    assert env.event_type == raw["event_type"]
    assert env.event_version == raw["event_version"]
    assert env.timestamp == _instant(raw["timestamp"])
    assert env.trace_id == raw.get("trace_id", "")
    assert env.correlation_id == raw.get("correlation_id", "")
    assert env.tenant_id == raw.get("tenant_id", 0)
    assert env.payload == raw["payload"]
    assert env.event_id == raw.get("event_id", "")


@pytest.mark.parametrize("line", _valid())
def test_valid_samples_round_trip(line: str) -> None:
    env = keyedbus.Envelope.decode(line.encode())
    again = keyedbus.Envelope.decode(env.encode())
    assert again == env
    original: dict[str, Any] = json.loads(line)
    encoded: dict[str, Any] = json.loads(env.encode())
    original.setdefault("event_id", "")
    assert _instant(encoded.pop("timestamp")) == _instant(original.pop("timestamp"))
    assert encoded == original


def test_int64_version_survives_exactly() -> None:
    line = next(x for x in _valid() if "9007199254740993" in x)
    env = keyedbus.Envelope.decode(line.encode())
    assert env.event_version == 2**53 + 1
    assert b'"event_version":9007199254740993' in env.encode()


def test_offset_is_kept_on_the_wire() -> None:
    line = next(x for x in _valid() if "+08:00" in x)
    encoded = json.loads(keyedbus.Envelope.decode(line.encode()).encode())
    assert encoded["timestamp"] == "2025-10-13T08:15:00.123456+08:00"


@pytest.mark.parametrize("case", _invalid(), ids=lambda c: c["reason"])
def test_invalid_samples_are_refused_naming_the_reason(case: dict[str, str]) -> None:
    raw = raw_bytes(case)
    with pytest.raises(keyedbus.InvalidEnvelopeError) as info:
        keyedbus.Envelope.decode(raw)
    assert case["reason"] in str(info.value)
    assert info.value.reason.startswith(case["reason"].split(" (")[0])
    assert isinstance(info.value, ValueError)


def test_construction_defaults() -> None:
    env = keyedbus.Envelope(aggregate_id="order-1", event_type="Placed", event_version=1)
    assert env.timestamp.tzinfo is not None
    assert env.payload is None
    assert len(env.event_id) == 36
    later = keyedbus.Envelope(aggregate_id="order-1", event_type="Placed", event_version=1)
    assert later.event_id != env.event_id
    assert later.event_id[:8] >= env.event_id[:8]  # time-ordered (UUIDv7 layout)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"aggregate_id": ""},
            r"^aggregate_id empty; use 1\.\.256 characters of A-Z a-z 0-9 : _ - \. /, e\.g\. 'order-123'$",
        ),
        ({"aggregate_id": "a b"}, r"^aggregate_id has a space; .*$"),
        ({"aggregate_id": "a" * 257}, r"^aggregate_id too long \(257\); .*$"),
        ({"aggregate_id": "a!"}, r"^aggregate_id has an invalid character '!'; .*$"),
        ({"event_type": " "}, r"^event_type blank; give the event's type name, e\.g\. 'OrderPlaced'$"),
        ({"event_version": 0}, r"^event_version zero; use an int > 0$"),
        ({"event_version": -3}, r"^event_version out of range \(-3\); use an int between 1 and 2\*\*63-1$"),
        ({"event_version": 2**63}, r"^event_version out of range .*$"),
        ({"event_version": 1.0}, r"^event_version not an integer; use an int > 0$"),
        ({"event_version": True}, r"^event_version not an integer; use an int > 0$"),
        ({"tenant_id": -1}, r"^tenant_id invalid \(-1\); use an int >= 0 \(0 means no tenant\)$"),
        ({"payload": {1, 2}}, r"^payload not JSON \(set is not a JSON value\); .*$"),
        ({"payload": float("nan")}, r"^payload not JSON .*$"),
        ({"timestamp": dt.datetime(2025, 1, 1)}, r"^timestamp has no time zone; .*$"),
    ],
)
def test_invalid_construction(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"aggregate_id": "k", "event_type": "T", "event_version": 1}
    with pytest.raises(keyedbus.InvalidEnvelopeError, match=message):
        keyedbus.Envelope(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"aggregate_id": 5}, keyedbus.ArgumentTypeError),
        ({"event_type": None}, keyedbus.ArgumentTypeError),
        ({"timestamp": "2025-01-01"}, keyedbus.ArgumentTypeError),
        ({"trace_id": 1}, keyedbus.ArgumentTypeError),
    ],
)
def test_wrong_types_are_type_errors(fields: dict[str, Any], error: type[Exception]) -> None:
    base: dict[str, Any] = {"aggregate_id": "k", "event_type": "T", "event_version": 1}
    with pytest.raises(error) as info:
        keyedbus.Envelope(**{**base, **fields})
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, keyedbus.KeyedBusError)


def test_surrounding_spaces_are_trimmed_like_the_go_system() -> None:
    assert keyedbus.Envelope(aggregate_id="  k-1 ", event_type="T", event_version=1).aggregate_id == "k-1"


def test_decode_refuses_str() -> None:
    with pytest.raises(keyedbus.ArgumentTypeError, match=r"^Envelope\.decode takes bytes, got str$"):
        keyedbus.Envelope.decode("{}")  # type: ignore[arg-type]


def test_nanoseconds_truncate_to_microseconds() -> None:
    raw = (
        b'{"aggregate_id":"k","event_type":"T","event_version":1,'
        b'"timestamp":"2025-10-13T00:00:00.999999999Z","payload":1}'
    )
    assert keyedbus.Envelope.decode(raw).timestamp.microsecond == 999999


def _event_id() -> str:
    return keyedbus.Envelope(aggregate_id="order-1", event_type="Placed", event_version=1).event_id


def test_generated_ids_are_unique_ordered_uuid7s() -> None:
    # Ids are counted within a millisecond from a random start: 20,000 in a row span several milliseconds.
    ids = [_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # one process's ids are time-ordered, within a millisecond too
    for text in ids[:3] + ids[-3:]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_repeat_its_parents_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    # One millisecond for parent and child: a child that kept its parent's counter would repeat its ids.
    now = time.time_ns()
    monkeypatch.setattr(keyedbus._messages, "time", types.SimpleNamespace(time_ns=lambda: now))
    _event_id()  # the parent has a counter going for this millisecond
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, in one write
        os.close(read)
        os.write(write, " ".join(_event_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    parent = {_event_id() for _ in range(100)}
    with os.fdopen(read, "rb") as pipe:
        child = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    assert len(child) == 100
    assert not parent & child
