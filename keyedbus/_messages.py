"""Message and Envelope (public, frozen), their wire form, and the rules for topics, keys and headers."""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import json
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from ._errors import (
    ArgumentTypeError,
    InvalidEnvelopeError,
    InvalidHeaderError,
    InvalidKeyError,
    InvalidTopicError,
)

__all__ = [
    "ATTEMPTS_HEADER",
    "ERROR_HEADER",
    "KEY_HEADER",
    "MSG_ID_HEADER",
    "ORIGINAL_PREFIX",
    "ORIGINAL_TOPIC_HEADER",
    "REWRITTEN_HEADER",
    "SHRUNK_HEADER",
    "AggregateMessage",
    "Envelope",
    "Message",
    "check_data",
    "check_headers",
    "check_key",
    "check_topic",
    "dead_letter_headers",
    "header_problem",
    "key_problem",
    "key_of_headers",
    "make_message",
    "new_message_id",
    "parse_header_lines",
    "replay_headers",
    "shrink_dead_letter",
    "wire_key_problem",
    "wire_size",
]

#: Header that carries a raw message's key (aggregate id), as in the Go system.
KEY_HEADER = "X-Aggregate-ID"
#: The key header as matched on the wire: header names are case-insensitive for it (Go writes X-Aggregate-Id).
_KEY_HEADER_LOWER = KEY_HEADER.lower()
#: Header JetStream deduplicates on; keyedbus sets it to the message id.
MSG_ID_HEADER = "Nats-Msg-Id"
#: Headers keyedbus adds to a dead letter.
ERROR_HEADER = "Keyedbus-Error"
ATTEMPTS_HEADER = "Keyedbus-Attempts"
ORIGINAL_TOPIC_HEADER = "Keyedbus-Original-Topic"
#: What a dead letter keeps under another name: headers the server would act on, a key that broke the rule.
ORIGINAL_PREFIX = "Keyedbus-Original-"
#: Lists the headers of a dead letter that had to be renamed, re-encoded or dropped to be sent again.
REWRITTEN_HEADER = "Keyedbus-Rewritten-Headers"
#: Says what a dead letter left out to fit the broker's max_payload.
SHRUNK_HEADER = "Keyedbus-Shrunk"
#: Headers nats-server acts on when a message is published (Nats-Expected-*, Nats-Msg-Id, Nats-Rollup,
#: Nats-TTL, Nats-Batch-*, ...): every name under this prefix, so later servers' headers are covered too.
_SERVER_PREFIX = "nats-"
#: Headers keyedbus writes on a dead letter (dropped again when it is replayed).
_DEAD_LETTER_OWN = frozenset(
    n.lower() for n in (ERROR_HEADER, ATTEMPTS_HEADER, ORIGINAL_TOPIC_HEADER, REWRITTEN_HEADER, SHRUNK_HEADER)
)

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_TOPIC_RULE = (
    "a topic is dot-separated tokens of letters, digits, '_' and '-' (no empty token, no spaces, "
    "no wildcards), at most 255 characters, e.g. 'orders' or 'billing.invoices'"
)
_KEY_CHARS = re.compile(r"[A-Za-z0-9:_\-./]+")
_KEY_RULE = "use 1..256 characters of A-Z a-z 0-9 : _ - . /, e.g. 'order-123'"
#: An RFC 7230 token: what nats-py (and nats.go, nats.js) accept as a header name, so what NATS carries.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_RULE = (
    "header names are letters, digits and ! # $ % & ' * + - . ^ _ ` | ~ (an RFC 7230 token, as NATS clients "
    "require): no spaces, ':', '/', brackets or other separators"
)


#: Topic names already found valid: a program uses few topics and publishes to them over and over.
_VALID_TOPICS: set[str] = set()


def check_topic(topic: object, *, what: str = "topic") -> str:
    """Return `topic` if it is a valid topic name, else raise InvalidTopicError naming the rule."""
    if topic.__class__ is str and topic in _VALID_TOPICS:
        return topic
    if not isinstance(topic, str):
        raise ArgumentTypeError(f"{what} must be a str, got {type(topic).__name__} {topic!r}")
    if not topic or len(topic) > 255 or not all(_TOKEN.fullmatch(t) for t in topic.split(".")):
        raise InvalidTopicError(f"invalid {what} {topic!r}: {_TOPIC_RULE}")
    if len(_VALID_TOPICS) < 100_000:  # bounded, whatever a program does
        _VALID_TOPICS.add(topic)
    return topic


