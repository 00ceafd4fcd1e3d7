"""The NATS backend: core NATS for ephemeral topics, JetStream (see `jetstream`) for persistent ones.

Only the NATS backend modules import asyncio code. The connection and its pumps live in `_connection`;
every private nats-py detail lives in `_natspy`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import attrs
import nats.errors
import nats.js.errors
import trio

from .._config import TopicConfig
from .._errors import KeyedBusError, MessageTooLargeError
from .._messages import KEY_HEADER, Message
from . import _natspy, _scaleout
from ._aio import aio, loop_running
from ._base import AtMostOnceDelivery, Inbox, Outgoing
from ._connection import NatsConnection, Publish, message_from, open_loop, publish_error, wire_headers
from ._connection import connect as _connect
from ._group import GroupSubscription
from ._streams import consumer_name, explicit_settings, group_of
from ._urls import safe_url
from .jetstream import Streams, aio_get_messages

__all__ = ["NatsBackend", "connect", "open_loop", "safe_url"]

logger = logging.getLogger("keyedbus")

_BATCH = 256
#: Messages waiting in one core-NATS subscription before new ones are dropped (and counted).
_CORE_BUFFER = 65_536


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
        self.aio_sub = await aio(self.backend.aio_core_subscribe)(self.topic, group)
        await nursery.start(self._read)

    async def _read(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Take what nats-py queued, in batches, from this trio task: no crossing into asyncio per batch.

        nats-py's reader wakes this task when it queues a message (`_natspy.wake_on_put`).
        """
        sub, topic = self.aio_sub, self.topic
        try:
            with self._scope:
                task_status.started()
                while True:
                    raw = _natspy.take_nowait(sub, _BATCH)
                    if not raw:
                        arrived = trio.Event()
                        _natspy.wake_on_put(sub, arrived.set)
                        try:
                            await arrived.wait()
                        finally:
                            _natspy.wake_on_put(sub, None)
                        continue
                    # Neither in nats-py's queue nor in the pool until deliver returns: the drain must not
                    # take that for idle.
                    self.in_hand = len(raw)
                    await self.inbox.deliver(
                        [AtMostOnceDelivery(message_from(topic, m.data, m.headers, 1)) for m in raw]
                    )
                    self.in_hand = 0
        finally:
            self._stopped.set()

    def idle(self) -> bool:
        pending = self.aio_sub.pending_msgs if self.aio_sub is not None else 0
        return not pending and not self.in_hand

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    def write_off(self, why: str) -> None:
        """Count as dropped (and log) what nats-py still buffers: this subscription will never take it."""
        left = len(_natspy.take_nowait(self.aio_sub)) if self.aio_sub is not None else 0
        if left:
            self.inbox.dropped(left, why)

    async def detach(self) -> None:
        self.backend.forget(self)
        try:
            await aio(self.aio_sub.unsubscribe)()
        except Exception as exc:  # the connection may be gone; the server forgets the interest then too
            logger.debug("unsubscribe failed: %s", exc)
        self.write_off("unsubscribed with them still in nats-py's buffer")


