"""Every use of nats-py's private parts, in one place, checked against the nats-py versions listed here.

keyedbus reads nats-py's subscription queues directly (nats-py has no batch API, and awaiting each message
separately costs more than the message under trio-asyncio) and speaks JetStream's pull protocol itself
(nats-py's fetch() starts a timer and a task per message). Both rely on attributes nats-py does not
promise to keep; `check_version()` runs at connect time so an untested nats-py fails with a clear message
instead of a strange one.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any

import nats.aio.client
import nats.errors

from .._errors import ConnectionFailedError
from .._messages import MSG_ID_HEADER

__all__ = [
    "PIN_HEADER",
    "SUPPORTED",
    "api_prefix",
    "buffer_command",
    "client_of",
    "check_version",
    "consumer_seq",
    "delivery_info",
    "consumer_gone",
    "install_header_parser",
    "encoded_size",
    "is_data",
    "make_waking",
    "publish_command",
    "request_pull",
    "settle_command",
    "settled",
    "status_of",
    "stored_headers",
    "subscription_id",
    "take",
    "take_nowait",
    "wake_on_put",
]

#: The nats-py releases whose private attributes this module was checked against.
SUPPORTED = ">=2.16,<3"
_LOWEST = (2, 16)
_BEYOND = (3, 0)


def _parse(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_version(version: str | None = None) -> None:
    """Raise ConnectionFailedError unless the installed nats-py (or `version`) is in the supported range."""
    if version is None:
        try:
            version = metadata.version("nats-py")
        except metadata.PackageNotFoundError:  # installed some other way: trust the module's own version
            import nats.aio.client

            version = str(nats.aio.client.__version__)
    if not _LOWEST <= _parse(version) < _BEYOND:
        raise ConnectionFailedError(
            f"nats-py {version} is installed, but keyedbus supports nats-py {SUPPORTED} only (it reads "
            f"nats-py's subscription queues directly): pip install 'nats-py{SUPPORTED}'"
        )


async def take(sub: Any, limit: int, timeout: float | None = None) -> list[Any]:
    """Wait for the next message of a callback-less subscription, then take up to `limit` queued ones.

    Returns [] if `timeout` seconds pass with none. Keeps nats-py's byte count, as its next_msg() does.
    """
    queue: asyncio.Queue[Any] = sub._pending_queue
    if timeout is None:
        first = await queue.get()
    else:
        try:
            first = await asyncio.wait_for(queue.get(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            return []
    batch = [first]
    while len(batch) < limit:
        try:
            batch.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    sub._pending_size -= sum(len(m.data) for m in batch)
    return batch


def take_nowait(sub: Any, limit: int = 1 << 62) -> list[Any]:
    """Up to `limit` messages queued in a callback-less subscription now (none waited for).

    Keeps nats-py's byte count, as its next_msg() does. Synchronous: safe from a trio task (see
    `buffer_command`).
    """
    queue: asyncio.Queue[Any] = sub._pending_queue
    batch: list[Any] = []
    while len(batch) < limit and not queue.empty():
        batch.append(queue.get_nowait())
    sub._pending_size -= sum(len(m.data) for m in batch)
    return batch


class _WakingQueue(asyncio.Queue[Any]):
    """A subscription's message queue that also calls a waker (once) when nats-py puts a message in it."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.waker: Callable[[], None] | None = None

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        waker, self.waker = self.waker, None
        if waker is not None:
            waker()


def make_waking(sub: Any) -> None:
    """Give a callback-less subscription a queue that can wake a trio task (see `wake_on_put`).

    Call it on the asyncio side right after `nc.subscribe`; what was queued already is kept, in order.
    """
    old: asyncio.Queue[Any] = sub._pending_queue
    queue = _WakingQueue(old.maxsize)
    while not old.empty():
        queue.put_nowait(old.get_nowait())
    sub._pending_queue = queue


def wake_on_put(sub: Any, waker: Callable[[], None] | None) -> None:
    """Call `waker` (once) when nats-py next queues a message for `sub` (made waking); None: no longer.

    nats-py queues messages in its reader task, which trio-asyncio runs inside a trio task, so the waker
    may be a trio call such as `trio.Event.set`: a trio task waiting for messages wakes in the next
    scheduling round, without a crossing into asyncio and back.
    """
    queue: _WakingQueue = sub._pending_queue
    queue.waker = waker


def encoded_size(data: bytes, headers: dict[str, str] | None) -> int:
    """The bytes nats-server counts against max_payload: the payload plus headers as nats-py encodes them
    (`NATS/1.0` line, `name: value` lines, blank line; names and values stripped)."""
    if headers is None:
        return len(data)
    size = len(b"NATS/1.0\r\n\r\n")
    for name, value in headers.items():
        if name.strip():
            size += len(name.strip().encode()) + len(value.strip().encode()) + 4
    return len(data) + size