@functools.lru_cache(maxsize=65536)  # a key is checked when published and again when delivered
def _key_problem(key: str) -> str | None:
    """Say what is wrong with an aggregate id (already stripped), or None when it is valid."""
    if not key:
        return "empty"
    if len(key) > 256:
        return f"too long ({len(key)})"
    if _KEY_CHARS.fullmatch(key):
        return None
    bad = next(c for c in key if not _KEY_CHARS.fullmatch(c))
    if bad == " ":
        return "has a space"
    if bad.isspace():
        return f"has a whitespace character {bad!r}"
    if not bad.isascii():
        return f"has a non-ASCII character {bad!r}"
    return f"has an invalid character {bad!r}"


def check_key(key: object, *, what: str = "key") -> str:
    """Return `key` if it is a valid aggregate id, else raise InvalidKeyError (or ArgumentTypeError)."""
    if not isinstance(key, str):
        raise ArgumentTypeError(f"{what} must be a str or None, got {type(key).__name__} {key!r}")
    problem = _key_problem(key)
    if problem is not None:
        raise InvalidKeyError(f"{what} {key!r} {problem}; {_KEY_RULE}")
    return key


def check_data(data: object) -> bytes:
    """Return `data` as bytes; refuse str and everything else that is not bytes-like."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        raise ArgumentTypeError(
            "data must be bytes, got str: encode it first (data.encode()) or use publish_envelope()"
        )
    raise ArgumentTypeError(f"data must be bytes, got {type(data).__name__}")


#: Header names already found valid: a program uses few and sends them over and over.
_VALID_HEADER_NAMES: set[str] = set()


def check_headers(headers: object) -> dict[str, str]:
    """Return a copy of `headers` as a dict after checking every name and value can travel on the wire.

    The same rule holds on every backend: names are RFC 7230 tokens (what NATS clients send), values have no
    CR or LF and are valid Unicode; surrounding spaces and tabs of a value are trimmed, as NATS does. The key
    header may be written in any case (``X-Aggregate-Id``) but only once; it is stored as ``X-Aggregate-ID``.
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ArgumentTypeError(f"headers must be a Mapping[str, str] or None, got {type(headers).__name__}")
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ArgumentTypeError(
                f"headers must map str to str, got {type(name).__name__} {name!r}: {type(value).__name__}"
            )
        if name not in _VALID_HEADER_NAMES:
            if not _HEADER_NAME.fullmatch(name):
                raise InvalidHeaderError(f"header name {name!r} is not allowed: {_HEADER_RULE}")
            if len(_VALID_HEADER_NAMES) < 10_000:  # bounded, whatever a program does
                _VALID_HEADER_NAMES.add(name)
        if "\r" in value or "\n" in value:
            raise InvalidHeaderError(f"header {name!r} has a line break in its value: remove CR and LF")
        if not value.isascii() and _has_surrogate(value):
            raise InvalidHeaderError(
                f"header {name!r} has a value that is not valid Unicode (a lone surrogate): "
                "decode bytes with errors='strict' or 'replace' first"
            )
        if len(name) == len(KEY_HEADER) and name.lower() == _KEY_HEADER_LOWER:
            if KEY_HEADER in out:
                raise InvalidHeaderError(
                    f"header {KEY_HEADER} is given twice (names differing only in case are the same "
                    "header): give it once"
                )
            name = KEY_HEADER
        out[name] = value.strip(" \t")
    return out


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def key_of_headers(headers: Mapping[str, str]) -> str | None:
    """The key in a message's headers: ``X-Aggregate-ID`` in any case; None if absent or empty (keyless)."""
    value = headers.get(KEY_HEADER)
    if value is None:
        for name, found in headers.items():
            if len(name) == len(KEY_HEADER) and name.lower() == _KEY_HEADER_LOWER:
                value = found
                break
    return value or None


def key_problem(key: str) -> str | None:
    """What is wrong with a key by the key rule ("has a space", "too long (300)", ...), or None if valid."""
    return _key_problem(key)


