"""JetStream for persistent topics: one stream per topic, one durable pull consumer per (topic, group).

Order across a consumer crash is the hard part. JetStream gives the unsettled messages of a dead consumer
back only when their `ack_wait` expires, while newer messages flow to its successor at once. So a new
subscription reads the consumer's state first: every stream sequence between the ack floor and the last
delivered one may still be owed. It reads those messages back by sequence to learn their keys. A message
of such a key is then queued only once every owed message of the key with a lower sequence has been
queued, or the ack floor shows it was settled after all; until then it is held. This covers newer
messages and the redeliveries themselves, which JetStream sends in the order their ack_wait expired, not
in stream order. Other keys flow at once.

Retries stay in this process: the pool parks the key and the message is kept alive with `in_progress()`
heartbeats; a `nak()` would let later messages of the key overtake it. Hand-backs (unsubscribe, shutdown)
`nak()` what is unsettled, oldest first, so the group's next subscriber gets it at once.

A parked key's backlog beyond its bound is handed back with a delayed `nak()` (the pool's spill,
`JetStreamDelivery.defer`); the pool takes those messages back oldest first. Whether one will still come
back is read from the consumer's ack floor (`PullSubscription.will_redeliver`): after a broker restart
JetStream may send a message again while the ack of its first delivery is on its way, and a copy deferred
then is settled by that ack (the server ignores a nak for a sequence no longer pending) and never comes
back; the floor passing it says so. Below the floor nothing comes back; above it, what was deferred does.
The floor passes a message only once every older one is settled, which may take long, so a copy of a
message this process settled itself is settled again on arrival and never reaches the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import nats.errors
import nats.js.api
import nats.js.errors
import trio

from .._config import TopicConfig
from .._messages import Message, parse_header_lines
from . import _natspy, _scaleout
from ._aio import aio
from ._base import Inbox
from ._connection import NatsConnection, message_from
from ._streams import (
    DUPLICATE_WINDOW,
    MAX_ACK_PENDING,
    StreamInfo,
    Streams,
    consumer_name,
    group_of,
    open_consumer,
    stream_config,
    stream_name,
)

__all__ = [
    "DUPLICATE_WINDOW",
    "FETCH_BATCH",
    "MAX_ACK_PENDING",
    "JetStreamDelivery",
    "PullSubscription",
    "Streams",
    "consumer_name",
    "group_of",
    "stream_config",
    "stream_name",
]

logger = logging.getLogger("keyedbus")

#: Messages asked for in one pull request.
FETCH_BATCH = 256
#: Messages a partition's reader keeps queued in this process before it pulls more (partitioned topics). It
#: bounds what a member has in hand when the partition moves: what the next owner reads back and waits for.
#: Without it a member that starts first takes a whole stored backlog into its pool before the others
#: get their shares, and they mostly wait for it.
_PARTITION_WINDOW = 2 * FETCH_BATCH
#: Seconds one pull request waits on the server; also how long a stop waits for the fetch in flight.
_FETCH_WAIT = 0.5
#: Owed sequences read back in one crossing (pipelined requests).
_READ_BACK_CHUNK = 1024
#: Seconds between reads of the consumer's ack floor while keys are held.
_FLOOR_POLL = 0.5
#: Seconds a read-back may take at most; its consumer goes away this long after its last use.
_READ_BACK_IDLE = 30.0
#: Seconds before the first and the longest between attempts to recreate a vanished consumer or stream.
_RECOVER_FIRST = 0.25
_RECOVER_MAX = 8.0
#: Seconds between two eviction warnings of one subscription; each covers everything since the last.
_EVICTION_LOG_INTERVAL = 10.0
#: Settles of this process remembered per subscription (the newest 4,096 to 8,192), to know a copy of a
#: message it settled (see `PullSubscription._accept`). One forgotten is handled as before: its key waits
#: for the ack floor.
_SETTLED_KEPT = 4096


class ConsumerGone(Exception):
    """The durable consumer (or its stream) no longer exists on the server (raised on the asyncio side)."""


@attrs.define(eq=False)
class JetStreamDelivery:
    """One message delivered by a durable consumer; settled at most once."""

    sub: PullSubscription
    raw: Any  # nats.aio.msg.Msg: the newest delivery of this stream sequence
    seq: int
    message: Message
    #: The subscription's `epoch` when it arrived.
    epoch: int = 0
    settled: bool = False
    #: Its partition went to another process while it waited here: the pool releases it unrun, and the
    #: release hands it back at once (see `PullSubscription._let_go`).
    withdrawn: bool = False
    #: A parked key's backlog beyond its bound is handed back with delayed naks (`defer`).
    spillable = True

    def ack(self) -> None:
        self.sub.settle(self, "ack")

    def term(self) -> None:
        self.sub.settle(self, "term")

    def release(self) -> None:
        if self.withdrawn:
            # The partition's new reader holds this key until it gets this message: send it there now.
            self.sub.settle(self, "nak")
        # Otherwise it stays outstanding: detach (or close) naks every unsettled message together, oldest
        # first, once nothing can fetch it back into this subscription.

    @property
    def sequence(self) -> int:
        return self.seq

    def defer(self, delay: float) -> bool:
        self.sub.defer(self, delay)
        return True

    def will_redeliver(self, sequence: int) -> bool | None:
        """Whether the consumer will deliver deferred `sequence` again: the ack floor says (see
        `PullSubscription.will_redeliver`); never if this delivery's stream is gone since."""
        if self.epoch < self.sub.stream_epoch:
            return False
        return self.sub.will_redeliver(sequence)