class NatsBackend:
    """Ephemeral topics on core NATS, persistent ones on JetStream, over one `NatsConnection`."""

    def __init__(self, conn: NatsConnection, nursery: trio.Nursery) -> None:
        self._conn = conn
        self._nursery = nursery
        self._nc = conn.nc
        self.js = conn.js
        self._url = conn.url
        self._streams = Streams(conn)
        #: Settings configure_topic set explicitly, per topic: the only ones changed on what exists.
        self._explicit: dict[str, dict[str, Any]] = {}
        self._core_subs: set[_CoreSubscription] = set()
        self._pull_subs: set[GroupSubscription] = set()
        self._settled_at = -1
        conn.on_slow_consumer = self.slow_consumer

    @property
    def connected(self) -> bool:
        return self._conn.connected

    # -- topics -------------------------------------------------------------------------------------------

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        if config.persistent:
            explicit = explicit_settings(config)
            self._explicit[topic] = explicit
            await self._streams.ensure(topic, config, explicit=explicit)

    # -- publishing -----------------------------------------------------------------------------------

    async def publish(self, out: Outgoing) -> None:
        if not out.config.persistent:
            # Core NATS: "sent" means handed to the connection, as in nats-py: written into its buffer here.
            await self._conn.publish_core(out, self._core_command(out))
            return
        for attempt in (1, 2):
            request = self._request(out)
            stream = await self._streams.ensure(out.topic, out.config)
            partitions = stream.partitions(out.topic)
            if partitions > 1:
                key = out.headers.get(KEY_HEADER)
                request.subject = _scaleout.publish_subject(out.topic, partitions, key, out.message_id)
            await self._conn.queue_publish(request)
            await request.done.wait()
            error = request.error
            if error is None:
                return
            if attempt == 1 and isinstance(error.__cause__, nats.js.errors.NoStreamResponseError):
                # No stream captures the subject any more: deleted, or a server restarted with an empty
                # store. Create it again (what exists is looked up first) and publish once more: safe, as
                # the message id deduplicates.
                logger.warning(
                    "topic %s has no JetStream stream any more (deleted, or the server lost its store); "
                    "creating it again",
                    out.topic,
                    extra={"topic": out.topic},
                )
                self._streams.forget(out.topic)
                continue
            # Raised in the pump's task; raised again here with the same cause.
            raise error from error.__cause__

    def publish_keyed(
        self, topic: str, config: TopicConfig, data: bytes, key: str, message_id: str, size: int
    ) -> Coroutine[Any, Any, None]:
        # Its coroutine, not awaited here: no coroutine level more than `publish`.
        return self.publish(Outgoing(topic, config, data, {KEY_HEADER: key}, message_id, False, size))

    def publish_nowait(self, out: Outgoing) -> None:
        if out.config.persistent:
            raise KeyedBusError(
                f"publish_nowait cannot wait for JetStream's store ack on persistent topic {out.topic!r}: "
                "use 'await bus.publish(...)'"
            )
        self._conn.publish_core_nowait(out, self._core_command(out))

    def _core_command(self, out: Outgoing) -> bytes:
        """The protocol command of a core publish (with Nats-Msg-Id, see `wire_headers`), checked against
        the server's max_payload."""
        try:
            command, size = _natspy.publish_command(out.topic, out.data, out.headers, out.message_id)
        except nats.errors.Error as exc:
            raise publish_error(out, exc, sent=False) from exc
        self._check_size(out, size)
        return command

    def _request(self, out: Outgoing) -> Publish:
        """The JetStream publish for the pump, checked against the server's max_payload at the call."""
        request = Publish(out.topic, out.data, wire_headers(out), out.message_id)
        self._check_size(request, _natspy.encoded_size(out.data, request.headers))
        return request

    def _check_size(self, out: Outgoing | Publish, size: int) -> None:
        limit = int(self._nc.max_payload)
        if size > limit:
            # nats-py checks the payload alone; the server counts headers too and would drop the
            # connection, failing every publish queued behind this one.
            raise MessageTooLargeError(
                f"message {out.message_id!r} for {out.topic!r} is {size} bytes ({len(out.data)} of data + "
                f"{size - len(out.data)} of encoded headers), more than the server's max_payload ({limit}): "
                "send a reference to the data, or raise max_payload in nats-server's config",
                size=size,
                limit=limit,
                topic=out.topic,
                message_id=out.message_id,
            )

    # -- subscribing ----------------------------------------------------------------------------------

    async def subscribe(
        self, topic: str, config: TopicConfig, group: str, inbox: Inbox
    ) -> GroupSubscription | _CoreSubscription:
        sub: GroupSubscription | _CoreSubscription
        if config.persistent:
            stream = await self._streams.ensure(topic, config)
            # The partitions the stream has, whatever this process configured (see docs/scaling.md).
            config = attrs.evolve(config, partitions=stream.partitions(topic))
            sub = GroupSubscription(
                self._conn,
                topic,
                config,
                group,
                inbox,
                stream=stream,
                streams=self._streams,
                on_detach=self.forget,
                explicit=self._explicit.get(topic),
            )
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
            if sub.aio_sub is not None and _natspy.subscription_id(sub.aio_sub) == sid:
                sub.inbox.dropped(1, "nats-py's pending buffer for the subscription was full")
                return
        logger.warning("nats-py dropped a message for subscription %s (slow consumer)", sid)

    def forget(self, sub: GroupSubscription | _CoreSubscription) -> None:
        """A detached subscription: the drain no longer waits for it."""
        self._pull_subs.discard(sub)
        self._core_subs.discard(sub)

    async def aio_core_subscribe(self, topic: str, group: str) -> Any:
        # No callback: nats-py queues messages (up to _CORE_BUFFER, then counts a slow-consumer drop) and
        # _aio_take empties the queue in batches.
        sub = await self._nc.subscribe(topic, queue=group, pending_msgs_limit=_CORE_BUFFER)
        _natspy.make_waking(sub)
        await self._nc.flush()  # the server knows the interest before subscribe returns
        return sub

    # -- draining -------------------------------------------------------------------------------------

    async def wait_settled(self) -> None:
        """Wait until every subscribed topic has had what was published before now handled and settled.

        While it waits, JetStream readers fetch no further than what was published when it began (what
        others publish meanwhile is left for later, or for the next consumer when the bus is leaving); once
        it returns or is cancelled they read on.
        """
        try:
            await self._wait_settled()
        finally:
            for sub in list(self._pull_subs):
                sub.drain_checked()

    async def _wait_settled(self) -> None:
        while True:
            if self._conn.unsent:
                await trio.sleep(0.01)  # our own publishes first: they may go to a subscribed topic
                continue
            count = self._conn.publish_count
            try:
                # After the PONG, all the server sent us before is in our buffers.
                await aio(self._nc.flush)(2)
                caught_up = [await sub.caught_up() for sub in list(self._pull_subs)]
            except Exception as exc:  # disconnected: keep waiting, bounded by drain_timeout
                logger.debug("drain check failed: %s", exc)
                caught_up = [False]
            core_idle = all(sub.idle() for sub in self._core_subs)
            if all(caught_up) and core_idle and not self._conn.settles_queued:
                self._settled_at = count
                return
            await trio.sleep(0.02)

    def lag(self) -> int:
        return sum(sub.lag for sub in self._pull_subs)

    def recovering(self) -> int:
        """Subscriptions whose JetStream consumer or stream vanished and is being recreated now."""
        return sum(sub.recovering for sub in self._pull_subs)

    def evicted(self) -> int:
        """Stored messages a subscription found removed (limits, deletions) before its group got them."""
        return self._conn.evicted

    def partitions(self) -> dict[tuple[str, str | None], tuple[int, ...]]:
        """The partitions this process reads now, per persistent (topic, group) subscription."""
        return {(sub.topic, sub.group or None): sub.reading for sub in self._pull_subs}

    # -- inspection (the command line) -------------------------------------------------------------------

    async def topic_state(self, topic: str) -> dict[str, Any]:
        """The stream of a persistent topic and its consumers: stored, pending, redelivered, lag."""
        return dict(await aio(self._aio_topic_state)(topic))

    async def _aio_topic_state(self, topic: str) -> dict[str, Any]:
        found = await self._streams.aio_find(topic)
        if found is None:
            raise KeyedBusError(
                f"topic {topic!r} has no JetStream stream on {safe_url(self._url)}: nothing was published to "
                "it as a persistent topic"
            )
        info, name = found, found.config.name
        consumers = []
        for c in await self.js.consumers_info(name):
            consumers.append(
                {
                    "group": group_of(topic, c.name),
                    "partition": _scaleout.partition_of_consumer(c.name),
                    "consumer": c.name,
                    "lag": c.num_pending or 0,
                    "unacked": c.num_ack_pending or 0,
                    "redelivered": c.num_redelivered or 0,
                    "ack_floor": c.ack_floor.stream_seq if c.ack_floor else 0,
                }
            )
        groups = []
        for group in sorted({c["group"] for c in consumers if c["group"] is not None}):
            records = await _scaleout.aio_group_records(self.js, consumer_name(topic, group))
            members = [
                {"member": r.member, "host": r.host, "pid": r.pid, "partitions": list(r.partitions)}
                for r in records
            ]
            groups.append({"group": group, "members": members})
        state = info.state
        return {
            "topic": topic,
            "stream": name,
            "partitions": _scaleout.partitions_of_subjects(topic, info.config.subjects or ()) or 1,
            "groups": groups,
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
            chunk = await aio(aio_get_messages)(self.js, state["stream"], seqs[start : start + 1024])
            found += [
                (seq, message_from(topic, raw.data, raw.headers, 1))
                for seq, raw in chunk
                if raw.subject == topic  # a shared stream (an operator's `billing.>`) holds other topics
            ]
        return found

    @contextlib.asynccontextmanager
    async def watch(self, topic: str) -> AsyncIterator[trio.MemoryReceiveChannel[Message]]:
        """Yield a channel of the messages published to `topic` from now on, persistent or not, every
        partition included, until the block is left.

        A plain subscription to the topic's subjects (the topic, and ``<topic>.~<n>`` where a partitioned
        topic stores its messages, see docs/scaling.md): nothing is created on the server, nothing is acked,
        leaving unsubscribes. A reader slower than the publishers loses messages past nats-py's buffer
        (logged as a slow consumer).
        """
        # nats-py takes no "~*" token, so partitions come through "<topic>.*", filtered here (other topics
        # one token below this one are not this topic's messages).
        partition = re.compile(re.escape(topic) + r"\.~[0-9]+")
        subjects = [topic, f"{topic}.*"]
        subs = [await aio(self.aio_core_subscribe)(subject, "") for subject in subjects]
        send, receive = trio.open_memory_channel[Message](_BATCH)

        async def pump(sub: Any, wildcard: bool) -> None:
            while True:
                batch = await aio(_natspy.take)(sub, _BATCH)
                for raw in batch:
                    if not wildcard or partition.fullmatch(raw.subject):
                        await send.send(message_from(topic, raw.data, raw.headers, 1))

        try:
            async with trio.open_nursery() as nursery:
                for sub, subject in zip(subs, subjects, strict=True):
                    nursery.start_soon(pump, sub, subject != topic)
                yield receive
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for sub in subs:
                    with contextlib.suppress(Exception):  # the connection may be gone: so is the interest
                        await aio(sub.unsubscribe)()

    async def delete_group(self, topic: str, group: str) -> bool:
        """Delete the durable consumers of (topic, group) (one per partition), and so its position; False if
        there is none."""
        state = await self.topic_state(topic)
        names = [c["consumer"] for c in state["consumers"] if c["group"] == group]
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):  # deleted meanwhile
                await aio(self.js.delete_consumer)(state["stream"], name)
        return bool(names)

    async def delete_stored(self, topic: str, seq: int) -> None:
        """Remove one stored message (a replayed dead letter) from a persistent topic's stream."""
        state = await self.topic_state(topic)
        await aio(self.js.delete_msg)(state["stream"], seq)

    async def jetstream_info(self) -> str:
        """A line on JetStream availability for this account, or why it is not available."""
        try:
            info = await aio(self.js.account_info)()
        except Exception as exc:
            return f"not available ({type(exc).__name__}: {exc}); start nats-server with -js"
        return f"available ({info.streams} stream(s), {info.consumers} consumer(s))"

    def settled(self) -> bool:
        return (
            self._settled_at == self._conn.publish_count
            and not self._conn.settles_queued
            and all(sub.idle() for sub in self._core_subs)
            and all(sub.idle() for sub in self._pull_subs)
        )

    async def aclose(self) -> None:
        """Close in one order: stop pulling, nak what is unsettled (oldest first), flush, close.

        Stopping the pulls first (unsubscribing each pull inbox, which makes the server drop our waiting pull
        requests) keeps a nak'd message from landing in a request of ours, where it would wait out ack_wait
        before the group's next subscriber saw it. Shielded and bounded (5 s); if the asyncio loop is gone
        (an interrupted process), nothing can be sent: the unsettled messages are redelivered after ack_wait.
        """
        self._conn.closing = True
        try:
            await self._close()
        finally:
            # Core NATS is at-most-once, but nothing goes silently: what nats-py still buffers is dropped.
            for sub in list(self._core_subs):
                sub.write_off("the bus closed with them still in nats-py's buffer")

    async def _close(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            if not loop_running():
                unsettled = sum(len(sub.unsettled()) for sub in self._pull_subs)
                logger.warning(
                    "the NATS connection to %s is gone with its asyncio loop; %d unsettled message(s) are "
                    "redelivered after ack_wait",
                    safe_url(self._url),
                    unsettled,
                )
                return
            try:
                # The pumps are stopped by now: send what they still held directly.
                await self._conn.flush_unsent()
                late = await aio(self._aio_stop_pulling)(list(self._pull_subs))
                naks = [(raw, "nak") for sub in self._pull_subs for raw in sub.unsettled()]
                naks += [(raw, "nak") for raw in late]
                if naks:
                    logger.warning("handing %d unsettled message(s) back to JetStream", len(naks))
                batch = self._conn.take_settles() + naks
                if batch:
                    await aio(self._conn.aio_settle)(batch, flush=True)
                await aio(self._nc.close)()
            except Exception as exc:
                logger.warning("closing the NATS connection to %s failed: %s", safe_url(self._url), exc)

    async def _aio_stop_pulling(self, subs: list[GroupSubscription]) -> list[Any]:
        """Unsubscribe every pull inbox; return messages that arrived for a request but were never taken."""
        late: list[Any] = []
        for part in [part for sub in subs for part in sub.parts]:
            try:
                late += await part.puller.close()
            except Exception as exc:  # the connection may be gone: the server forgets the interest then too
                logger.debug("unsubscribe failed: %s", exc)
        return late


async def connect(
    url: str, nursery: trio.Nursery, *, connect_timeout: float, options: dict[str, Any]
) -> NatsBackend:
    """Connect to the NATS servers in `url` (see `_connection.connect`) and return the backend."""
    conn = await _connect(url, nursery, connect_timeout=connect_timeout, options=options)
    return NatsBackend(conn, nursery)