#: nats-py's rule for header names (`_HEADER_KEY_RE`) and its newline replacement in values.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_CONNECTED = nats.aio.client.Client.CONNECTED
#: Header names already found valid as they are (no surrounding spaces): few, sent over and over.
_GOOD_NAMES: set[str] = set()


def publish_command(
    subject: str, data: bytes, headers: Mapping[str, str], message_id: str | None = None
) -> tuple[bytes, int]:
    """The protocol command nats-py's `publish(subject, data, headers=headers)` buffers, byte for byte, and
    the size nats-server counts against max_payload (encoded headers plus payload).

    Names and values are stripped, values' CR and LF become spaces, a name nats-py refuses raises its
    BadHeaderError, as in nats-py's `_send_publish`. No headers: a PUB, as nats-py sends for `headers=None`.
    A `message_id` is sent as if `headers` were ``{**headers, "Nats-Msg-Id": message_id}`` (no dict built).
    """
    if not headers and message_id is None:
        return f"PUB {subject}  {len(data)}\r\n".encode() + data + b"\r\n", len(data)
    lines = ["NATS/1.0\r\n"]
    items: Iterable[tuple[str, str]] = headers.items()
    if message_id is not None:
        if MSG_ID_HEADER in headers:  # replaced where the caller put it, as the dict merge does
            items = {**headers, MSG_ID_HEADER: message_id}.items()
        else:
            items = itertools.chain(items, ((MSG_ID_HEADER, message_id),))
    for name, value in items:
        if name not in _GOOD_NAMES:
            stripped = name.strip()
            if not stripped:
                continue  # nats-py skips an empty name
            if not _HEADER_NAME.fullmatch(stripped):
                raise nats.errors.BadHeaderError(stripped)
            if stripped == name and len(_GOOD_NAMES) < 10_000:  # bounded, whatever a program sends
                _GOOD_NAMES.add(name)
            name = stripped
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    block = "".join(lines).encode()
    size = len(block) + len(data)
    return b"".join((f"HPUB {subject}  {len(block)} {size}\r\n".encode(), block, data, b"\r\n")), size


def buffer_command(nc: Any, command: bytes, payload_size: int) -> bool:
    """Append a publish `command` to `nc`'s outgoing buffer and wake its flusher, as `nc.publish` does,
    when that needs no waiting; return False (nothing done) when it would (not connected, the buffer full,
    the flusher busy or gone): the caller then awaits `nc.publish` on the asyncio side.

    Safe from a trio task: trio-asyncio runs asyncio's callbacks in a trio task of the same thread, so this
    runs between two of them, as an asyncio task's synchronous step would. The buffer keeps call order.
    """
    if nc._status != _CONNECTED:
        return False
    size = nc._pending_data_size + len(command)
    if 0 < nc._max_pending_size < size:
        return False  # nats-py would wait here for the flusher to write the buffer out
    queue: asyncio.Queue[Any] | None = nc._flush_queue
    flusher: asyncio.Task[None] | None = nc._flusher_task
    if queue is None or flusher is None or flusher.done() or queue.full():
        return False
    nc._pending.append(command)
    nc._pending_data_size = size
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += payload_size
    if queue.empty():  # nats-py kicks the flusher only when no kick is waiting
        queue.put_nowait(flusher.get_loop().create_future())
    return True


#: What nats-py's Msg.ack(), nak(), term() and in_progress() publish to the message's reply subject.
_SETTLE_PAYLOADS = {"ack": b"", "nak": b"-NAK", "term": b"+TERM", "in_progress": b"+WPI"}


def settle_command(msg: Any, how: str) -> bytes:
    """The PUB command nats-py's `msg.<how>()` sends ("ack", "nak", "term" or "in_progress"), byte for byte;
    "nak:<seconds>" is `msg.nak(delay=seconds)`.

    Raises what that method raises before sending (NotJSMessageError without a reply subject,
    MsgAlreadyAckdError for a message already acked, nak'd or terminated). Once `buffer_command` took the
    command, call `settled(msg, how)`, as the method would have marked the message.
    """
    if how == "in_progress":
        if not msg.reply:
            raise nats.errors.NotJSMessageError
    else:
        msg._check_reply()
    if how.startswith("nak:"):  # as nats-py's nak(delay=...) writes it
        payload = b"-NAK " + json.dumps({"delay": int(float(how[4:]) * 10**9)}).encode()
    else:
        payload = _SETTLE_PAYLOADS[how]
    command, _ = publish_command(msg.reply, payload, {})
    return command


def settled(msg: Any, how: str) -> None:
    """Mark `msg` as `msg.<how>()` does once it has sent the command (in_progress leaves it open)."""
    if how != "in_progress":
        msg._ackd = True