def wire_key_problem(key: str) -> str | None:
    """Why a key that arrived in a message's header breaks the key rule (a dead-letter reason), or None."""
    problem = _key_problem(key)
    if problem is None:
        return None
    shown = key if len(key) <= 64 else key[:61] + "..."
    if ", " in key and all(_key_problem(part) is None for part in key.split(", ")):
        problem = "is repeated in the message (a message has one key)"
    return (
        f"InvalidKeyError: {KEY_HEADER} header {shown!r} {problem}; keys are 1..256 of A-Z a-z 0-9 : _ - . /"
    )


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """Headers from a NATS header block (``Name: value`` lines after ``NATS/1.0``), losing nothing.

    A name given several times keeps every value, joined with ", " (as HTTP combines repeated fields);
    bytes that are not UTF-8 are kept as lone surrogates (surrogateescape), so `header_problem` can refuse
    them and a dead letter can say what they were. Values are trimmed, as NATS clients trim them. The key
    header, in any case, is named ``X-Aggregate-ID``.
    """
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name_bytes, sep, value_bytes = line.partition(b":")
        name = name_bytes.strip().decode("utf-8", "surrogateescape")
        if not sep or not name:
            continue
        value = value_bytes.strip(b" \t").decode("utf-8", "surrogateescape")
        if name.lower() == _KEY_HEADER_LOWER:
            name = KEY_HEADER  # one key header, whatever case each line used
        if name in out:
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    return out


def header_problem(headers: Mapping[str, str]) -> str | None:
    """Why headers that arrived from the wire cannot be handled (a dead-letter reason), or None.

    Values that were not valid UTF-8 on the wire reach keyedbus as lone surrogates (surrogateescape).
    """
    for name, value in headers.items():
        if not value.isascii() and _has_surrogate(value):
            return f"InvalidHeaderError: header {_sendable_value(name)!r} is not valid UTF-8"
        if not name.isascii() and _has_surrogate(name):
            return f"InvalidHeaderError: header name {_sendable_value(name)!r} is not valid UTF-8"
    return None


def _sendable_name(name: str) -> str:
    """A header name NATS accepts that says which name it stands for (what is not allowed %-encoded)."""
    return "".join(c if _HEADER_NAME.fullmatch(c) and c != "%" else f"%{ord(c):02X}" for c in name)


def _sendable_value(value: str) -> str:
    return (
        value.encode("utf-8", "surrogateescape")
        .decode("utf-8", "replace")
        .replace("\r", " ")
        .replace("\n", " ")
        .strip(" \t")
    )


def dead_letter_headers(
    headers: Mapping[str, str], *, key: str | None, error: str, attempts: int, topic: str
) -> dict[str, str]:
    """The headers of the dead letter of a message that had `headers`: always sendable, never acted on.

    Headers the server interprets (every ``Nats-*``: ``Nats-Expected-*``, the original ``Nats-Msg-Id``,
    ``Nats-Rollup``, ``Nats-TTL``, ``Nats-Batch-*``) are kept under ``Keyedbus-Original-<name>``, so the dead
    letter cannot be refused or rolled up. The key goes in ``X-Aggregate-ID`` if it keeps the key rule, else
    under ``Keyedbus-Original-X-Aggregate-ID`` (the dead letter is keyless). Names NATS refuses are
    percent-encoded under the prefix, values that were not UTF-8 get U+FFFD; ``Keyedbus-Rewritten-Headers``
    lists each such change. Then ``Keyedbus-Error`` (one line, at most 1024 characters), ``Keyedbus-Attempts``
    and ``Keyedbus-Original-Topic``.
    """
    out: dict[str, str] = {}
    rewritten: list[str] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower == _KEY_HEADER_LOWER or lower in _DEAD_LETTER_OWN:
            continue
        sendable = _sendable_value(value)
        if sendable != value.strip(" \t"):
            rewritten.append(f"{name} (value not UTF-8 or not one line: re-encoded)")
        if not _HEADER_NAME.fullmatch(name):
            renamed = ORIGINAL_PREFIX + _sendable_name(name)
            out[renamed] = sendable
            rewritten.append(f"{_sendable_value(name)!r} (a name NATS refuses: sent as {renamed})")
        elif lower.startswith(_SERVER_PREFIX):
            out[ORIGINAL_PREFIX + name] = sendable
        else:
            out[name] = sendable
    wire_key = key_of_headers(headers)
    valid = key is not None and _key_problem(key) is None
    if key is not None and valid:
        out[KEY_HEADER] = key
    if wire_key is not None and (wire_key != key or not valid):
        out[ORIGINAL_PREFIX + KEY_HEADER] = _sendable_value(wire_key)
    if rewritten:
        out[REWRITTEN_HEADER] = _header_text("; ".join(rewritten))
    out[ERROR_HEADER] = _header_text(error)
    out[ATTEMPTS_HEADER] = str(attempts)
    out[ORIGINAL_TOPIC_HEADER] = topic
    return out


