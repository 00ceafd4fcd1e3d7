"""The NATS connection: core NATS for ephemeral topics, and the bridge every JetStream call goes through.

Only this module and `jetstream` import asyncio code. Each trio<->asyncio crossing costs tens of
microseconds, so every direction crosses once per batch: publishes are gathered by one pump task, acks by
another, and subscriptions take whole batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
import nats
import nats.aio.client
import nats.errors
import nats.js.api
import nats.js.errors
import trio
import trio_asyncio

from .._config import TopicConfig
from .._errors import ConnectionFailedError, KeyedBusError, PublishError
from .._messages import MSG_ID_HEADER, Message
from ._base import AtMostOnceDelivery, Inbox, Outgoing
from ._urls import safe_url
from .jetstream import PullSubscription, _aio_get_messages, message_from, stream_config, stream_name

__all__ = ["NatsBackend", "connect", "open_loop", "safe_url"]

logger = logging.getLogger("keyedbus")

_BATCH = 256
#: Messages waiting in one core-NATS subscription before new ones are dropped (and counted).
_CORE_BUFFER = 65_536


@attrs.define(eq=False)
class _Publish:
    topic: str
    data: bytes
    headers: dict[str, str]
    #: Set once the store ack (or error) is in, for a persistent publish; None for core NATS, which nobody
    #: waits for (no Event per message on the hot path).
    done: trio.Event | None
    error: BaseException | None = None

    @property
    def persistent(self) -> bool:
        return self.done is not None


class _CoreSubscription:
    """A core-NATS subscription: nats-py queues on the asyncio side, a trio task takes whole batches."""

    def __init__(self, backend: NatsBackend, topic: str, inbox: Inbox) -> None:
        self.backend = backend
        self.topic = topic
        self.inbox = inbox
        self.aio_sub: Any = None
        self.in_hand = 0
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    async def start(self, group: str, nursery: trio.Nursery) -> None:
        self.aio_sub = await trio_asyncio.aio_as_trio(self.backend._aio_core_subscribe)(self.topic, group)
        await nursery.start(self._read)

    async def _read(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._scope:
                task_status.started()
                while True:
                    raw = await trio_asyncio.aio_as_trio(self._aio_take)()
                    await self.inbox.deliver(
                        [AtMostOnceDelivery(message_from(self.topic, m.data, m.headers, 1)) for m in raw]
                    )
                    self.in_hand = 0
        finally:
            self._stopped.set()

    async def _aio_take(self) -> list[Any]:
        batch = await _aio_take(self.aio_sub)
        # Counted here, on the asyncio side: between this return and the trio side resuming, the messages
        # are in neither nats-py's queue nor the pool, and the drain must not take that for idle.
        self.in_hand = len(batch)
        return batch

    def idle(self) -> bool:
        pending = self.aio_sub.pending_msgs if self.aio_sub is not None else 0
        return not pending and not self.in_hand

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    async def detach(self) -> None:
        self.backend.forget(self)
        try:
            await trio_asyncio.aio_as_trio(self.aio_sub.unsubscribe)()
        except Exception as exc:  # the connection may be gone; the server forgets the interest then too
            logger.debug("unsubscribe failed: %s", exc)


class NatsBackend:
    """A nats-py connection driven from trio; see the module docstring for the bridge design."""

    def __init__(self, nc: Any, nursery: trio.Nursery, url: str) -> None:
        self._nc = nc
        self.js = nc.jetstream()
        self._nursery = nursery
        self._url = url
        self._streams: set[str] = set()
        self._stream_lock = trio.Lock()
        self._pub_send, self._pub_recv = trio.open_memory_channel[_Publish](4096)
        self._settle_queue: list[tuple[Any, str]] = []
        self._settle_wakeup = trio.Event()
        self._settle_flushed = trio.Event()
        self._flush_wanted = False
        self._core_subs: set[_CoreSubscription] = set()
        self._pull_subs: set[PullSubscription] = set()
        #: Highest stream sequence our own publishes got, per topic (drain waits for those too).
        self._published: dict[str, int] = {}
        #: Publishes queued so far: the drain is settled only if none was queued since it last checked.
        self._publish_count = 0
        #: Publishes handed to the pump and not yet written to the connection (the drain waits for them).
        self._unsent = 0
        self._settled_at = -1
        self.closing = False

    @property
    def nc(self) -> Any:
        """The nats-py client (for the JetStream module, which shares the connection)."""
        return self._nc

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def start(self) -> None:
        self._nursery.start_soon(self._publish_pump)
        self._nursery.start_soon(self._settle_pump)

    # -- topics -------------------------------------------------------------------------------------------

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        if config.persistent:
            await self._ensure_stream(topic, config, update=True)

    async def _ensure_stream(self, topic: str, config: TopicConfig, *, update: bool = False) -> None:
        name = stream_name(topic)
        if name in self._streams and not update:
            return
        async with self._stream_lock:
            if name in self._streams and not update:
                return
            try:
                await trio_asyncio.aio_as_trio(self._add_or_update_stream)(stream_config(topic, config))
            except nats.errors.Error as exc:
                raise KeyedBusError(
                    f"could not create the JetStream stream for topic {topic!r}: {exc}; check that "
                    "nats-server runs with JetStream enabled (-js)"
                ) from exc
            self._streams.add(name)

    async def _add_or_update_stream(self, stream: Any) -> None:
        try:
            await self.js.add_stream(stream)
        except nats.js.errors.BadRequestError:
            await self.js.update_stream(stream)

    # -- publishing -----------------------------------------------------------------------------------

    async def publish(self, out: Outgoing) -> None:
        if not out.config.persistent:
            # Core NATS: "sent" means handed to the connection, as in nats-py; the pump sends it in a batch.
            await self._queue_publish(self._core_publish(out))
            return
        await self._ensure_stream(out.topic, out.config)
        # Nats-Msg-Id always: JetStream keeps its own duplicate window, whatever `out.dedup` says.
        done = trio.Event()
        request = _Publish(out.topic, out.data, {**out.headers, MSG_ID_HEADER: out.message_id}, done)
        await self._queue_publish(request)
        await done.wait()
        if request.error is not None:
            raise request.error

    def publish_nowait(self, out: Outgoing) -> None:
        if out.config.persistent:
            raise KeyedBusError(
                f"publish_nowait cannot wait for JetStream's store ack on persistent topic {out.topic!r}: "
                "use 'await bus.publish(...)'"
            )
        self._pub_send.send_nowait(self._core_publish(out))
        self._publish_count += 1
        self._unsent += 1

    async def _queue_publish(self, request: _Publish) -> None:
        # Counted before the send: a send to a waiting pump leaves the channel's buffer empty.
        self._publish_count += 1
        self._unsent += 1
        try:
            await self._pub_send.send(request)
        except BaseException:
            self._unsent -= 1
            raise

    def _core_publish(self, out: Outgoing) -> _Publish:
        topic, data = out.topic, out.data
        limit = int(self._nc.max_payload)
        if len(data) > limit:
            raise PublishError(
                f"message for {topic!r} has {len(data)} bytes, more than the server's max_payload "
                f"({limit}): send a reference to the data, or raise max_payload in nats-server's config"
            )
        return _Publish(topic, data, out.headers, None)

    def published_seq(self, topic: str) -> int:
        """The highest stream sequence our own publishes to `topic` were stored at (0: none)."""
        return self._published.get(topic, 0)

    async def _publish_pump(self) -> None:
        """Cross into asyncio once per batch of publishes; JetStream publishes in a batch are pipelined."""
        async for first in self._pub_recv:
            batch = await _gather(self._pub_recv, first)
            try:
                results = await trio_asyncio.aio_as_trio(self._aio_publish)(batch)
            finally:
                self._unsent -= len(batch)
            self._finish_publishes(batch, results)

    def _finish_publishes(self, batch: list[_Publish], results: list[BaseException | int]) -> None:
        for request, result in zip(batch, results, strict=True):
            if isinstance(result, int):
                if result:  # a stored sequence (core NATS gives 0: nothing to remember)
                    self._published[request.topic] = max(self._published.get(request.topic, 0), result)
            elif request.persistent:
                request.error = result
            else:  # nobody waits for a core publish: say it, never drop it silently
                logger.error("could not send a message to %s: %s", request.topic, result)
            if request.done is not None:
                request.done.set()

    async def _aio_publish(self, batch: list[_Publish]) -> list[BaseException | int]:
        """Publish a batch; each result is the stored sequence (0 on core NATS) or the error."""
        results: list[BaseException | int] = [0] * len(batch)
        pending: list[tuple[int, Any]] = []
        for index, request in enumerate(batch):
            try:
                if request.persistent:
                    pending.append(
                        (index, self.js.publish(request.topic, request.data, headers=request.headers))
                    )
                else:
                    await self._nc.publish(request.topic, request.data, headers=request.headers or None)
            except Exception as exc:
                results[index] = _publish_error(request.topic, exc)
        if pending:
            acks = await asyncio.gather(*(c for _, c in pending), return_exceptions=True)
            for (index, _), ack in zip(pending, acks, strict=True):
                if isinstance(ack, BaseException):
                    results[index] = _publish_error(batch[index].topic, ack)
                else:
                    results[index] = int(ack.seq)
        return results

    # -- subscribing ----------------------------------------------------------------------------------

    async def subscribe(
        self, topic: str, config: TopicConfig, group: str, inbox: Inbox
    ) -> PullSubscription | _CoreSubscription:
        sub: PullSubscription | _CoreSubscription
        if config.persistent:
            await self._ensure_stream(topic, config)
            sub = PullSubscription(self, topic, config, group, inbox)
            try:
                await sub.start(self._nursery)
            except nats.errors.Error as exc:
                raise KeyedBusError(
                    f"could not start the JetStream consumer for topic {topic!r}: {type(exc).__name__}: "
                    f"{exc}; check the connection to {safe_url(self._url)}"
                ) from exc
            self._pull_subs.add(sub)
        else:
            sub = _CoreSubscription(self, topic, inbox)
            await sub.start(group, self._nursery)
            self._core_subs.add(sub)
        return sub

    def slow_consumer(self, sid: int) -> None:
        """nats-py dropped a message for subscription `sid` (its pending buffer was full): count it."""
        for sub in self._core_subs:
            if sub.aio_sub is not None and sub.aio_sub._id == sid:
                sub.inbox.dropped(1, "nats-py's pending buffer for the subscription was full")
                return
        logger.warning("nats-py dropped a message for subscription %s (slow consumer)", sid)

    def forget(self, sub: PullSubscription | _CoreSubscription) -> None:
        """A detached subscription: the drain no longer waits for it."""
        self._pull_subs.discard(sub)
        self._core_subs.discard(sub)

    async def _aio_core_subscribe(self, topic: str, group: str) -> Any:
        # No callback: nats-py queues messages (up to _CORE_BUFFER, then counts a slow-consumer drop) and
        # _aio_take empties the queue in batches.
        sub = await self._nc.subscribe(topic, queue=group, pending_msgs_limit=_CORE_BUFFER)
        await self._nc.flush()  # the server knows the interest before subscribe returns
        return sub

    # -- settling -------------------------------------------------------------------------------------

    def queue_settles(self, settles: Iterable[tuple[Any, str]]) -> None:
        """Queue acks, terms and naks; the settle pump sends them in order, one crossing per batch."""
        self._settle_queue.extend(settles)
        self._settle_wakeup.set()

    async def settle_now(self, settles: list[tuple[Any, str]]) -> None:
        """Queue `settles` behind what is queued, and wait until the server has them all (flushed)."""
        self._settle_queue.extend(settles)
        done = self._settle_flushed
        self._flush_wanted = True
        self._settle_wakeup.set()
        await done.wait()

    async def _settle_pump(self) -> None:
        # One task sends every settle, so a nak queued after an ack reaches the server after it.
        while True:
            await self._settle_wakeup.wait()
            self._settle_wakeup = trio.Event()
            batch, self._settle_queue = self._settle_queue, []
            done, self._settle_flushed = self._settle_flushed, trio.Event()
            flush, self._flush_wanted = self._flush_wanted, False
            if batch or flush:
                await trio_asyncio.aio_as_trio(self._aio_settle)(batch, flush=flush)
            done.set()

    async def _aio_settle(self, batch: list[tuple[Any, str]], *, flush: bool = False) -> None:
        for raw, how in batch:
            try:
                await getattr(raw, how)()
            except Exception as exc:  # a lost ack means a redelivery (attempt > 1), never a loss
                logger.warning("could not %s a message of %s: %s", how, raw.subject, exc)
        if flush:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)

    # -- draining -------------------------------------------------------------------------------------

    async def wait_settled(self) -> None:
        """Wait until every subscribed topic has had what was published before now handled and settled.

        Messages others publish after the drain began are left for the next consumer.
        """
        while True:
            if self._unsent:
                await trio.sleep(0.01)  # our own publishes first: they may go to a subscribed topic
                continue
            count = self._publish_count
            try:
                # After the PONG, all the server sent us before is in our buffers.
                await trio_asyncio.aio_as_trio(self._nc.flush)(2)
                caught_up = [await sub.caught_up() for sub in list(self._pull_subs)]
            except Exception as exc:  # disconnected: keep waiting, bounded by drain_timeout
                logger.debug("drain check failed: %s", exc)
                caught_up = [False]
            if all(caught_up) and all(sub.idle() for sub in self._core_subs) and not self._settle_queue:
                self._settled_at = count
                return
            await trio.sleep(0.02)

    def lag(self) -> int:
        return sum(sub.lag for sub in self._pull_subs)

    # -- inspection (the command line) -------------------------------------------------------------------

    async def topic_state(self, topic: str) -> dict[str, Any]:
        """The stream of a persistent topic and its consumers: stored, pending, redelivered, lag."""
        return dict(await trio_asyncio.aio_as_trio(self._aio_topic_state)(topic))

    async def _aio_topic_state(self, topic: str) -> dict[str, Any]:
        name = stream_name(topic)
        try:
            info = await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            raise KeyedBusError(
                f"topic {topic!r} has no JetStream stream on {safe_url(self._url)}: nothing was published to "
                "it as a persistent topic"
            ) from None
        consumers = []
        for c in await self.js.consumers_info(name):
            consumers.append(
                {
                    "consumer": c.name,
                    "lag": c.num_pending or 0,
                    "unacked": c.num_ack_pending or 0,
                    "redelivered": c.num_redelivered or 0,
                    "ack_floor": c.ack_floor.stream_seq if c.ack_floor else 0,
                }
            )
        state = info.state
        return {
            "topic": topic,
            "stream": name,
            "messages": state.messages,
            "bytes": state.bytes,
            "first_seq": state.first_seq,
            "last_seq": state.last_seq,
            "consumers": consumers,
        }

    async def stored(self, topic: str) -> list[tuple[int, Message]]:
        """Every message stored for a persistent topic, with its stream sequence, oldest first."""
        state = await self.topic_state(topic)
        seqs = range(state["first_seq"], state["last_seq"] + 1) if state["messages"] else range(0)
        found: list[tuple[int, Message]] = []
        for start in range(0, len(seqs), 1024):
            chunk = await trio_asyncio.aio_as_trio(_aio_get_messages)(
                self.js, stream_name(topic), seqs[start : start + 1024]
            )
            found += [(seq, message_from(topic, raw.data, raw.headers, 1)) for seq, raw in chunk]
        return found

    async def delete_stored(self, topic: str, seq: int) -> None:
        """Remove one stored message (a replayed dead letter) from a persistent topic's stream."""
        await trio_asyncio.aio_as_trio(self.js.delete_msg)(stream_name(topic), seq)

    async def jetstream_info(self) -> str:
        """A line on JetStream availability for this account, or why it is not available."""
        try:
            info = await trio_asyncio.aio_as_trio(self.js.account_info)()
        except Exception as exc:
            return f"not available ({type(exc).__name__}: {exc}); start nats-server with -js"
        return f"available ({info.streams} stream(s), {info.consumers} consumer(s))"

    def settled(self) -> bool:
        return (
            self._settled_at == self._publish_count
            and not self._settle_queue
            and all(sub.idle() for sub in self._core_subs)
            and all(sub.idle() for sub in self._pull_subs)
        )

    async def aclose(self) -> None:
        """Hand back what is unsettled (nak, oldest first), send queued acks, close (bounded, shielded)."""
        self.closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                # The pumps are stopped by now: send what they still held directly.
                unsent: list[_Publish] = []
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        unsent.append(self._pub_recv.receive_nowait())
                if unsent:
                    results = await trio_asyncio.aio_as_trio(self._aio_publish)(unsent)
                    self._finish_publishes(unsent, results)
                naks = [(raw, "nak") for sub in self._pull_subs for raw in sub.unsettled()]
                if naks:
                    logger.warning("handing %d unsettled message(s) back to JetStream", len(naks))
                batch, self._settle_queue = self._settle_queue + naks, []
                if batch:
                    await trio_asyncio.aio_as_trio(self._aio_settle)(batch, flush=True)
                await trio_asyncio.aio_as_trio(self._nc.close)()
            except Exception as exc:
                logger.warning("closing the NATS connection to %s failed: %s", safe_url(self._url), exc)


