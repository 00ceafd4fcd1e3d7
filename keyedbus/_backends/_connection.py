"""The NATS connection both NATS backends share: connecting, and the pumps that cross into asyncio.

Each trio<->asyncio crossing costs tens of microseconds, so every direction crosses once per batch:
publishes are gathered by one pump task, acks by another. The core-NATS backend (`nats`) and JetStream
(`jetstream`) both build on this module; neither imports the other's internals through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
import nats
import nats.aio.client
import nats.errors
import trio

from .._errors import ConnectionFailedError, KeyedBusError, PublishError
from .._messages import MSG_ID_HEADER, Message, key_of_headers, parse_header_lines
from . import _natspy
from ._aio import aio, open_loop
from ._base import Outgoing
from ._urls import safe_url

__all__ = [
    "NatsConnection",
    "Publish",
    "connect",
    "message_from",
    "open_loop",
    "publish_error",
    "wire_headers",
]

logger = logging.getLogger("keyedbus")

_BATCH = 256
#: Core publishes between two schedule points of the publisher (it checks for cancellation at each one).
_YIELD_EVERY = 16


def message_from(topic: str, data: bytes | None, headers: dict[str, str] | None, attempt: int) -> Message:
    """A Message from what the wire carried; it keeps `headers` (nats-py parses a new dict per message)."""
    if headers is None:
        headers = {}
    return Message(
        topic=topic,
        data=data or b"",
        key=key_of_headers(headers),
        headers=headers,
        attempt=attempt,
        message_id=headers.get(MSG_ID_HEADER, ""),
    )


def wire_headers(out: Outgoing) -> dict[str, str]:
    """The headers a publish carries: the caller's and Nats-Msg-Id. Every publish carries it: JetStream keeps
    its own duplicate window whatever `out.dedup` says, and a core subscriber sees the same `message_id` as
    on memory://."""
    return {**out.headers, MSG_ID_HEADER: out.message_id}


@attrs.define(eq=False)
class Publish:
    """One JetStream publish for the publish pump (core publishes go straight into nats-py's buffer)."""

    topic: str
    data: bytes
    headers: dict[str, str]
    message_id: str
    #: Set once the store ack (or error) is in.
    done: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None
    #: The subject, when it is not the topic (a partition of a partitioned topic).
    subject: str | None = None