class PullSubscription:
    """A durable pull consumer feeding one Inbox, holding keys still owed by an earlier consumer."""

    def __init__(
        self,
        conn: NatsConnection,
        topic: str,
        config: TopicConfig,
        group: str,
        inbox: Inbox,
        *,
        stream: StreamInfo,
        streams: Streams,
        on_detach: Callable[[PullSubscription], None],
        explicit: dict[str, Any] | None = None,
        durable: str | None = None,
        partition: int | None = None,
    ) -> None:
        """Read `topic` from `stream` for `group` through the durable consumer `durable` (keyedbus's name
        for (topic, group) by default); `explicit` are the settings configure_topic set (see _streams)."""
        self.conn = conn
        self._on_detach = on_detach
        self._explicit = explicit or {}
        self.stream_info = stream
        self._streams = streams
        #: True while the consumer or its stream is missing and being recreated (statistics().recovering).
        self.recovering = False
        self._recover_wait = _RECOVER_FIRST
        self.topic = topic
        self.config = config
        self.inbox = inbox
        self.group = group
        self.stream = stream.name
        self.durable = durable or consumer_name(topic, group, partition)
        self.partition = partition
        #: The subject this consumer reads: one partition's, or the topic's on a stream holding more.
        self.filter_subject = (
            stream.filter_for(topic) if partition is None else _scaleout.partition_subject(topic, partition)
        )
        self.puller = _Puller(conn.nc, conn.js, self.stream, self.durable)
        #: False while membership gives this partition to another process: no pulls, no pin.
        self.active = True
        #: Whether this process may still be handed messages: active, or its last pull not ended yet.
        self.reading = True
        self._wakeup = trio.Event()
        #: Set when a partition's reader may pull again (see `_PARTITION_WINDOW`).
        self._room = trio.Event()
        #: Delivered and unsettled, by stream sequence (queued, parked, running or held).
        self.outstanding: dict[int, JetStreamDelivery] = {}
        #: Sequences an earlier consumer may have left unsettled and not yet queued here, with their keys.
        self.owed: dict[int, str] = {}
        #: The same per key, ascending; entries no longer in `owed` are dropped lazily.
        self.owed_by_key: dict[str, deque[int]] = {}
        #: Messages waiting for an owed message of their key with a lower sequence, per key.
        self.held: dict[str, list[JetStreamDelivery]] = {}
        #: Naks with a delay the pool asked for (a parked key's backlog), per sequence: not attempts.
        self.deferrals: dict[int, int] = {}
        #: The consumer's ack floor (stream sequence) as last read, while messages are deferred or owed:
        #: nothing at or below it is delivered again (`will_redeliver`).
        self.ack_floor = 0
        #: Counts the times this process let go of the consumer (`_let_go`): what the pool deferred before
        #: goes to whoever reads next. Also counts streams made again (`_recover`).
        self.epoch = 0
        #: The `epoch` the current stream was first read in: deliveries of an earlier one are of a stream
        #: since deleted (or emptied by a broker restart), and what the pool deferred of them is lost.
        self.stream_epoch = 0
        self.last_seen = 0
        #: The consumer sequence of the newest delivery this process saw (None: not known, e.g. right after
        #: it was given the pin); a gap after it is a delivery lost on its way (see `_missed`).
        self.last_delivery: int | None = None
        #: Stream sequences skipped by what arrived but found stored: lost on the way, not evicted.
        self._stored_in_gap: set[int] = set()
        #: Messages the consumer has not delivered yet, as of the newest delivery (JetStream's num_pending).
        self.lag = 0
        self.stopping = False
        self.drain_target: int | None = None
        #: The pin this partition had when it last stopped reading (the group may ask to unpin it).
        self.released_pin: str | None = None
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        self._next_floor_poll = 0.0
        self._evicted_unlogged = 0
        self._evicted_logged_at = -_EVICTION_LOG_INTERVAL
        #: How this process settled the newest stream sequences ("ack", "term"), for copies of them.
        self._settled_here: dict[int, str] = {}

    # -- starting ---------------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery, *, active: bool = True) -> None:
        """Create or bind the durable consumer and start reading (if `active`).

        What an earlier consumer still owes is learnt each time this process is given the consumer's pin
        (see `_scaleout`), so also on the first delivery after a restart.
        """
        info = await aio(self.puller.open)(self.topic, self.config, self._explicit, self.filter_subject)
        self.last_seen = info["delivered"]["stream_seq"]
        self.last_delivery = info["delivered"]["consumer_seq"]
        self.active = self.reading = active
        if not self.puller.pinned:
            # Made by a keyedbus without priority groups: the server cannot keep a second process out.
            logger.warning(
                "%s: this consumer has no pinned_client priority group (made by an older keyedbus), so two "
                "processes of group %r would split its keys; delete it while no process of the group runs "
                "to have it made again (docs/scaling.md)",
                self.durable,
                self.group or None,
                extra={"topic": self.topic},
            )
            if info.get("num_ack_pending"):
                await self._learn_owed(info["ack_floor"]["stream_seq"], self.last_seen)
        await nursery.start(self._run)

    def _evicted(self, count: int) -> None:
        """`count` messages of the stream were gone before this group got them: count, log (coalesced)."""
        self.conn.evicted += count
        self._evicted_unlogged += count
        now = trio.current_time()
        if now >= self._evicted_logged_at + _EVICTION_LOG_INTERVAL:
            self.log_evictions(now)

    def log_evictions(self, now: float | None = None) -> None:
        """Log the evictions not logged yet (also called when the subscription ends)."""
        if not self._evicted_unlogged:
            return
        logger.warning(
            "evicted %d message(s) of topic %s before group %r got them: a stream limit (max_msgs, "
            "max_bytes, max_age) or a deletion removed them",
            self._evicted_unlogged,
            self.topic,
            self.group or None,
            extra={"topic": self.topic, "count": self._evicted_unlogged},
        )
        self._evicted_unlogged = 0
        self._evicted_logged_at = trio.current_time() if now is None else now

    async def _learn_pinned(self, batch: list[Any]) -> None:
        """This process was just given the pin (with `batch`): hold the keys another holder may still have
        unsettled."""
        info = await aio(self.puller.info)()
        # Only what this process already accepted is its own. The batch in hand counts as owed: it may hold
        # redeliveries out of stream order, and taking them in as owed arrivals puts them back in order.
        # Withdrawn messages are not ours any more: the pool hands them back, so they come again or settle.
        mine = {seq for seq, delivery in self.outstanding.items() if not delivery.withdrawn}
        floor, delivered = info["ack_floor"]["stream_seq"], info["delivered"]["stream_seq"]
        in_hand = {_natspy.delivery_info(m)[0]: m for m in batch}
        first_deliveries = all(_natspy.delivery_info(m)[1] == 1 for m in batch)
        # The consumer numbers every delivery, and its ack floor says up to which number all are settled.
        # If the first delivery in hand comes right after the floor, every unsettled one came to this pin.
        next_after_floor = int(info["ack_floor"].get("consumer_seq") or 0) + 1
        if first_deliveries and (
            int(info.get("num_ack_pending") or 0) <= len(mine | in_hand.keys())
            or (batch and min(_natspy.consumer_seq(m) for m in batch) == next_after_floor)
        ):
            # Every unsettled message is this process's, and none in hand came back from another reader:
            # nothing is owed, so the range need not be read back (the common case: a first start, where
            # the server may have sent more of the pull request than the batch in hand).
            return
        logger.info(
            "%s: this process now reads %s for group %r (pinned); checking messages %d..%d for keys still "
            "owed by the previous reader",
            self.durable,
            self.filter_subject or self.topic,
            self.group or None,
            floor + 1,
            delivered,
            extra={"topic": self.topic},
        )
        await self._learn_owed(floor, delivered, mine, in_hand)

    async def _learn_owed(
        self, floor: int, delivered: int, mine: set[int] | None = None, in_hand: dict[int, Any] | None = None
    ) -> None:
        """Note the key of every message in floor+1..delivered not in `mine` as owed (`in_hand`: messages
        just delivered, whose keys need not be read back)."""
        in_hand = in_hand or {}
        if delivered - floor > MAX_ACK_PENDING:
            logger.warning(
                "%s: reading back %d message(s) an earlier consumer may have left unsettled, to keep their "
                "keys in order",
                self.durable,
                delivered - floor,
                extra={"topic": self.topic},
            )
        seqs = [s for s in range(floor + 1, delivered + 1) if s not in in_hand]
        just_in = [(seq, m) for seq, m in in_hand.items() if floor < seq <= delivered]
        try:
            if self.filter_subject is not None:
                # One subject of a shared stream (a partition): walk only its messages, not every sequence;
                # the walk brings each message whole, so none is read twice.
                found = []
                if seqs:
                    on_subject = await aio(aio_read_subject)(
                        self.conn.nc, self.conn.js, self.stream, self.filter_subject, seqs[0], seqs[-1]
                    )
                    for seq, raw in on_subject:
                        if seq not in in_hand and not (mine and seq in mine):
                            found.append((seq, raw))  # delivered: nats-py parsed its headers (our parser)
                self._note_owed(found + just_in, mine)
            else:
                for start in range(0, len(seqs) + 1, _READ_BACK_CHUNK):
                    stored = await aio(aio_get_messages)(
                        self.conn.js, self.stream, seqs[start : start + _READ_BACK_CHUNK]
                    )
                    self._note_owed(stored + just_in if start == 0 else stored, mine)
        finally:
            # Also when a read-back fails midway (the caller retries): `owed` may have grown, and every owed
            # sequence must be findable by its key.
            self.owed_by_key = {}
            for seq, key in sorted(self.owed.items()):
                self.owed_by_key.setdefault(key, deque()).append(seq)
        waiting = {key for seq, key in self.owed.items() if seq not in in_hand}
        if waiting:
            logger.info(
                "%s: an earlier consumer left messages %d..%d unsettled; holding %d key(s) until they are "
                "redelivered in order (at most ack_wait=%s s)",
                self.durable,
                floor + 1,
                delivered,
                len(waiting),
                self.config.ack_wait,
                extra={"topic": self.topic},
            )

    def _note_owed(self, stored: list[tuple[int, Any]], mine: set[int] | None) -> None:
        """Note the key of each message read back as owed, unless this process has it."""
        for seq, raw in stored:
            if mine and seq in mine:
                continue  # this process has it: the pool keeps its order
            if self.filter_subject is not None and raw.subject != self.filter_subject:
                continue  # another partition's: never delivered by this consumer
            key = self.inbox.key_of(message_from(self.topic, raw.data, raw.headers, 1))
            if key is not None:
                self.owed[seq] = key

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
            if not self.active:
                await self._let_go()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            if self.owed or self.deferrals:
                await self._poll_floor()
            if self._drained_far_enough():
                await trio.sleep(0.02)
                continue
            room = self._room_left()
            if room is not None and room < FETCH_BATCH:  # whole batches: fewer, fuller pull requests
                self._room = trio.Event()
                with trio.move_on_after(_FLOOR_POLL):  # held keys may go free by the ack floor meanwhile
                    await self._room.wait()
                continue
            try:
                raw = await aio(self.puller.take)()
            except ConsumerGone as gone:
                await self._recover(str(gone))
                continue
            except Exception as exc:  # the connection is down or the server restarts: nats-py reconnects
                logger.warning("%s: fetch failed (%s: %s); retrying", self.durable, type(exc).__name__, exc)
                await trio.sleep(_FETCH_WAIT)
                continue
            if self.puller.new_pin:
                self.puller.new_pin = False
                self.last_delivery = None  # the consumer state read now covers what came before
                try:
                    await self._learn_pinned(raw)
                except Exception as exc:
                    # Not knowing the owed keys could break their order: hand the batch back, pull again.
                    logger.warning("%s: reading the consumer state failed (%s); retrying", self.durable, exc)
                    self.puller.pin = None
                    await self.conn.settle_now([(m, "nak") for m in raw])
                    await trio.sleep(_FETCH_WAIT)
                    continue
                self._missed(raw)
            else:
                before = self.last_delivery
                if self._missed(raw):
                    try:
                        await self._learn_missed(raw)
                    except Exception as exc:
                        # As above; the redelivered batch shows the same gap, so it is looked at again.
                        logger.warning(
                            "%s: reading back missed deliveries failed (%s); retrying", self.durable, exc
                        )
                        self.last_delivery = before
                        await self.conn.settle_now([(m, "nak") for m in raw])
                        await trio.sleep(_FETCH_WAIT)
                        continue
            batch = self._accept(raw)
            if self.stopping:
                return  # fetched after stop(): outstanding, so detach or close hands it back
            if batch:
                await self.inbox.deliver(batch)

    def _missed(self, batch: list[Any]) -> bool:
        """Whether the consumer sent this process deliveries that never came, before or within `batch`.

        The consumer numbers every delivery (redeliveries too), so a gap in those numbers is a delivery lost
        on its way: in a cluster, one sent by a server killed before it forwarded it. The server counts it
        delivered and sends it again only after ack_wait, while later messages of its key flow at once.
        A number going back (a new consumer leader sending again what it had not recorded) is no gap.
        """
        last = self.last_delivery
        gap = False
        for m in batch:
            number = _natspy.consumer_seq(m)
            if last is not None and number > last + 1:
                gap = True
            if last is None or number > last:
                last = number
        self.last_delivery = last
        return gap

    async def _learn_missed(self, batch: list[Any]) -> None:
        """Some deliveries never came (see `_missed`): hold the keys of the messages they carried.

        First deliveries come in stream order, so a lost one is a stored message of this consumer's subject
        after the newest sequence seen before `batch`, up to what the consumer counts as delivered, that
        this process does not have. Each is owed, as if another reader had it: its key waits until it is
        redelivered (or settled: the ack floor passes it). One still on its way when the consumer state is
        read is owed too, until it arrives a moment later. A lost redelivery needs nothing: the message is
        owed already, or this process has it.
        """
        info = await aio(self.puller.info)()
        arrived = {_natspy.delivery_info(m)[0] for m in batch}
        first = max(self.last_seen, info["ack_floor"]["stream_seq"]) + 1
        last = info["delivered"]["stream_seq"]
        if first > last:
            return
        subject = self.filter_subject if self.filter_subject is not None else self.topic
        stored = await aio(aio_get_subject_messages)(self.conn.js, self.stream, subject, first, last)
        lost = [(seq, raw) for seq, raw in stored if seq not in arrived and seq not in self.outstanding]
        if not lost:
            return
        if self.stream_info.filter_for(self.topic) is None:
            self._stored_in_gap.update(seq for seq, _ in lost)
        keys = set()
        for seq, raw in lost:
            headers = _natspy.stored_headers(raw, parse_header_lines)
            key = self.inbox.key_of(message_from(self.topic, raw.data, headers, 1))
            if key is not None:
                self.owed[seq] = key
                self.owed_by_key.setdefault(key, deque()).append(seq)
                keys.add(key)
        for key in keys:
            self.owed_by_key[key] = deque(sorted(set(self.owed_by_key[key])))
        logger.warning(
            "%s: a delivery never arrived (lost on the way, e.g. while a server went down); the keys of "
            "message(s) %d..%d wait until those arrive or are sent again (at most ack_wait=%s s)",
            self.durable,
            lost[0][0],
            lost[-1][0],
            self.config.ack_wait,
            extra={"topic": self.topic},
        )

    async def _recover(self, why: str) -> None:
        """Recreate the vanished consumer (and stream) after a backoff; log once per incident.

        On the same stream the new consumer starts at the oldest message this process has not settled, so
        nothing settled is delivered again. A stream that came back empty (deleted, or a server restarted
        with an empty store) starts from its beginning; what this process still holds of the old stream is
        handled, and its acks go nowhere.
        """
        if not self.recovering:
            self.recovering = True
            logger.warning(
                "%s: the JetStream consumer of group %r on %s is gone (%s); recreating it",
                self.durable,
                self.group or None,
                self.topic,
                why,
                extra={"topic": self.topic},
            )
        await trio.sleep(self._recover_wait)
        self._recover_wait = min(self._recover_wait * 2, _RECOVER_MAX)
        # Deferred messages are not outstanding, but unsettled: the new consumer must deliver them again.
        resume = min(min(self.outstanding, default=self.last_seen + 1), min(self.deferrals, default=2**63))
        try:
            self._streams.forget(self.topic)
            stream = await self._streams.ensure(self.topic, self.config)
            # Not the stream we read (deleted and created again, or a server with an empty store): start
            # from its beginning; on the same stream, from the oldest message this process has not settled.
            fresh = stream.created != self.stream_info.created
            start = None if fresh or resume <= 1 else resume
            if self.partition is None:
                self.filter_subject = stream.filter_for(self.topic)
            info = await aio(self.puller.recreate)(
                stream.name, self.topic, self.config, self._explicit, self.filter_subject, start
            )
        except Exception as exc:
            logger.debug(
                "%s: recreating failed (%s: %s); trying again", self.durable, type(exc).__name__, exc
            )
            return
        self.stream_info, self.stream = stream, stream.name
        lost = [d.seq for d in self.outstanding.values()]
        handed_back = len(self.deferrals.keys() - self.outstanding.keys())
        if fresh:
            for delivery in self.outstanding.values():
                delivery.settled = True  # its stream is gone: nothing to ack
            self.outstanding.clear()
            self.held.clear()
            self.owed.clear()
            self.owed_by_key.clear()
            # What the pool deferred was in the old stream: never delivered again, and the new stream's
            # floor and sequences say nothing of it (its sequences start again at 1). A new epoch tells
            # the two streams' deliveries apart; the pool's keys go on without the lost ones at once, so
            # the new stream's messages of a key run, in order, instead of waiting DEFER_GRACE.
            self.deferrals.clear()
            self._settled_here.clear()  # the new stream numbers its messages from 1 again
            self.ack_floor = 0
            self.conn.forget_published(self.topic)
            self.last_seen = 0
            self.lag = 0
            self.epoch += 1
            self.stream_epoch = self.epoch
            if handed_back:
                self._evicted(handed_back)  # a deletion removed them before the group handled them
            self.inbox.forget_deferred(self._keys_read_here(), lost=True)
        logger.warning(
            "%s: recreated the consumer of group %r on %s%s",
            self.durable,
            self.group or None,
            self.topic,
            f" on a new, empty stream ({len(lost)} message(s) in hand are handled, nothing to ack)"
            if fresh
            else f", delivering from stream sequence {resume}",
            extra={"topic": self.topic},
        )
        self.last_seen = max(self.last_seen, info.delivered.stream_seq if info.delivered else 0)
        self.last_delivery = None  # a new consumer numbers its deliveries afresh
        self.recovering = False
        self._recover_wait = _RECOVER_FIRST

    def _keys_read_here(self) -> Callable[[str], bool]:
        """Selects the keys this subscription reads: all, or its partition's."""
        partition, partitions = self.partition, self.stream_info.partitions(self.topic)
        if partition is None:
            return lambda key: True
        return lambda key: _scaleout.partition_of(key, partitions) == partition

    def _room_left(self) -> int | None:
        """How many more messages a partition's reader may pull now (None: no bound, not a partition).

        Held messages do not count: they wait for an owed message that only a pull can bring.
        """
        if self.partition is None:
            return None
        held = sum(len(waiting) for waiting in self.held.values()) if self.held else 0
        return _PARTITION_WINDOW - (len(self.outstanding) - held)

    def set_active(self, active: bool) -> None:
        """Start (True) or stop (False) pulling; a stopped partition keeps settling what it has queued."""
        self.active = active
        self._room.set()
        self.reading = self.reading or active
        self._wakeup.set()

    async def _let_go(self) -> None:
        """Stop reading for now: let the pull in flight end, hand back what was fetched but never queued.

        Forgets the pin, so whoever reads next (this process too) learns the owed keys afresh.
        """
        arrived = await aio(self.puller.finish)()
        fetched = [d for held in self.held.values() for d in held]
        for delivery in fetched:
            delivery.settled = True
            del self.outstanding[delivery.seq]
        # What the pool queued and has not started goes back too, as the pool reaches it (one running now
        # finishes here): the partition's next reader holds those keys until it has them, so leaving them
        # to this process's queue (up to the partition's window) would idle it for as long. Only with a pin:
        # whoever reads next (this process too) then learns their keys as owed (`_learn_pinned`).
        if self.puller.pinned and self.outstanding:
            for delivery in self.outstanding.values():
                delivery.withdrawn = True
            logger.debug(
                "%s: handing back the %d message(s) of this partition queued here as the pool reaches them",
                self.durable,
                len(self.outstanding),
                extra={"topic": self.topic},
            )
        self.held.clear()
        self.owed.clear()
        self.owed_by_key.clear()
        self.last_delivery = None
        self._stored_in_gap.clear()
        self.deferrals.clear()  # whoever reads next counts their redeliveries as attempts (conservative)
        # Messages the pool deferred go to whoever reads next: its lanes must not wait for them here.
        self.epoch += 1
        self.inbox.forget_deferred(self._keys_read_here())
        self.released_pin, self.puller.pin = self.puller.pin, None
        naks = [d.raw for d in sorted(fetched, key=lambda d: d.seq)] + arrived + self.puller.leftovers()
        await self.conn.settle_now([(raw, "nak") for raw in naks])
        if self.released_pin is not None and not self.stopping:
            # Still pinned to us, who no longer pull: unpin, so the new owner (pulling already) reads now.
            try:
                info = await aio(self.puller.info)()
                if _scaleout.pinned_id(info) == self.released_pin:
                    await aio(self.puller.unpin)()
            except Exception as exc:  # the new owner unpins it after a grace period instead
                logger.debug("%s: unpin failed: %s", self.durable, exc)
        self.reading = self.active

    def _drained_far_enough(self) -> bool:
        """While draining: everything published before the drain began has been fetched."""
        if self.drain_target is None or self.owed or self.deferrals:
            return False  # (deferred: nak'd with a delay, they must be fetched again)
        return self.last_seen >= max(self.drain_target, self.conn.published_seq(self.topic))

    def _accept(self, raw: list[Any]) -> list[JetStreamDelivery]:
        """Track a fetched batch; return what may be queued now, holding keys still owed a message."""
        ready: list[JetStreamDelivery] = []
        for m in raw:
            seq, delivered, pending = _natspy.delivery_info(m)
            if seq > self.last_seen:
                if seq > self.last_seen + 1 and self.stream_info.filter_for(self.topic) is None:
                    # The consumer skipped sequences of a stream holding only this topic: they were removed
                    # before this group got them (on a shared stream other subjects fill the gaps), unless
                    # found stored when a delivery of them was lost on its way (`_learn_missed`).
                    skipped = seq - self.last_seen - 1
                    if self._stored_in_gap:
                        below = {s for s in self._stored_in_gap if s < seq}
                        self._stored_in_gap -= below
                        skipped -= sum(1 for s in below if s > self.last_seen)
                    if skipped > 0:
                        self._evicted(skipped)
                self.last_seen = seq
                self.lag = pending
            current = self.outstanding.get(seq)
            if current is not None:
                # Redelivered while this process still has it (its ack_wait passed while the broker was
                # away): keep one copy, settled through the newest delivery.
                current.raw = m
                continue
            how = self._settled_here.get(seq)
            if how is not None:
                # A copy of a message this process handled and settled: JetStream sent it again while the
                # settle was on its way (around a broker restart), or lost the settle. Settle it the same
                # way at once. Queued, it would run again; or, its key having messages handed back (the
                # pool's spill), be handed back too, the nak ignored once the settle arrived: its key then
                # waited for it until the ack floor passed it, seconds or more behind other keys' messages.
                self.conn.queue_settles([(m, how)])
                key = self.owed.pop(seq, None)
                if key is not None:  # read back as owed (a new pin): its key need not wait for it
                    ready.extend(self._release(key))
                continue
            attempt = max(1, delivered - self.deferrals.get(seq, 0))
            message = message_from(self.topic, m.data, m.headers, attempt)
            delivery = JetStreamDelivery(self, m, seq, message, self.epoch)
            self.outstanding[seq] = delivery
            if not self.owed_by_key:
                ready.append(delivery)
                continue
            key = self.owed.pop(seq, None)
            if key is None:
                key = self.inbox.key_of(message)
            if key is None or key not in self.owed_by_key:
                ready.append(delivery)
                continue
            self.held.setdefault(key, []).append(delivery)
            ready.extend(self._release(key))
        return ready

    def _release(self, key: str) -> list[JetStreamDelivery]:
        """The held messages of `key` below its lowest sequence still owed, in order (all if none is)."""
        owed = self.owed_by_key.get(key, deque())
        while owed and owed[0] not in self.owed:
            owed.popleft()
        held = sorted(self.held.pop(key, []), key=lambda d: d.seq)
        if not owed:
            self.owed_by_key.pop(key, None)
            return held
        free = [d for d in held if d.seq < owed[0]]
        if len(free) < len(held):
            self.held[key] = held[len(free) :]
        return free

    async def _poll_floor(self) -> None:
        """Read the ack floor; owed messages below it were settled after all, so their keys go free, and
        deferred ones below it will not come back (`will_redeliver`)."""
        now = trio.current_time()
        if now < self._next_floor_poll:
            return
        self._next_floor_poll = now + _FLOOR_POLL
        try:
            info = await aio(self.puller.info)()
        except Exception as exc:
            logger.debug("%s: consumer info failed: %s", self.durable, exc)
            return
        floor = info["ack_floor"]["stream_seq"]
        self.ack_floor = floor
        for seq in [s for s in self.deferrals if s <= floor]:
            del self.deferrals[seq]  # settled: no delivery of it will come to count as an attempt
        keys = {self.owed.pop(seq) for seq in [s for s in self.owed if s <= floor]}
        ready = [d for key in keys for d in self._release(key)]
        if ready:
            ready.sort(key=lambda d: d.seq)
            await self.inbox.deliver(ready)

    async def _heartbeat(self) -> None:
        """Tell JetStream that queued, parked, held and running messages are still being worked on."""
        while True:
            await trio.sleep(self.config.ack_wait / 3)
            alive = [d.raw for d in self.outstanding.values()]
            if alive:
                await aio(_aio_in_progress)(alive)

    # -- settling and stopping --------------------------------------------------------------------------

    def settle(self, delivery: JetStreamDelivery, how: str) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        if self.outstanding.get(delivery.seq) is delivery:
            del self.outstanding[delivery.seq]
        self.deferrals.pop(delivery.seq, None)
        if how != "nak":
            done = self._settled_here
            done[delivery.seq] = how
            if len(done) > 2 * _SETTLED_KEPT:  # settled in about stream order: keep the newest
                self._settled_here = dict(list(done.items())[-_SETTLED_KEPT:])
        if len(self.outstanding) <= _PARTITION_WINDOW - FETCH_BATCH:
            self._room.set()
        self.conn.queue_settles([(delivery.raw, how)])

    def will_redeliver(self, sequence: int) -> bool | None:
        """Whether the consumer will deliver `sequence`, which this process deferred, again.

        False once the ack floor passed it: the server settled it without it coming back here. That
        happens when another delivery of it was acked (after a broker restart JetStream may send a message
        again before the ack of its first delivery reaches it; the pool then defers the copy, and the nak
        is ignored), or when a limit removed it (the floor moves past what the stream lost). True while it
        is above the floor: the server holds it unsettled, so it comes back (the floor passes it otherwise,
        since the messages below it settle). None for a sequence this reading did not defer (another
        reader's, or of a stream since recreated): the pool's grace decides.
        """
        if sequence <= self.ack_floor:
            return False
        return True if sequence in self.deferrals else None

    def defer(self, delivery: JetStreamDelivery, delay: float) -> None:
        """Nak `delivery` with `delay`: JetStream redelivers it no sooner (the deferral is not an attempt).

        A consumer with max_deliver set (by an operator; keyedbus sets none) counts these redeliveries.
        A delivery of a stream since deleted cannot go back: it is lost with it, counted as evicted.
        """
        if delivery.settled:
            if delivery.epoch < self.stream_epoch:
                self._evicted(1)
            return
        delivery.settled = True
        if self.outstanding.get(delivery.seq) is delivery:
            del self.outstanding[delivery.seq]
        self.deferrals[delivery.seq] = self.deferrals.get(delivery.seq, 0) + 1
        if len(self.outstanding) <= _PARTITION_WINDOW - FETCH_BATCH:
            self._room.set()
        self.conn.queue_settles([(delivery.raw, f"nak:{delay:.3f}")])

    def unsettled(self) -> list[Any]:
        """Mark every outstanding message settled and return them oldest first, for a nak (with any that
        arrived but were never taken)."""
        naks = [d for _, d in sorted(self.outstanding.items())]
        for delivery in naks:
            delivery.settled = True
        self.outstanding.clear()
        self.held.clear()
        self.owed.clear()
        self.owed_by_key.clear()
        self.deferrals.clear()
        return [d.raw for d in naks] + self.puller.leftovers()

    async def stop(self) -> None:
        """Stop fetching: let the fetch in flight end (so nothing is left in a dead pull request)."""
        self.stopping = True
        self._wakeup.set()
        self._room.set()
        with trio.move_on_after(_FETCH_WAIT * 2 + 1):
            await self._stopped.wait()
        self._scope.cancel()
        await self._stopped.wait()
        self.reading = False

    async def detach(self) -> None:
        """Drop the client side, then hand every unsettled message back to the group, oldest first.

        Unsubscribing first matters: a nak'd message must not land in a pull request of this subscription.
        """
        self._on_detach(self)
        self.log_evictions()
        try:
            await aio(self.puller.close)()
        except Exception as exc:  # the connection may be gone; the server forgets the interest then too
            logger.debug("unsubscribe failed: %s", exc)
        await self.conn.settle_now([(raw, "nak") for raw in self.unsettled()])

    # -- draining ---------------------------------------------------------------------------------------

    async def caught_up(self) -> bool:
        """True once everything published up to the drain's start (and our own later publishes) is settled.

        A partition this process does not read is caught up once what it queued is settled.
        """
        if not self.active:
            return not self.outstanding
        info = await aio(self.puller.info)()
        floor: int = info["ack_floor"]["stream_seq"]
        delivered: int = info["delivered"]["stream_seq"]
        if self.drain_target is None:
            self.drain_target = delivered + (info.get("num_pending") or 0)
        if self.outstanding or self.owed:
            return False
        if not info.get("num_pending") and not info.get("num_ack_pending"):
            return True
        return floor >= max(self.drain_target, self.conn.published_seq(self.topic))

    def drain_checked(self) -> None:
        """The drain check is over: read on (`wait_idle()` is not a drain; what comes next is ours)."""
        self.drain_target = None

    def idle(self) -> bool:
        return not self.outstanding