_SHORT_ERROR = 200


def shrink_dead_letter(
    data: bytes, headers: Mapping[str, str], *, message_id: str, limit: int
) -> tuple[bytes, dict[str, str]]:
    """A dead letter that fits `limit` bytes (max_payload), saying in ``Keyedbus-Shrunk`` what it left out.

    First ``Keyedbus-Error`` is cut to 200 characters and ``Keyedbus-Rewritten-Headers`` left out; if that
    is not enough, the payload is left out (its size is given) and the headers are kept, so the message is
    never parked forever behind a dead letter that cannot be written.
    """
    out = dict(headers)
    out.pop(REWRITTEN_HEADER, None)
    error = out.get(ERROR_HEADER, "")
    if len(error) > _SHORT_ERROR:
        out[ERROR_HEADER] = error[: _SHORT_ERROR - 3] + "..."
    out[SHRUNK_HEADER] = f"headers shortened to fit max_payload {limit}"
    if wire_size(data, out, message_id) <= limit:
        return data, out
    out[SHRUNK_HEADER] = (
        f"payload of {len(data)} bytes left out (with the dead-letter headers it did not fit max_payload "
        f"{limit}); headers shortened"
    )
    if wire_size(b"", out, message_id) <= limit:
        return b"", out
    # The original's own headers alone are too big: keep only what keyedbus wrote.
    kept = {n: v for n, v in out.items() if n.lower() in _DEAD_LETTER_OWN or n == KEY_HEADER}
    kept[SHRUNK_HEADER] = out[SHRUNK_HEADER].replace("headers shortened", "the original's headers left out")
    return b"", kept


def replay_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers to publish a dead letter back with: keyedbus's own and the server's dropped.

    What the original carried for the server stays under ``Keyedbus-Original-`` (restoring
    ``Nats-Expected-*`` would make the replay fail the same way); the key is passed separately. Whatever
    else a dead-letter topic holds is made sendable as `dead_letter_headers` does (a name NATS refuses goes
    %-encoded under ``Keyedbus-Original-``, bytes that are not UTF-8 become U+FFFD).
    """
    out: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower in _DEAD_LETTER_OWN or lower == _KEY_HEADER_LOWER or lower.startswith(_SERVER_PREFIX):
            continue
        if _HEADER_NAME.fullmatch(name):
            out[name] = _sendable_value(value)
        elif name:
            out[ORIGINAL_PREFIX + _sendable_name(name)] = _sendable_value(value)
    return out


def _header_text(text: str) -> str:
    """Make a text fit in one header value."""
    flat = " ".join(_sendable_value(text).split())
    return flat if len(flat) <= 1024 else flat[:1021] + "..."


#: What NATS puts around headers: "NATS/1.0\r\n" ... "\r\n".
_HEADER_FRAME = len(b"NATS/1.0\r\n\r\n")


def wire_size(data: bytes, headers: Mapping[str, str], message_id: str = "") -> int:
    """Bytes a message counts against a NATS max_payload: payload plus headers as NATS encodes them
    (with a ``Nats-Msg-Id: <message_id>`` header added when `message_id` is given)."""
    if not headers and not message_id:
        return len(data)
    size = _HEADER_FRAME + len(data)
    if message_id:
        id_size = len(message_id) if message_id.isascii() else len(message_id.encode("utf-8", "replace"))
        size += len(MSG_ID_HEADER) + 4 + id_size
    for name, value in headers.items():
        size += len(name) + 4 + (len(value) if value.isascii() else len(value.encode("utf-8", "replace")))
    return size


def _id_state(ms: int) -> tuple[int, str, Iterator[int]]:
    """new_message_id's state for millisecond `ms`: the ms, the id's first 24 characters, a counter."""
    head = (ms & ((1 << 48) - 1)) << 32 | 0x7 << 28 | random.getrandbits(12) << 16 | 0b10 << 14
    h = f"{head | random.getrandbits(14):020x}"
    # The last 12 hex digits count up from a random start below 2**47: room for 2**47 ids in a millisecond.
    return ms, f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:]}-", itertools.count(random.getrandbits(47))


#: (ms, head, counter) of the current millisecond, replaced as a whole (other threads may publish too).
_ID_STATE = _id_state(-1)


def _forget_id_state() -> None:
    """In a forked child: start afresh, never continuing the parent's counter (the same ids)."""
    global _ID_STATE
    _ID_STATE = _id_state(-1)