class NatsConnection:
    """A nats-py client driven from trio: the publish and settle pumps, and what they have sent."""

    def __init__(self, nc: Any, nursery: trio.Nursery, url: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.url = url
        self._nursery = nursery
        self._pub_send, self._pub_recv = trio.open_memory_channel[Publish](4096)
        self._settle_queue: list[tuple[Any, str]] = []
        self._settle_wakeup = trio.Event()
        self._settle_flushed = trio.Event()
        self._flush_wanted = False
        #: Highest stream sequence our own publishes got, per topic (drain waits for those too).
        self._published: dict[str, int] = {}
        #: Publishes queued so far: the drain is settled only if none was queued since it last checked.
        self.publish_count = 0
        #: Publishes handed to the pump and not yet written to the connection (the drain waits for them).
        self.unsent = 0
        self.closing = False
        self._since_yield = 0
        #: Stored messages removed (limits, deletions) before a subscribed group got them.
        self.evicted = 0
        #: Called with a subscription's sid when nats-py dropped a message for it (slow consumer).
        self.on_slow_consumer: Callable[[int], None] = self._log_slow_consumer

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def shown_url(self) -> str:
        """The servers as they may appear in logs and errors (no credentials)."""
        return safe_url(self.url)

    def start(self) -> None:
        self._nursery.start_soon(self._publish_pump)
        self._nursery.start_soon(self._settle_pump)

    @staticmethod
    def _log_slow_consumer(sid: int) -> None:
        logger.warning("nats-py dropped a message for subscription %s (slow consumer)", sid)

    # -- publishing -----------------------------------------------------------------------------------

    async def queue_publish(self, request: Publish) -> None:
        """Hand one message to the publish pump (waiting for room); it sets `request.done` later."""
        # Counted before the send: a send to a waiting pump leaves the channel's buffer empty.
        self.publish_count += 1
        self.unsent += 1
        try:
            await self._pub_send.send(request)
        except BaseException:
            self.unsent -= 1
            raise

    async def publish_core(self, request: Outgoing, command: bytes) -> None:
        """Send a core-NATS publish (`command`, encoded by `_natspy.publish_command`) from this task.

        Written straight into nats-py's outgoing buffer, in call order, without the publish pump or a
        crossing; only when nats-py would make its caller wait (reconnecting, the buffer full) is
        `nc.publish` awaited on the asyncio side. A cancel point every call, a schedule point every
        16 calls (the flusher and the subscribers run then). If cancelled, nothing was sent unless that
        asyncio call had started. Raises PublishError when nats-py refuses the message (closed connection,
        reconnect buffer full).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self.publish_count += 1
        if not _natspy.buffer_command(self.nc, command, len(request.data)):
            try:
                await aio(self.nc.publish)(request.topic, request.data, headers=wire_headers(request))
            except (nats.errors.Error, OSError) as exc:
                raise publish_error(request, exc, sent=False) from exc
        self._since_yield += 1
        if self._since_yield >= _YIELD_EVERY:
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def publish_core_nowait(self, request: Outgoing, command: bytes) -> None:
        """Send a core-NATS publish as `publish_core` does, or raise trio.WouldBlock if nats-py would make
        its caller wait (reconnecting, its outgoing buffer full)."""
        if not _natspy.buffer_command(self.nc, command, len(request.data)):
            raise trio.WouldBlock
        self.publish_count += 1

    def forget_published(self, topic: str) -> None:
        """The topic's stream was replaced by an empty one: its old sequences mean nothing now."""
        self._published.pop(topic, None)

    def published_seq(self, topic: str) -> int:
        """The highest stream sequence our own publishes to `topic` were stored at (0: none)."""
        return self._published.get(topic, 0)

    async def _publish_pump(self) -> None:
        """Cross into asyncio once per batch of publishes; JetStream publishes in a batch are pipelined."""
        async for first in self._pub_recv:
            batch = await _gather(self._pub_recv, first)
            try:
                results = await aio(self._aio_publish)(batch)
            finally:
                self.unsent -= len(batch)
            self._finish_publishes(batch, results)

    async def flush_unsent(self) -> None:
        """Send what the (stopped) publish pump still held; for close."""
        unsent: list[Publish] = []
        with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
            while True:
                unsent.append(self._pub_recv.receive_nowait())
        if unsent:
            results = await aio(self._aio_publish)(unsent)
            self._finish_publishes(unsent, results)

    def _finish_publishes(self, batch: list[Publish], results: list[BaseException | int]) -> None:
        for request, result in zip(batch, results, strict=True):
            if isinstance(result, int):
                self._published[request.topic] = max(self._published.get(request.topic, 0), result)
            else:
                request.error = result
            request.done.set()

    async def _aio_publish(self, batch: list[Publish]) -> list[BaseException | int]:
        """Publish a batch to JetStream; each result is the stored sequence or the error."""
        results: list[BaseException | int] = [0] * len(batch)
        pending: list[tuple[int, Any]] = []
        for index, request in enumerate(batch):
            try:
                pending.append(
                    (
                        index,
                        self.js.publish(
                            request.subject or request.topic, request.data, headers=request.headers
                        ),
                    )
                )
            except Exception as exc:
                results[index] = publish_error(request, exc, sent=False)
        if pending:
            acks = await asyncio.gather(*(c for _, c in pending), return_exceptions=True)
            for (index, _), ack in zip(pending, acks, strict=True):
                if isinstance(ack, BaseException):
                    results[index] = publish_error(batch[index], ack, sent=True)
                else:
                    results[index] = int(ack.seq)
        return results

    # -- settling -------------------------------------------------------------------------------------

    @property
    def settles_queued(self) -> bool:
        return bool(self._settle_queue)

    def queue_settles(self, settles: Iterable[tuple[Any, str]]) -> None:
        """Queue acks, terms and naks; the settle pump sends them in order, written into nats-py's buffer.

        Each is (message, how): "ack", "term", "nak", or "nak:<seconds>" for a nak with a redelivery delay.
        """
        self._settle_queue.extend(settles)
        self._settle_wakeup.set()

    async def settle_now(self, settles: list[tuple[Any, str]]) -> None:
        """Queue `settles` behind what is queued, and wait until the server has them all (flushed)."""
        self._settle_queue.extend(settles)
        done = self._settle_flushed
        self._flush_wanted = True
        self._settle_wakeup.set()
        await done.wait()

    def take_settles(self) -> list[tuple[Any, str]]:
        """Everything queued and not yet sent (the settle pump is stopped: close sends it directly)."""
        batch, self._settle_queue = self._settle_queue, []
        return batch

    async def _settle_pump(self) -> None:
        # One task sends every settle, so a nak queued after an ack reaches the server after it.
        while True:
            await self._settle_wakeup.wait()
            self._settle_wakeup = trio.Event()
            batch, self._settle_queue = self._settle_queue, []
            done, self._settle_flushed = self._settle_flushed, trio.Event()
            flush, self._flush_wanted = self._flush_wanted, False
            rest = self._settle_directly(batch)
            if rest or flush:
                await aio(self.aio_settle)(rest, flush=flush)
            done.set()

    def _settle_directly(self, batch: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
        """Write settles into nats-py's outgoing buffer from this trio task (as core publishes are), in order;
        return the rest, from the first one nats-py would make its caller wait for (reconnecting, buffer
        full): those go through `aio_settle`. A settle nats-py refuses is logged, as `aio_settle` does."""
        for index, (raw, how) in enumerate(batch):
            try:
                command = _natspy.settle_command(raw, how)
            except Exception as exc:  # already settled, or not a JetStream message: as aio_settle logs it
                logger.warning("could not %s a message of %s: %s", how, raw.subject, exc)
                continue
            if not _natspy.buffer_command(self.nc, command, 0):
                return batch[index:]
            _natspy.settled(raw, how)
        return []

    async def aio_settle(self, batch: list[tuple[Any, str]], *, flush: bool = False) -> None:
        """Send settles in order (asyncio side); failures are logged: a lost ack means a redelivery."""
        for raw, how in batch:
            try:
                if how.startswith("nak:"):  # a nak with a delay in seconds (a parked key's deferral)
                    await raw.nak(delay=float(how[4:]))
                else:
                    await getattr(raw, how)()
            except Exception as exc:  # a lost ack means a redelivery (attempt > 1), never a loss
                logger.warning("could not %s a message of %s: %s", how, raw.subject, exc)
        if flush:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)


async def _gather(receive: trio.MemoryReceiveChannel[Publish], first: Publish) -> list[Publish]:
    """A batch for one crossing: take what is queued, and while publishers keep adding, let them add more.

    A crossing costs as much as tens of publishes, so a batch of one is the slow case. Yielding once per
    round lets every ready publisher queue one more message; it stops as soon as a round adds nothing
    (a lone publish waits four scheduling rounds, not a timer).
    """
    batch = [first]
    idle_rounds = 0
    # Several empty rounds, not one: trio runs the ready tasks of a round in random order, so the pump may
    # look before a ready publisher had its turn.
    while len(batch) < _BATCH and idle_rounds < 4:
        try:
            batch.append(receive.receive_nowait())
            idle_rounds = 0
        except trio.WouldBlock:
            idle_rounds += 1
            await trio.lowlevel.checkpoint()
    return batch


def publish_error(request: Outgoing | Publish, exc: BaseException, *, sent: bool) -> KeyedBusError:
    """The error a publisher sees, with the nats-py error as its cause."""
    topic, message_id = request.topic, request.message_id
    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
    error: PublishError
    if isinstance(exc, nats.errors.MaxPayloadError):
        error = PublishError(
            f"message {message_id!r} for {topic!r} is larger than the server's max_payload ({reason})",
            topic=topic,
            message_id=message_id,
        )
    elif sent and isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
        # The message went out; only the server's answer is missing. It may well be stored.
        error = PublishError(
            f"no store ack for message {message_id!r} on {topic!r} ({reason}): it may or may not be "
            f"stored; publishing it again with message_id={message_id!r} is safe (JetStream stores it once)",
            topic=topic,
            message_id=message_id,
        )
    else:
        error = PublishError(
            f"the broker did not store message {message_id!r} for {topic!r} ({reason}); publishing it "
            f"again with message_id={message_id!r} is safe",
            topic=topic,
            message_id=message_id,
        )
    error.__cause__ = exc
    return error


async def connect(
    url: str, nursery: trio.Nursery, *, connect_timeout: float, options: dict[str, Any]
) -> NatsConnection:
    """Connect to the NATS servers in `url` and start the pumps in `nursery`.

    Raises ConnectionFailedError naming the servers (never the credentials) when none answers within
    `connect_timeout` seconds or the server refuses the connection, or when nats-py is a version keyedbus
    was not checked against.
    """
    _natspy.check_version()
    shown = safe_url(url)
    servers = [s.strip() for s in url.split(",")]
    secrets = _secrets(url, options)
    refused: list[str] = []
    #: Failed attempts before the first connection, and the last reason (for the error and the log).
    failures: list[str] = []
    attempt = trio.CancelScope(deadline=trio.current_time() + connect_timeout)

    def give_up_soon() -> None:
        # Not from inside nats-py's callback: it closes the refused socket right after the callback returns.
        asyncio.get_running_loop().call_later(0.05, attempt.cancel)

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and conn is not None:
            conn.on_slow_consumer(exc.sid)
            return
        text = _scrub(f"{type(exc).__name__}: {exc}", secrets)
        if nc is None:
            # Before the first connection nats-py calls this once per attempt: one line for the first,
            # DEBUG for the rest; the final error says how many there were.
            failures.append(text)
            if _is_auth_error(exc):
                # Retrying cannot fix wrong credentials: stop the initial connect now, say why.
                refused.append(text)
                give_up_soon()
            elif isinstance(exc, ssl.SSLError):
                give_up_soon()  # nor can it fix a certificate or TLS setting
            level = logging.WARNING if len(failures) == 1 else logging.DEBUG
            logger.log(level, "connecting to NATS at %s: attempt %d failed: %s", shown, len(failures), text)
            return
        logger.warning("NATS connection to %s: %s", shown, text)

    async def on_disconnect() -> None:
        # Before the first connection a failed attempt is not a disconnection.
        if nc is not None and (conn is None or not conn.closing):
            logger.warning("disconnected from NATS at %s; reconnecting", shown)

    async def on_reconnect() -> None:
        logger.warning("reconnected to NATS at %s", shown)

    conn: NatsConnection | None = None
    nc: Any = None
    client: Any = nats.aio.client.Client()  # Any: nats-py annotates float seconds as int
    _natspy.install_header_parser(client, parse_header_lines)  # repeated headers, non-UTF-8 bytes kept
    try:
        with attempt:
            try:
                await aio(client.connect)(
                    servers=servers,
                    connect_timeout=min(connect_timeout, 2.0),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    **options,
                )
            except (nats.errors.Error, OSError) as exc:
                text = _scrub(f"{type(exc).__name__}: {exc}", secrets)
                raise ConnectionFailedError(
                    f"could not connect to NATS at {shown}: {text}; check the address, that nats-server "
                    "runs there, and the credentials"
                ) from None
            nc = client
    finally:
        if nc is None:
            # Given up (timeout, refused, cancelled): close what the attempt opened.
            with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
                await aio(client.close)()
    tried = f"{len(failures)} attempt(s), the last failed with {failures[-1]}" if failures else "no answer"
    if nc is None and refused:
        raise ConnectionFailedError(
            f"the NATS server at {shown} refused the connection ({refused[-1]}): check user/password, "
            "token or credentials file"
        )
    if nc is None:
        raise ConnectionFailedError(
            f"no NATS server answered at {shown} within connect_timeout={connect_timeout} s ({tried}): "
            "check the address and that nats-server runs there"
        )
    conn = NatsConnection(nc, nursery, url)
    conn.start()
    return conn


def _secrets(url: str, options: dict[str, Any]) -> list[str]:
    """Every credential that must never reach a log line or an error message."""
    found = [str(options[k]) for k in ("user", "password", "token") if options.get(k)]
    for part in url.split(","):
        parsed = urlsplit(part.strip() if "://" in part else f"nats://{part.strip()}")
        found += [s for s in (parsed.username, parsed.password) if s]
    return found


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _is_auth_error(exc: Exception) -> bool:
    if isinstance(exc, (nats.errors.AuthorizationError,)):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text