async def _gather(receive: trio.MemoryReceiveChannel[_Publish], first: _Publish) -> list[_Publish]:
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


async def _aio_take(sub: Any) -> list[Any]:
    """Wait for messages on a core subscription and take up to a batch: one asyncio step per batch.

    nats-py has no batch API, so this reads its pending queue (a subscription made without a callback only
    fills that queue) and keeps its byte count, exactly as its own next_msg() does.
    """
    queue = sub._pending_queue
    batch = [await queue.get()]
    while len(batch) < _BATCH:
        try:
            batch.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    sub._pending_size -= sum(len(m.data) for m in batch)
    return batch


def _publish_error(topic: str, exc: BaseException) -> KeyedBusError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PublishError(f"message for {topic!r} is larger than the server's max_payload: {exc}")
    return PublishError(f"the broker did not store a message for {topic!r}: {type(exc).__name__}: {exc}")


def open_loop() -> Any:
    """The trio-asyncio loop every nats-py call runs on; open it outside the bus's nursery."""
    return trio_asyncio.open_loop()


async def connect(
    url: str, nursery: trio.Nursery, *, connect_timeout: float, options: dict[str, Any]
) -> NatsBackend:
    """Connect to the NATS servers in `url` and start the pumps in `nursery`.

    Raises ConnectionFailedError naming the servers (never the credentials) when none answers within
    `connect_timeout` seconds or the server refuses the connection.
    """
    shown = safe_url(url)
    servers = [s.strip() for s in url.split(",")]
    secrets = _secrets(url, options)
    refused: list[str] = []
    attempt = trio.CancelScope(deadline=trio.current_time() + connect_timeout)

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError) and backend is not None:
            backend.slow_consumer(exc.sid)
            return
        text = _scrub(f"{type(exc).__name__}: {exc}", secrets)
        if _is_auth_error(exc):
            # Retrying cannot fix wrong credentials: stop the initial connect now, say why.
            refused.append(text)
            if nc is None:
                # Not from inside this callback: nats-py closes the refused socket right after it returns.
                asyncio.get_running_loop().call_later(0.05, attempt.cancel)
        logger.warning("NATS connection to %s: %s", shown, text)

    async def on_disconnect() -> None:
        if backend is None or not backend.closing:
            logger.warning("disconnected from NATS at %s; reconnecting", shown)

    async def on_reconnect() -> None:
        logger.warning("reconnected to NATS at %s", shown)

    backend: NatsBackend | None = None
    nc: Any = None
    client = nats.aio.client.Client()
    try:
        with attempt:
            try:
                await trio_asyncio.aio_as_trio(client.connect)(
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
                await trio_asyncio.aio_as_trio(client.close)()
    if nc is None and refused:
        raise ConnectionFailedError(
            f"the NATS server at {shown} refused the connection ({refused[-1]}): check user/password, "
            "token or credentials file"
        )
    if nc is None:
        raise ConnectionFailedError(
            f"no NATS server answered at {shown} within connect_timeout={connect_timeout} s: check the "
            "address and that nats-server runs there"
        )
    backend = NatsBackend(nc, nursery, url)
    await backend.start()
    return backend


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