if hasattr(os, "register_at_fork"):  # POSIX only; elsewhere there is no fork
    os.register_at_fork(after_in_child=_forget_id_state)


def new_message_id() -> str:
    """A time-ordered unique id (UUID version 7 layout) for messages and envelopes.

    RFC 9562's monotonic random method: a new random start every millisecond, counting up within it, so the
    ids of one process are unique and ordered, and two processes' ids of one millisecond collide with a
    probability of about 2**-73. An id costs a counter step and a short format, not 74 random bits.
    """
    global _ID_STATE
    ms = time.time_ns() // 1_000_000
    state = _ID_STATE
    if state[0] != ms:
        state = _ID_STATE = _id_state(ms)
    return f"{state[1]}{next(state[2]):012x}"


@attrs.frozen(kw_only=True)
class Message:
    """One delivered message, as a handler of `Bus.subscribe` receives it."""

    #: The topic it was published to.
    topic: str
    #: The payload bytes, untouched.
    data: bytes
    #: Its key (aggregate id), or None for a keyless message (no ordering).
    key: str | None
    #: Headers as they arrived on the wire (including the key's ``X-Aggregate-ID``).
    headers: Mapping[str, str] = attrs.field(factory=dict)
    #: 1 on first delivery; higher on a retry or a redelivery.
    attempt: int = 1
    #: The id the broker deduplicates on ("" when a foreign publisher sent none).
    message_id: str = ""


_new_object = object.__new__
# The slots' own setters, by name: a frozen attrs class sets each field through object.__setattr__ after
# parsing keywords, ~10.6k instructions a Message under callgrind; these, called positionally, ~5.5k.
# A field added to Message must be set here too (tests/test_latency.py checks make_message sets them all).
_set_topic = Message.__dict__["topic"].__set__
_set_data = Message.__dict__["data"].__set__
_set_key = Message.__dict__["key"].__set__
_set_headers = Message.__dict__["headers"].__set__
_set_attempt = Message.__dict__["attempt"].__set__
_set_message_id = Message.__dict__["message_id"].__set__


def make_message(
    topic: str, data: bytes, key: str | None, headers: Mapping[str, str], attempt: int, message_id: str
) -> Message:
    """``Message(topic=..., data=..., ...)`` at half the cost, for the delivery path (one per message).

    The same object: every field set, nothing else (Message has no validators or converters).
    """
    message: Message = _new_object(Message)
    _set_topic(message, topic)
    _set_data(message, data)
    _set_key(message, key)
    _set_headers(message, headers)
    _set_attempt(message, attempt)
    _set_message_id(message, message_id)
    return message


# --- Envelope -------------------------------------------------------------------------------------------

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_MAX_INT64 = 2**63 - 1


