"""JetStream for persistent topics: one stream per topic, one durable pull consumer per (topic, group).

Order across a consumer crash is the hard part. JetStream gives the unsettled messages of a dead consumer
back only when their `ack_wait` expires, while newer messages flow to its successor at once. So a new
subscription reads the consumer's state first: every stream sequence between the ack floor and the last
delivered one may still be owed. It reads those messages back by sequence to learn their keys, and holds
newer messages of those keys until every owed one has been redelivered (and queued in front of them) or
the ack floor shows it was settled after all. Other keys flow at once.

Retries stay in this process: the pool parks the key and the message is kept alive with `in_progress()`
heartbeats; a `nak()` would let later messages of the key overtake it. Hand-backs (unsubscribe, shutdown)
`nak()` what is unsettled, oldest first, so the group's next subscriber gets it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs
import nats.errors
import nats.js.api
import nats.js.errors
import trio
import trio_asyncio

from .._config import TopicConfig
from .._messages import KEY_HEADER, MSG_ID_HEADER, Message
from .._pool import fnv1a_32
from ._base import Inbox

if TYPE_CHECKING:
    from .nats import NatsBackend

__all__ = [
    "DUPLICATE_WINDOW",
    "FETCH_BATCH",
    "MAX_ACK_PENDING",
    "JetStreamDelivery",
    "PullSubscription",
    "consumer_name",
    "stream_config",
    "stream_name",
]

logger = logging.getLogger("keyedbus")

#: Messages asked for in one pull request.
FETCH_BATCH = 256
#: Seconds one pull request waits on the server; also how long a stop waits for the fetch in flight.
_FETCH_WAIT = 0.5
#: Unacked messages one durable consumer may have outstanding: what bounds memory on the consumer side.
MAX_ACK_PENDING = 20_000
#: Seconds during which a message id seen before is not stored again.
DUPLICATE_WINDOW = 120.0
#: Owed sequences a new subscription reads back; past this it holds every key until the floor passes them.
_OWED_READ_LIMIT = 50_000
#: Seconds between reads of the consumer's ack floor while keys are held.
_FLOOR_POLL = 0.5


def _name(prefix: str, text: str) -> str:
    """A JetStream name (no dots) unique per text: a readable part plus a stable hash."""
    return f"{prefix}_{text.replace('.', '_')[:80]}_{fnv1a_32(text):08x}"


def stream_name(topic: str) -> str:
    """The stream that stores `topic` (its only subject is the topic)."""
    return _name("KB", topic)


def consumer_name(topic: str, group: str) -> str:
    """The durable pull consumer of (topic, group); the default group is called "default"."""
    return _name("KBC", f"{topic}.{group or 'default'}")


def stream_config(topic: str, config: TopicConfig) -> Any:
    """The StreamConfig for `topic`: file storage, limits from `config`, a 120 s duplicate window."""
    return nats.js.api.StreamConfig(
        name=stream_name(topic),
        subjects=[topic],
        max_age=config.max_age,
        max_bytes=config.max_bytes or -1,
        max_msgs=config.max_msgs or -1,
        num_replicas=config.replicas,
        duplicate_window=DUPLICATE_WINDOW,
        storage=nats.js.api.StorageType.FILE,
    )


def _consumer_config(durable: str, config: TopicConfig) -> Any:
    return nats.js.api.ConsumerConfig(
        durable_name=durable,
        ack_policy=nats.js.api.AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait,
        max_ack_pending=MAX_ACK_PENDING,
        deliver_policy=nats.js.api.DeliverPolicy.ALL,
    )


def message_from(topic: str, data: bytes | None, headers: dict[str, str] | None, attempt: int) -> Message:
    """A Message from what the wire carried."""
    headers = dict(headers or {})
    return Message(
        topic=topic,
        data=data or b"",
        key=headers.get(KEY_HEADER),
        headers=headers,
        attempt=attempt,
        message_id=headers.get(MSG_ID_HEADER, ""),
    )


@attrs.define(eq=False)
class JetStreamDelivery:
    """One message delivered by a durable consumer; settled at most once."""

    sub: PullSubscription
    raw: Any  # nats.aio.msg.Msg: the newest delivery of this stream sequence
    seq: int
    message: Message
    settled: bool = False

    def ack(self) -> None:
        self.sub.settle(self, "ack")

    def term(self) -> None:
        self.sub.settle(self, "term")

    def release(self) -> None:
        # Stays outstanding: detach (or close) naks every unsettled message together, oldest first, once
        # nothing can fetch it back into this subscription.
        pass


class PullSubscription:
    """A durable pull consumer feeding one Inbox, holding keys still owed by an earlier consumer."""

    def __init__(
        self, backend: NatsBackend, topic: str, config: TopicConfig, group: str, inbox: Inbox
    ) -> None:
        self.backend = backend
        self.topic = topic
        self.config = config
        self.inbox = inbox
        self.stream = stream_name(topic)
        self.durable = consumer_name(topic, group)
        self.psub: Any = None
        #: Delivered and unsettled, by stream sequence (queued, parked, running or held).
        self.outstanding: dict[int, JetStreamDelivery] = {}
        #: Sequences an earlier consumer left unsettled, in order, with their keys.
        self.owed: dict[int, str] = {}
        self.owed_per_key: dict[str, int] = {}
        #: Highest sequence delivered before this subscription started; later ones are new.
        self.owed_until = 0
        #: When the owed range was too long to read: hold every key until the ack floor reaches this.
        self.hold_all_until = 0
        self.held: dict[str, list[JetStreamDelivery]] = {}
        self.last_seen = 0
        self.stopping = False
        self.drain_target: int | None = None
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._next_floor_poll = 0.0

    # -- starting ---------------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Bind the durable consumer, learn what an earlier consumer still owes, start reading."""
        js = self.backend.js
        self.psub = await trio_asyncio.aio_as_trio(js.pull_subscribe)(
            self.topic,
            durable=self.durable,
            stream=self.stream,
            config=_consumer_config(self.durable, self.config),
        )
        info = await trio_asyncio.aio_as_trio(js.consumer_info)(self.stream, self.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        self.owed_until = self.last_seen = delivered
        if info.num_ack_pending:
            await self._learn_owed(floor, delivered)
        await nursery.start(self._run)

    async def _learn_owed(self, floor: int, delivered: int) -> None:
        if delivered - floor > _OWED_READ_LIMIT:
            self.hold_all_until = delivered
            logger.warning(
                "%s: an earlier consumer left up to %d message(s) unsettled, too many to read back; holding "
                "every key until they are redelivered (at most ack_wait=%s s)",
                self.durable,
                delivered - floor,
                self.config.ack_wait,
                extra={"topic": self.topic},
            )
            return
        stored = await trio_asyncio.aio_as_trio(_aio_get_messages)(
            self.backend.js, self.stream, range(floor + 1, delivered + 1)
        )
        for seq, raw in stored:
            key = self.inbox.key_of(message_from(self.topic, raw.data, raw.headers, 1))
            if key is not None:
                self.owed[seq] = key
                self.owed_per_key[key] = self.owed_per_key.get(key, 0) + 1
        if self.owed:
            logger.info(
                "%s: an earlier consumer left messages %d..%d unsettled; holding %d key(s) until they are "
                "redelivered (at most ack_wait=%s s)",
                self.durable,
                floor + 1,
                delivered,
                len(self.owed_per_key),
                self.config.ack_wait,
                extra={"topic": self.topic},
            )

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat)
                    task_status.started()
                    await self._read()
                    nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    # -- reading ----------------------------------------------------------------------------------------

    async def _read(self) -> None:
        while not self.stopping:
            if self.owed or self.hold_all_until:
                await self._poll_floor()
            if self._drained_far_enough():
                await trio.sleep(0.02)
                continue
            try:
                raw = await trio_asyncio.aio_as_trio(_aio_fetch)(self.psub)
            except Exception as exc:  # the connection is down or the server restarts: nats-py reconnects
                logger.warning("%s: fetch failed (%s: %s); retrying", self.durable, type(exc).__name__, exc)
                await trio.sleep(_FETCH_WAIT)
                continue
            batch = self._accept(raw)
            if self.stopping:
                return  # fetched after stop(): outstanding, so detach or close hands it back
            if batch:
                await self.inbox.deliver(batch)

    def _drained_far_enough(self) -> bool:
        """While draining: everything published before the drain began has been fetched."""
        if self.drain_target is None or self.owed or self.hold_all_until:
            return False
        return self.last_seen >= max(self.drain_target, self.backend.published_seq(self.topic))

    def _accept(self, raw: list[Any]) -> list[JetStreamDelivery]:
        """Track a fetched batch; return what may be queued now, holding keys still owed a message."""
        ready: list[JetStreamDelivery] = []
        for m in raw:
            meta = m.metadata
            seq = meta.sequence.stream
            self.last_seen = max(self.last_seen, seq)
            current = self.outstanding.get(seq)
            if current is not None:
                # Redelivered while this process still has it (its ack_wait passed while the broker was
                # away): keep one copy, settled through the newest delivery.
                current.raw = m
                continue
            message = message_from(self.topic, m.data, m.headers, meta.num_delivered)
            delivery = JetStreamDelivery(self, m, seq, message)
            self.outstanding[seq] = delivery
            key = self.owed.pop(seq, None)
            if key is not None:
                ready.append(delivery)
                ready.extend(self._paid(key))
            elif seq > self.owed_until and (self.owed_per_key or self.hold_all_until or self.held):
                key = self.inbox.key_of(delivery.message)
                if key is not None and (self.hold_all_until or key in self.owed_per_key or key in self.held):
                    self.held.setdefault(key, []).append(delivery)
                else:
                    ready.append(delivery)
            else:
                ready.append(delivery)
        return ready

    def _paid(self, key: str) -> list[JetStreamDelivery]:
        """One owed message of `key` is accounted for; return its held messages if it owes no more."""
        left = self.owed_per_key[key] - 1
        if left:
            self.owed_per_key[key] = left
            return []
        del self.owed_per_key[key]
        if self.hold_all_until:
            return []
        return self.held.pop(key, [])

    async def _poll_floor(self) -> None:
        """Read the ack floor; owed messages below it were settled after all, so their keys go free."""
        now = trio.current_time()
        if now < self._next_floor_poll:
            return
        self._next_floor_poll = now + _FLOOR_POLL
        try:
            info = await trio_asyncio.aio_as_trio(self.backend.js.consumer_info)(self.stream, self.durable)
        except Exception as exc:
            logger.debug("%s: consumer_info failed: %s", self.durable, exc)
            return
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        ready: list[JetStreamDelivery] = []
        for seq in [s for s in self.owed if s <= floor]:
            ready.extend(self._paid(self.owed.pop(seq)))
        if self.hold_all_until and floor >= self.hold_all_until:
            self.hold_all_until = 0
            for key in [k for k in self.held if k not in self.owed_per_key]:
                ready.extend(self.held.pop(key))
        if ready:
            ready.sort(key=lambda d: d.seq)
            await self.inbox.deliver(ready)

    async def _heartbeat(self) -> None:
        """Tell JetStream that queued, parked, held and running messages are still being worked on."""
        while True:
            await trio.sleep(self.config.ack_wait / 3)
            alive = [d.raw for d in self.outstanding.values()]
            if alive:
                await trio_asyncio.aio_as_trio(_aio_in_progress)(alive)

    # -- settling and stopping --------------------------------------------------------------------------

    def settle(self, delivery: JetStreamDelivery, how: str) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        if self.outstanding.get(delivery.seq) is delivery:
            del self.outstanding[delivery.seq]
        self.backend.queue_settles([(delivery.raw, how)])

    def unsettled(self) -> list[Any]:
        """Mark every outstanding message settled and return them oldest first, for a nak."""
        naks = [d for _, d in sorted(self.outstanding.items())]
        for delivery in naks:
            delivery.settled = True
        self.outstanding.clear()
        self.held.clear()
        return [d.raw for d in naks]

    async def stop(self) -> None:
        """Stop fetching: let the fetch in flight end (so nothing is left in a dead pull request)."""
        self.stopping = True
        with trio.move_on_after(_FETCH_WAIT * 2 + 1):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()

    async def detach(self) -> None:
        """Drop the client side, then hand every unsettled message back to the group, oldest first.

        Unsubscribing first matters: a nak'd message must not land in a pull request of this subscription.
        """
        self.backend.forget(self)
        try:
            await trio_asyncio.aio_as_trio(self.psub.unsubscribe)()
        except Exception as exc:  # the connection may be gone; the server forgets the interest then too
            logger.debug("unsubscribe failed: %s", exc)
        await self.backend.settle_now([(raw, "nak") for raw in self.unsettled()])

    # -- draining ---------------------------------------------------------------------------------------

    async def caught_up(self) -> bool:
        """True once everything published up to the drain's start (and our own later publishes) is settled."""
        info = await trio_asyncio.aio_as_trio(self.backend.js.consumer_info)(self.stream, self.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        delivered = info.delivered.stream_seq if info.delivered else 0
        if self.drain_target is None:
            self.drain_target = delivered + (info.num_pending or 0)
        if self.outstanding or self.owed or self.hold_all_until:
            return False
        if not info.num_pending and not info.num_ack_pending:
            return True
        return floor >= max(self.drain_target, self.backend.published_seq(self.topic))

    def idle(self) -> bool:
        return not self.outstanding


async def _aio_fetch(psub: Any) -> list[Any]:
    try:
        return list(await psub.fetch(FETCH_BATCH, timeout=_FETCH_WAIT))
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return []


async def _aio_get_messages(js: Any, stream: str, seqs: Iterable[int]) -> list[tuple[int, Any]]:
    """Read stored messages by sequence, pipelined; sequences no longer stored are skipped.

    Any other failure raises: guessing which keys are owed could break their order.
    """
    found: list[tuple[int, Any]] = []
    todo = list(seqs)
    for start in range(0, len(todo), FETCH_BATCH):
        chunk = todo[start : start + FETCH_BATCH]
        results = await asyncio.gather(*(js.get_msg(stream, seq) for seq in chunk), return_exceptions=True)
        for seq, result in zip(chunk, results, strict=True):
            if isinstance(result, nats.js.errors.NotFoundError):
                continue
            if isinstance(result, BaseException):
                raise result
            found.append((seq, result))
    return found


async def _aio_in_progress(raws: list[Any]) -> None:
    for raw in raws:
        try:
            await raw.in_progress()
        except Exception as exc:
            logger.debug("in_progress failed: %s", exc)