class _Puller:
    """Pull requests and their replies on the asyncio side, handed over in batches.

    nats-py's fetch() awaits every message separately (a timer and a task each), which under
    trio-asyncio costs far more than the message. This sends the pull request itself and reads the
    replies from its own inbox subscription's queue, a batch per asyncio step (see `_natspy`).
    """

    def __init__(self, nc: Any, js: Any, stream: str, durable: str) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._durable = durable
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._open = 0  # messages the outstanding pull request may still bring
        self._deadline = 0.0
        #: Whether the consumer has keyedbus's pinned_client priority group (older ones do not).
        self.pinned = False
        #: The pin id the server gave this process's pulls (None: not pinned, or forgotten).
        self.pin: str | None = None
        #: Set when a delivery brought a pin id this process did not have: the reader learns owed keys.
        self.new_pin = False

    async def open(
        self, topic: str, config: TopicConfig, explicit: dict[str, Any], filter_subject: str | None
    ) -> dict[str, Any]:
        """Create or check the durable consumer (see `_streams.open_consumer`), subscribe to our inbox;
        return the consumer info as JetStream sends it."""
        await open_consumer(self._js, self._stream, self._durable, topic, config, explicit, filter_subject)
        info = await self.info()
        self.pinned = _scaleout.has_pinned_policy(info)
        self._sub = await self._nc.subscribe(self._inbox, pending_msgs_limit=4 * FETCH_BATCH)
        return info

    async def info(self) -> dict[str, Any]:
        """The consumer's info as JetStream sends it (ack floor, delivered, priority group state)."""
        subject = f"CONSUMER.INFO.{self._stream}.{self._durable}"
        return await _scaleout.aio_api(self._nc, _natspy.api_prefix(self._js), subject, None)

    async def unpin(self) -> None:
        """Ask the server to drop the consumer's pin: the next pull request to arrive gets a new one."""
        await _scaleout.aio_unpin(self._nc, _natspy.api_prefix(self._js), self._stream, self._durable)

    async def finish(self) -> list[Any]:
        """Wait until the pull request in flight (if any) has ended: filled, ended by a status (408 when it
        expires), or past its deadline. Returns the messages that arrived meanwhile, to hand back."""
        loop = asyncio.get_running_loop()
        arrived: list[Any] = []
        while self._open > 0 and self._sub is not None:
            items = await _natspy.take(self._sub, 1 << 30, self._deadline - loop.time())
            if not items:
                break  # past the deadline: a request lost in a reconnect
            for m in items:
                if _natspy.is_data(m):
                    arrived.append(m)
                    self._open -= 1
                elif _natspy.status_of(m) != "100":
                    self._open = 0
        self._open = 0
        return arrived

    async def take(self) -> list[Any]:
        """The next messages (at least one), or [] when a pull request ended with none."""
        loop = asyncio.get_running_loop()
        if self._open <= 0 or loop.time() > self._deadline:
            await _natspy.request_pull(
                self._nc,
                self._js,
                self._stream,
                self._durable,
                self._inbox,
                batch=FETCH_BATCH,
                expires=_FETCH_WAIT,
                group=_scaleout.PRIORITY_GROUP if self.pinned else None,
                pin=self.pin,
            )
            self._open = FETCH_BATCH
            self._deadline = loop.time() + _FETCH_WAIT + 1.0  # grace: a request lost in a reconnect
        items = await _natspy.take(self._sub, 1 << 30, self._deadline - loop.time())
        if not items:
            self._open = 0
            return []
        messages = []
        for m in items:
            if _natspy.is_data(m):
                pin = m.headers.get(_natspy.PIN_HEADER) if m.headers else None
                if pin and pin != self.pin:
                    self.pin, self.new_pin = pin, True
                messages.append(m)
                self._open -= 1
                continue
            gone = _natspy.consumer_gone(m)
            if gone is not None:
                self._open = 0
                if not messages:
                    raise ConsumerGone(gone)
                return messages  # the next pull request gets the same answer
            if (status := _natspy.status_of(m)) != "100":  # 404, 408 expired, 409 and the like: over
                self._open = 0
                if status == "423":  # the server gave the pin to another pull: ask without it next time
                    self.pin = None
        return messages

    async def recreate(
        self,
        stream: str,
        topic: str,
        config: TopicConfig,
        explicit: dict[str, Any],
        filter_subject: str | None,
        start: int | None,
    ) -> Any:
        """Recreate a vanished consumer on `stream`, delivering from `start` (all if None); return its
        info (asyncio side)."""
        self._stream = stream
        self._open = 0
        info = await open_consumer(
            self._js, self._stream, self._durable, topic, config, explicit, filter_subject, start
        )
        # A new consumer: no pin yet, so the first delivery makes the reader learn the owed keys afresh.
        self.pinned = _scaleout.has_pinned_policy(await self.info())
        self.pin = None
        return info

    async def close(self) -> list[Any]:
        """Unsubscribe; return messages that arrived for a request after the last take (to hand back)."""
        if self._sub is not None:
            await self._sub.unsubscribe()
        return self.leftovers()

    def leftovers(self) -> list[Any]:
        """Take the messages that arrived but were never taken (delivered to us: they must be handed back)."""
        if self._sub is None:
            return []
        return [m for m in _natspy.take_nowait(self._sub) if _natspy.is_data(m)]