def install_header_parser(client: Any, parse: Callable[[bytes], dict[str, str]]) -> None:
    """Make `client` parse received header blocks with `parse` instead of nats-py's own parser, which keeps
    only the last value of a repeated header and turns bytes that are not UTF-8 into U+FFFD for good.

    nats-py calls it as `self._parse_header_lines(raw)` (a staticmethod), so an instance attribute wins.
    """
    if not callable(getattr(client, "_parse_header_lines", None)):
        raise ConnectionFailedError(
            f"nats-py has no _parse_header_lines to replace; keyedbus supports nats-py {SUPPORTED} only: "
            f"pip install 'nats-py{SUPPORTED}'"
        )
    client._parse_header_lines = parse


def stored_headers(raw_msg: Any, parse: Callable[[bytes], dict[str, str]]) -> dict[str, str] | None:
    """The headers of a message read by `JetStreamManager.get_msg`, parsed with `parse`.

    nats-py parses those with `email.parser`: a non-ASCII value comes back as an `email.header.Header`
    object (not a str) and a repeated header keeps one value. The raw block stays in `hdrs` (base64).
    """
    hdrs = getattr(raw_msg, "hdrs", None)
    if not hdrs:
        return None
    block = base64.b64decode(hdrs)
    _, _, lines = block.partition(b"\r\n")  # after "NATS/1.0"
    return parse(lines) or None


def subscription_id(sub: Any) -> int:
    """The sid nats-py names a subscription by in slow-consumer errors."""
    return int(sub._id)


def client_of(js: Any) -> Any:
    """The nats-py client a JetStreamContext sends through."""
    return js._nc


def api_prefix(js: Any) -> str:
    """The JetStream API subject prefix of a JetStreamContext (`$JS.API` unless a domain is set)."""
    return str(js._prefix)


async def request_pull(
    nc: Any,
    js: Any,
    stream: str,
    durable: str,
    inbox: str,
    *,
    batch: int,
    expires: float,
    group: str | None = None,
    pin: str | None = None,
) -> None:
    """Ask a pull consumer for up to `batch` messages, delivered to `inbox`; the request ends after
    `expires` seconds with a 408 status if it was not filled. `group` names the consumer's priority group
    and `pin` the pin id the server last gave this puller (see `_scaleout`)."""
    subject = f"{api_prefix(js)}.CONSUMER.MSG.NEXT.{stream}.{durable}"
    request: dict[str, Any] = {"batch": batch, "expires": int(expires * 1e9)}
    if group is not None:
        request["group"] = group
        if pin is not None:
            request["id"] = pin
    await nc.publish(subject, json.dumps(request).encode(), reply=inbox)


#: The header JetStream puts the pin id of a pinned_client priority group in.
PIN_HEADER = "Nats-Pin-Id"


def is_data(msg: Any) -> bool:
    """Whether a message on a pull inbox is a stored message, not a server status reply.

    Stored messages come with a `$JS.ACK.` reply subject, whatever their headers say (a publisher may set
    a header named `Status` itself); status replies (404, 408, 409, 100) have none.
    """
    return str(msg.reply or "").startswith("$JS.ACK.")


def delivery_info(msg: Any) -> tuple[int, int, int]:
    """(stream sequence, delivery count, messages pending) of a stored message, from its reply subject.

    The fields nats-py's `msg.metadata` parses, without its dataclasses and timestamp (5 us a message).
    """
    tokens = msg.reply.split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        return int(tokens[5]), int(tokens[4]), int(tokens[8])
    meta = msg.metadata  # the form with domain and account hash: nats-py knows its layout
    return int(meta.sequence.stream), int(meta.num_delivered), int(meta.num_pending)


def consumer_seq(msg: Any) -> int:
    """The consumer sequence of a stored message: the consumer counts every delivery, redeliveries too, so
    a reader that sees every delivery sees these without gaps (see `delivery_info` for the layout)."""
    tokens = msg.reply.split(".")
    if len(tokens) == 9:
        return int(tokens[6])
    return int(msg.metadata.sequence.consumer)


def consumer_gone(msg: Any) -> str | None:
    """Why a status reply on a pull inbox means the consumer (or its stream) no longer exists, else None.

    409 "Consumer Deleted" ends a waiting pull request when the consumer or its stream is deleted; 503 (no
    responders) answers a pull request for a consumer that does not exist (also after a server restart with
    an empty store).
    """
    status = status_of(msg)
    description = str(msg.headers.get("Description", "")).strip() if msg.headers else ""
    if status == "503":
        return "503: no consumer answers pull requests"
    if status == "409" and "deleted" in description.lower():
        return f"409 {description}"
    return None


def status_of(msg: Any) -> str:
    """The status code of a server status reply on a pull inbox ("" if it carries none)."""
    return str(msg.headers.get("Status", "")) if msg.headers else ""