def _parse_timestamp(text: str) -> _dt.datetime | None:
    """Parse RFC 3339 with up to nanoseconds and any offset (Python 3.10's fromisoformat cannot)."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micros = int((m.group(7) or "0")[:6].ljust(6, "0"))
    if m.group(8):
        tz = _dt.timezone.utc
    else:
        offset_hours, offset_minutes = int(m.group(10)), int(m.group(11))
        if offset_hours > 23 or offset_minutes > 59:  # RFC 3339 time-numoffset; timezone() refuses more
            return None
        delta = _dt.timedelta(hours=offset_hours, minutes=offset_minutes)
        tz = _dt.timezone(-delta if m.group(9) == "-" else delta)
    try:
        return _dt.datetime(year, month, day, hour, minute, min(second, 59), micros, tzinfo=tz)
    except ValueError:
        return None


def _format_timestamp(ts: _dt.datetime) -> str:
    """Format like Go's RFC3339Nano: trailing fraction zeros trimmed, 'Z' for UTC."""
    text = ts.strftime("%Y-%m-%dT%H:%M:%S")
    if ts.microsecond:
        text += f".{ts.microsecond:06d}".rstrip("0")
    offset = ts.utcoffset() or _dt.timedelta(0)
    if not offset:
        return text + "Z"
    sign = "-" if offset < _dt.timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{text}{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def _strip(value: object) -> object:
    return value.strip(" ") if isinstance(value, str) else value


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _fail(reason: str, hint: str = "") -> InvalidEnvelopeError:
    return InvalidEnvelopeError(reason, hint)


def _json_default(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not a JSON value")


@attrs.frozen(kw_only=True)
class Envelope:
    """A domain event in the Go system's JSON envelope form; validated when constructed.

    Raises InvalidEnvelopeError (a ValueError) naming the broken rule. `event_id` is generated (time-ordered)
    when not given; `timestamp` defaults to now, in UTC, and must be timezone-aware.
    """

    #: The key: 1..256 characters of A-Z a-z 0-9 : _ - . / (surrounding spaces are trimmed).
    aggregate_id: str = attrs.field(converter=_strip)
    #: What happened, e.g. "OrderPlaced"; not blank.
    event_type: str
    #: Schema version of the event, an int > 0 (int64 on the wire).
    event_version: int
    #: Any JSON value: dict, list, str, int, float, bool or None.
    payload: Any = None
    #: When it happened; timezone-aware, kept to the microsecond.
    timestamp: _dt.datetime = attrs.field(factory=_now)
    #: Tracing id ("" = none, omitted on the wire).
    trace_id: str = ""
    #: Correlation id ("" = none, omitted on the wire).
    correlation_id: str = ""
    #: Tenant number, an int >= 0 (0 = none, omitted on the wire).
    tenant_id: int = 0
    #: Unique event id, also the message id brokers deduplicate on; "" when a decoded envelope had none.
    event_id: str = attrs.field(factory=new_message_id)
    _payload_json: str = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.aggregate_id, str):
            raise ArgumentTypeError(f"aggregate_id must be a str, got {type(self.aggregate_id).__name__}")
        problem = _key_problem(self.aggregate_id)
        if problem is not None:
            raise _fail(f"aggregate_id {problem}", _KEY_RULE)
        if not isinstance(self.event_type, str):
            raise ArgumentTypeError(f"event_type must be a str, got {type(self.event_type).__name__}")
        if not self.event_type.strip():
            raise _fail("event_type blank", "give the event's type name, e.g. 'OrderPlaced'")
        version = self.event_version
        if isinstance(version, bool) or not isinstance(version, int):
            raise _fail("event_version not an integer", "use an int > 0")
        if version == 0:
            raise _fail("event_version zero", "use an int > 0")
        if not 0 < version <= _MAX_INT64:
            raise _fail(f"event_version out of range ({version})", "use an int between 1 and 2**63-1")
        if not isinstance(self.timestamp, _dt.datetime):
            raise ArgumentTypeError(f"timestamp must be a datetime, got {type(self.timestamp).__name__}")
        if self.timestamp.utcoffset() is None:
            raise _fail(
                "timestamp has no time zone", "use an aware datetime, e.g. datetime.now(timezone.utc)"
            )
        for name in ("trace_id", "correlation_id", "event_id"):
            if not isinstance(getattr(self, name), str):
                raise ArgumentTypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        tenant = self.tenant_id
        if isinstance(tenant, bool) or not isinstance(tenant, int) or not 0 <= tenant <= _MAX_INT64:
            raise _fail(f"tenant_id invalid ({tenant!r})", "use an int >= 0 (0 means no tenant)")
        try:
            text = json.dumps(
                self.payload,
                ensure_ascii=False,
                allow_nan=False,
                separators=(",", ":"),
                default=_json_default,
            )
        except (TypeError, ValueError) as exc:
            raise _fail(
                f"payload not JSON ({exc})", "use dicts, lists, str, int, float, bool and None"
            ) from None
        except RecursionError:
            raise _fail("payload nested too deeply", "flatten it (JSON nested hundreds deep)") from None
        if not text.isascii() and _has_surrogate(text):
            raise _fail("payload has a lone surrogate", "strings must be valid Unicode to be sent as UTF-8")
        for name in ("event_type", "trace_id", "correlation_id", "event_id"):
            value = getattr(self, name)
            if not value.isascii() and _has_surrogate(value):
                raise _fail(
                    f"{name} has a lone surrogate", "strings must be valid Unicode to be sent as UTF-8"
                )
        object.__setattr__(self, "_payload_json", text)

    def encode(self) -> bytes:
        """The envelope as the Go system's JSON (UTF-8), empty optional fields omitted."""
        parts = [
            f'"event_id":{json.dumps(self.event_id)}',
            f'"aggregate_id":{json.dumps(self.aggregate_id)}',
            f'"event_type":{json.dumps(self.event_type, ensure_ascii=False)}',
            f'"event_version":{self.event_version}',
            f'"timestamp":"{_format_timestamp(self.timestamp)}"',
        ]
        if self.trace_id:
            parts.append(f'"trace_id":{json.dumps(self.trace_id, ensure_ascii=False)}')
        if self.correlation_id:
            parts.append(f'"correlation_id":{json.dumps(self.correlation_id, ensure_ascii=False)}')
        if self.tenant_id:
            parts.append(f'"tenant_id":{self.tenant_id}')
        parts.append(f'"payload":{self._payload_json}')
        return ("{" + ",".join(parts) + "}").encode()

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parse the Go system's JSON envelope; raise InvalidEnvelopeError naming the broken rule.

        Whatever the bytes (not UTF-8, empty, nested thousands deep, numbers of any size, impossible dates),
        the only error is InvalidEnvelopeError; passing something that is not bytes is an ArgumentTypeError.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(f"Envelope.decode takes bytes, got {type(data).__name__}")
        try:
            return cls._decode(bytes(data))
        except InvalidEnvelopeError:
            raise
        except RecursionError:
            raise _fail("nested too deeply", "an envelope is one JSON object of ordinary depth") from None
        except Exception as exc:  # a rule this parser missed must still be a decode error, never a crash
            raise _fail(f"not a valid envelope ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _decode(cls, data: bytes) -> Envelope:
        if not data:
            raise _fail("empty payload (0 bytes)", "envelopes are one JSON object")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail("invalid UTF-8", "envelopes are UTF-8 JSON") from None
        try:
            obj = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            raise _fail("nested too deeply", "an envelope is one JSON object of ordinary depth") from None
        except ValueError as exc:
            # Python refuses integers over 4300 digits with a ValueError of its own: say so.
            reason = "not JSON (a number too long to read)" if "digits" in str(exc) else "not JSON"
            raise _fail(reason, "envelopes are one JSON object") from None
        if not isinstance(obj, dict):
            kind = "an array" if isinstance(obj, list) else f"a {type(obj).__name__}"
            raise _fail(f"top level is {kind}", "an envelope is one JSON object")
        fields: dict[str, Any] = {}
        for name in ("aggregate_id", "event_type", "event_version", "timestamp", "payload"):
            if name not in obj:
                raise _fail(f"{name} missing", "the Go envelope requires it")
        for name in ("aggregate_id", "event_type", "timestamp", "event_id", "trace_id", "correlation_id"):
            if name in obj and not isinstance(obj[name], str):
                raise _fail(f"{name} not a string", "it must be a JSON string")
        if isinstance(obj["aggregate_id"], str) and not obj["aggregate_id"].strip(" "):
            raise _fail("aggregate_id empty", _KEY_RULE)
        if isinstance(obj["event_type"], str) and not obj["event_type"].strip():
            raise _fail("event_type missing", "the Go envelope requires a non-blank event_type")
        timestamp = _parse_timestamp(obj["timestamp"])
        if timestamp is None:
            raise _fail("timestamp not RFC 3339", "write it like 2025-10-13T08:15:00.123456789+08:00")
        tenant = obj.get("tenant_id", 0)
        if isinstance(tenant, bool) or not isinstance(tenant, int):
            raise _fail("tenant_id not an integer", "use a JSON integer >= 0")
        fields.update(
            aggregate_id=obj["aggregate_id"],
            event_type=obj["event_type"],
            event_version=obj["event_version"],
            timestamp=timestamp,
            trace_id=obj.get("trace_id", ""),
            correlation_id=obj.get("correlation_id", ""),
            tenant_id=tenant,
            payload=obj["payload"],
            event_id=obj.get("event_id", ""),
        )
        return cls(**fields)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


@attrs.define(eq=False)
class AggregateMessage:
    """A delivery on its way through the pool: the key it is ordered by and everything needed to settle it."""

    #: Routing and ordering key; None for keyless messages.
    key: str | None
    #: The backend's handle to ack, terminate or release the message.
    delivery: Any
    #: The subscription that will handle it (a `_pool.Consumer`).
    consumer: Any
    #: What the handler receives (a Message or an Envelope).
    value: Any
    #: Attempt number of the next handler run.
    attempt: int = 1
    #: Set when the message must be dead-lettered without (more) handler runs, e.g. it failed to decode.
    dead_letter_reason: str | None = None