async def aio_get_messages(js: Any, stream: str, seqs: Iterable[int]) -> list[tuple[int, Any]]:
    """Read stored messages by sequence, pipelined; sequences no longer stored are skipped.

    Any other failure raises: guessing which keys are owed could break their order.
    """
    found: list[tuple[int, Any]] = []
    todo = list(seqs)
    results = await asyncio.gather(*(js.get_msg(stream, seq) for seq in todo), return_exceptions=True)
    for seq, result in zip(todo, results, strict=True):
        if isinstance(result, nats.js.errors.NotFoundError):
            continue
        if isinstance(result, BaseException):
            raise result
        result.headers = _natspy.stored_headers(result, parse_header_lines)  # not nats-py's email parsing
        found.append((seq, result))
    return found


async def aio_get_subject_messages(
    js: Any, stream: str, subject: str, first: int, last: int
) -> list[tuple[int, Any]]:
    """The stored messages of `subject` with sequences first..last, in order (one request each)."""
    found: list[tuple[int, Any]] = []
    seq = first
    while seq <= last:
        try:
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        if msg.seq > last:
            break
        found.append((msg.seq, msg))
        seq = msg.seq + 1
    return found


async def aio_read_subject(
    nc: Any, js: Any, stream: str, subject: str, first: int, last: int
) -> list[tuple[int, Any]]:
    """The stored messages of `subject` with sequences first..last, in order, streamed by a short-lived
    consumer of their own (no acks, in memory, deleted at the end; the server removes it if this process
    dies first): a pull request per 256 messages, where `aio_get_subject_messages` waits for a round trip
    per message (a partition's new reader took 1.2-2.6 s for ~500 that way, holding its keys meanwhile).

    Any failure raises: guessing which keys are owed could break their order.
    """
    if first > last:
        return []
    prefix = _natspy.api_prefix(js)
    name = f"KBR_{secrets.token_hex(8)}"
    config = {
        "name": name,
        "deliver_policy": "by_start_sequence",
        "opt_start_seq": first,
        "ack_policy": "none",
        "filter_subject": subject,
        "mem_storage": True,
        "num_replicas": 1,
        "inactive_threshold": int(_READ_BACK_IDLE * 1e9),
    }
    body = {"stream_name": stream, "config": config, "action": "create"}
    try:
        info = await _scaleout.aio_api(nc, prefix, f"CONSUMER.CREATE.{stream}.{name}", body)
    except _scaleout.JetStreamApiError as exc:
        # The stream takes no consumer of ours: an operator's work-queue stream (pull consumers there must
        # ack explicitly, deliver all and not overlap another's filter: 10084, 10099-10101) or its
        # max_consumers (10026). Read the messages with a request each (slower, the same messages), their
        # headers parsed as delivered ones are.
        logger.debug("reading back %s without a consumer of its own: %s", subject, exc)
        stored = await aio_get_subject_messages(js, stream, subject, first, last)
        for _, raw in stored:
            raw.headers = _natspy.stored_headers(raw, parse_header_lines)
        return stored
    found: list[tuple[int, Any]] = []
    sub = None
    try:
        pending = int(info.get("num_pending") or 0)
        if not pending:
            return found
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, pending_msgs_limit=4 * FETCH_BATCH)
        deadline = asyncio.get_running_loop().time() + _READ_BACK_IDLE
        while pending:
            await _natspy.request_pull(nc, js, stream, name, inbox, batch=FETCH_BATCH, expires=_FETCH_WAIT)
            ended, asked = False, FETCH_BATCH  # a filled request ends without a status
            while pending and asked and not ended:
                left = deadline - asyncio.get_running_loop().time()
                items = await _natspy.take(sub, 1 << 30, left)
                if not items:
                    raise TimeoutError(f"reading back {subject} from {first} took over {_READ_BACK_IDLE} s")
                for m in items:
                    if not _natspy.is_data(m):
                        gone = _natspy.consumer_gone(m)
                        if gone is not None:  # deleted by an operator, say: pulling again would only spin
                            raise ConsumerGone(
                                f"reading back {subject}: its consumer {name} was deleted ({gone})"
                            )
                        ended = ended or _natspy.status_of(m) != "100"  # 408 and the like: pull again
                        continue
                    seq, _, pending = _natspy.delivery_info(m)
                    asked -= 1
                    if seq > last:
                        return found
                    found.append((seq, m))
            if ended and asked == FETCH_BATCH and pending:
                # A pull request that brought nothing: what was still to come may be gone since (a limit, a
                # deletion), so the count the last message carried is stale; the consumer's is not.
                state = await _scaleout.aio_api(nc, prefix, f"CONSUMER.INFO.{stream}.{name}", None)
                pending = int(state.get("num_pending") or 0)
        return found
    finally:
        with contextlib.suppress(Exception):
            if sub is not None:
                await sub.unsubscribe()
            await _scaleout.aio_api(nc, prefix, f"CONSUMER.DELETE.{stream}.{name}", None)


async def _aio_in_progress(raws: list[Any]) -> None:
    for raw in raws:
        try:
            await raw.in_progress()
        except Exception as exc:
            logger.debug("in_progress failed: %s", exc)
