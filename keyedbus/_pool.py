"""The keyed worker pool every topic shares: worker queues, per-key lanes, workers that help each other.

The shape the design card draws, all under the bus's one nursery:

- **Worker queues are trio memory channels.** One bounded channel per worker (capacity `queue_size`); a
  keyed message goes to worker ``fnv1a_32(key) % workers`` (the same in every process), a keyless one to
  the next worker round-robin. Subscription tasks `send` `AggregateMessage` objects into them, waiting for
  room inside a cancel scope of `wait_timeout` (see `_consumer.py`).
- **Workers own per-key lanes.** A worker receives from its channel and appends each message to the lane
  of its (subscription, key): the key's messages in order, at most one of them running. A worker holds at
  most `queue_size` messages in its lanes (ready, running, or parked behind a failure); at that bound it
  stops receiving, so its channel fills and the subscription tasks' `wait_timeout` applies. Nothing a slow
  or failing key collects grows without limit (at most ``2 * queue_size + queue_size // 2`` messages per
  worker: its channel, its lanes, and the deferred messages kept early, below).
- **A parked key's backlog has a bound of its own.** Messages in a worker's parked lanes (keys waiting for
  a retry) are at most ``queue_size // 2`` (each parked key keeps at least its head). Beyond, a parked key's
  later messages are *spilled*, never its neighbours': on an ephemeral topic dropped (counted in
  `dropped`; the first of a parking logged at once, the rest when its retry comes); on a persistent topic
  handed back to the broker with `Delivery.defer`, due no sooner than the key's retry (a JetStream nak
  with a delay; memory:// redelivers it from its log), not counted as an attempt; later than that, more
  so with each failure in a row, while the key keeps failing (`_hold_longer`). A key with deferred
  messages then hands back every later message too and takes the deferred ones back oldest first, so its
  order holds (guarantee 1). Deferred messages may come back out of order (JetStream redelivers a round of
  delayed naks in no particular order; one deferred again behind a later retry comes back after younger
  ones): those back early are *kept* until the older ones arrive, within the same ``queue_size // 2``
  as the parked messages, but outside the worker's `queue_size` bound. Inside it they could fill the bound,
  and the worker would stop receiving the very message they wait for from its channel: every key of the
  topic stalled behind that channel until the grace below ran out, and then ran out of order. A deferred
  message the broker will not bring back is logged and the key goes on without it, once the broker says so
  (`Delivery.will_redeliver`): memory:// when a limit evicted it; JetStream when the consumer's ack floor
  passed it (settled there: after a broker restart, another delivery of it was acked, or a limit removed
  it). A message the broker still holds is waited for, however late (behind backpressure, or a nak lost
  with a broker that went down), so no later message of its key runs before it; the timer asks again every
  `_RECHECK` seconds while messages wait for it, kept early. A backend that lost the stream says so at once
  (`forget_deferred(..., lost=True)`). Only where the broker cannot tell is it assumed lost once
  `DEFER_GRACE` seconds passed since its due time. So a poison key flooded with messages never fills its
  worker's bound, and the other keys keep flowing (guarantee 3).
- **Workers run ready lanes, and help each other.** A worker runs the head message of a ready lane itself
  (the handler inside a cancel scope of `handler_timeout`) and settles it (ack, retry, dead-letter), so
  in the common case a message costs one task switch, as in a plain channel-per-worker pool. While a
  worker is inside a handler, messages sent to its channel wake an idle worker, which takes them into
  their lanes and runs whichever are ready. So a slow key holds one worker task, not the keys hashed next
  to it (isolation, guarantee 3), and at most `workers` handlers run at once. A failed message parks its
  lane, with the key's later messages, until its backoff is over (a timer task makes it ready again).

Why not workers that only run what they receive: a worker inside a slow handler would stop receiving, and
every key hashed to it would wait (head-of-line blocking, the defect this pool exists to fix). Why not
separate receiver and executor tasks: every message would cost two task switches instead of one. Keyless
messages get a lane of their own each, so they run concurrently with the same retry path.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

import attrs
import trio

from ._config import PoolConfig, RetryPolicy
from ._errors import HandlerTimeoutError
from ._messages import AggregateMessage
from ._statistics import Counters

__all__ = ["DEFER_GRACE", "Consumer", "KeyedWorkerPool", "describe", "fnv1a_32"]

logger = logging.getLogger("keyedbus")

_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


@functools.lru_cache(maxsize=65536)
def fnv1a_32(key: str) -> int:
    """FNV-1a 32-bit hash of the key's UTF-8 bytes: the same in every process, unlike hash()."""
    h = _FNV_OFFSET
    for byte in key.encode():
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def describe(exc: BaseException) -> str:
    """A failure as the dead-letter header carries it: 'Type: message'."""
    return f"{type(exc).__name__}: {exc}"


class Consumer(Protocol):
    """What the pool needs from a subscription to run and settle its messages."""

    @property
    def active(self) -> bool:
        """False once unsubscribing: its messages are released, not run."""
        ...

    @property
    def retry(self) -> RetryPolicy:
        """Its retry policy."""
        ...

    @property
    def topic(self) -> str:
        """Its topic, for logs."""
        ...

    async def handle(self, item: AggregateMessage) -> None:
        """Run the user's handler once for `item` (raises what the handler raises); the consumer counts its
        handlers running."""

    async def dead_letter(self, item: AggregateMessage, reason: str, failure: BaseException | None) -> None:
        """Publish `item` to the dead-letter topic with `reason` and log it (with `failure`'s traceback).

        Raises if the publish failed.
        """

    def released(self, item: AggregateMessage) -> None:
        """`item` was handed back unhandled (its subscription is gone): count it if it cannot come back."""


#: Shared by every lane that never deferred anything (never mutated: `_spill` gives a lane its own dicts
#: first): two dicts per lane would cost every message that starts a lane (pool_memory: ~2,700
#: instructions a message under callgrind).
_NONE_DUE: dict[int, float] = {}
_NONE_EARLY: dict[int, AggregateMessage] = {}


@attrs.define(eq=False, slots=True)
class _Lane:
    """The messages of one (subscription, key), in order; at most one of them runs at a time."""

    consumer: Consumer
    #: None for a keyless message's lane of its own.
    key: str | None
    #: The worker that received its messages and counts them against its bound.
    worker: int
    items: deque[AggregateMessage] = attrs.Factory(deque)
    #: "ready" (waiting for an executor), "running", "parked" (waiting for its retry), or "waiting" (empty,
    #: kept for the deferred messages it waits for)
    state: str = "ready"
    due: float = 0.0
    #: The worker running its head message, while "running".
    runner: int = -1
    #: Sequences of its messages handed back to the broker (deferred), a min-heap (`heapq`: [0] is the
    #: oldest, each step O(log n) for a flooded key); they must come back, oldest first, before any later
    #: message of the key is held. None while there are none.
    deferred: list[int] | None = None
    #: When each deferred sequence is due back.
    deferred_due: dict[int, float] = attrs.field(default=_NONE_DUE)
    #: Deferred messages that came back before an older deferred one (JetStream redelivers a round of
    #: delayed naks in no particular order), by sequence: kept here, counted in the pool's `_kept`, not
    #: against the worker's bound.
    early: dict[int, AggregateMessage] = attrs.field(default=_NONE_EARLY)
    #: The `Delivery.epoch` its deferred messages were handed back in.
    epoch: int = 0
    #: Its deferred messages go to another reader (`forget_deferred`): nothing is kept early any more.
    gone: bool = False
    #: Its ephemeral messages dropped since the last log line (coalesced: the first of a parking is logged
    #: at once, the rest when its retry comes).
    dropped: int = 0
    drop_logged: bool = False
    #: A timer entry was made for it (`_add_timer`): one may outlive it, so it is never reused (see `_spare`).
    timed: bool = False
    #: Something was spilled since its head last succeeded (or since it began).
    spilled: bool = False
    #: Seconds its spilled messages are handed back for beyond its retry (see `_hold_longer`).
    hold: float = 0.0


class _NoConsumer:
    """What a spare lane refers to instead of a subscription (which it must not keep alive)."""

    active = False
    topic = ""


#: The `consumer` of every spare lane.
_NO_CONSUMER: Consumer = cast("Consumer", _NoConsumer())

#: Seconds a deferred message of a parked key is handed back for at least (the broker's redelivery timer).
_MIN_DEFER = 0.5
#: Seconds past its due time a deferred message may take to come back before its key stops waiting for it
#: (the broker lost it: its stream deleted) and goes on with the next one, where the broker cannot tell
#: whether it lost it (`Delivery.will_redeliver` None). Longer than JetStream's default ack_wait (30 s): a
#: nak lost in a reconnect brings the message back after ack_wait.
DEFER_GRACE = 120.0
#: Seconds between two questions to a broker that can tell whether it will bring a deferred message back
#: (`Delivery.will_redeliver`), while messages of its key wait for it, kept early.
_RECHECK = 1.0

#: Lanes kept for reuse at most: a lane made per message cost ~4k instructions (pool_memory, latency).
_SPARE_MAX = 64

_CHANNEL = "channel"  # a worker waiting in receive() on its own channel
_LOT = "lot"  # a worker waiting on its parking lot: at its bound, or its channel closed


class KeyedWorkerPool:
    """Per-key order with `workers` handlers at most running at once, shared by every topic.

    See the module docstring for the shape: memory channels as worker queues, per-key lanes, workers.
    """

    def __init__(self, config: PoolConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        workers = config.workers
        # None is a wake-up call: an idle worker is woken with it to help (its channel is empty then).
        channels = [
            trio.open_memory_channel[AggregateMessage | None](config.queue_size) for _ in range(workers)
        ]
        self._send = [send for send, _ in channels]
        self._receive = [receive for _, receive in channels]
        #: Per channel: messages sent (or being sent) into it and not yet received. Never 0 while one is in
        #: it, so a worker skips looking into an empty channel (trio's receive_nowait raises WouldBlock:
        #: an exception per look, twice per message).
        self._queued = [0] * workers
        #: Per worker: messages received into its lanes and not yet settled (ready, running, parked).
        self._held = [0] * workers
        #: Per worker: messages in its parked lanes; with `_kept`, at most `_parked_max` unless each is a
        #: lane's head.
        self._parked = [0] * workers
        #: Per worker: deferred messages back early, kept by their lanes (`_Lane.early`) until an older one
        #: of their key is back. Not in `_held`: they must never stop the worker receiving, since the older
        #: message they wait for comes through its channel.
        self._kept = [0] * workers
        self._parked_max = max(1, config.queue_size // 2)
        #: True once a backend withdrew deliveries (see `forget_deferred`): only then does a message's
        #: `Delivery.withdrawn` need a look before it runs (memory:// and NATS core never withdraw any).
        self._withdrawing = False
        #: Per worker: where it waits (_CHANNEL, _LOT), or None while it works.
        self._waiting: list[str | None] = [None] * workers
        self._lots = [trio.lowlevel.ParkingLot() for _ in range(workers)]
        #: Workers waiting, most recent last (a dict as an ordered set: O(1) removal of any of them).
        self._idle: dict[int, None] = {}
        #: Workers woken by _wake_one that have not run yet: each will look at the ready lanes.
        self._woken: set[int] = set()
        #: Channels with messages waiting while their worker is busy: any idle worker takes them.
        self._stealable: set[int] = set()
        #: Stealable channels an idle worker was woken for (the others wait for a worker that is done).
        self._helped: set[int] = set()
        self._lanes: dict[tuple[Consumer, str], _Lane] = {}
        #: Lanes that ended as they began (never parked, deferred or spilled, so nothing but the lane table
        #: referred to them), for the next new key: most keys have no backlog, and a lane per message cost
        #: more than the message's other objects. They keep no subscription alive (`_NO_CONSUMER`).
        self._spare: list[_Lane] = []
        self._ready: deque[_Lane] = deque()
        self._running = 0
        self._timers: list[tuple[float, int, _Lane]] = []
        self._timer_changed = trio.lowlevel.ParkingLot()
        self._next_keyless = itertools.cycle(range(workers))
        self._items = 0  # sent into a channel and not yet settled or released
        self._idle_lot = trio.lowlevel.ParkingLot()  # wait_idle()
        self._closed = False
        self._tasks = 0
        self._tick = itertools.count()  # tie-breaker so the timer heap never compares lanes
        self.done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self, nursery: trio.Nursery) -> None:
        """Start the workers and the retry timer in `nursery` (the bus's one nursery).

        They run until `close()` and every queued, running and parked message is finished; then `done` is
        set. Cancelling the nursery leaves whatever is unfinished unsettled (redelivered later on
        persistent topics).
        """
        self._tasks = self.config.workers + 1
        nursery.start_soon(self._timer, name="keyedbus-retry-timer")
        for index in range(self.config.workers):
            nursery.start_soon(self._worker, index, name=f"keyedbus-worker-{index}")

    def close(self) -> None:
        """Take no more messages (the channels close); the tasks exit once everything is finished."""
        if self._closed:
            return
        self._closed = True
        for send in self._send:
            send.close()
        self._wake_all()

    @property
    def closed(self) -> bool:
        """True once `close()` was called: nothing more can be sent."""
        return self._closed

    def release_parked(self) -> None:
        """Hand back at once the parked messages of subscriptions that are no longer active.

        Their retry timers are not waited for: a gone subscription's messages go back to the broker.
        """
        for lane in list(self._lanes.values()):
            if lane.consumer.active:
                continue
            if lane.state == "parked":
                self._resume(lane)
            for seq in list(lane.early):
                self._release(self._unkeep(lane, seq))  # back to the broker with the deferred ones
            if lane.state == "waiting" and lane.key is not None:
                del self._lanes[(lane.consumer, lane.key)]

    def forget_deferred(self, consumer: Consumer, keys: Callable[[str], bool], *, lost: bool = False) -> None:
        """Another reader gets `consumer`'s messages of the keys `keys` selects now (a partition changed
        hands): their deferred messages come back there, not here. `lost`: they come back nowhere (their
        stream was deleted, or the broker restarted empty): the keys go on without them at once.

        Those kept early are handed back at once: the new reader holds their keys as owed (they are
        unsettled) and takes them in order; kept here, they would hold the new reader's keys until
        `DEFER_GRACE` gave up on the older ones, and then run out of order. Messages of those keys still
        on their way here (in a channel) are handed back too, behind the deferred ones; one that comes in
        a later reading (a new `Delivery.epoch`: the partition came back) finds the lane's deferrals
        dropped, since the broker then orders the key (owed keys). When `lost`, those kept early are
        handled here instead, in order (nothing older will come), and so are the key's later messages.
        """
        if not lost:
            self._withdrawing = True  # the backend marks what it withdraws right before it calls this
        for lane in list(self._lanes.values()):
            key = lane.key
            if lane.consumer is consumer and lane.deferred is not None and key is not None and keys(key):
                if lost:
                    self._go_on_without(lane)
                else:
                    self._hand_back_kept(lane)
                    lane.gone = True

    @property
    def unfinished(self) -> int:
        """Messages sent into a worker queue and not yet settled or released."""
        return self._items

    async def wait_idle(self) -> None:
        """Wait until no message is queued, running or parked."""
        while self._items:
            await self._idle_lot.park()
        await trio.lowlevel.checkpoint()

    def queue_depths(self) -> tuple[int, ...]:
        """Messages in each worker's memory channel, from the channels' own statistics(), by worker index."""
        return tuple(receive.statistics().current_buffer_used for receive in self._receive)

    def queued(self) -> int:
        """Messages waiting: in the worker queues, or in lanes and not running."""
        return sum(self.queue_depths()) + sum(self._held) + sum(self._kept) - self._running

    def lanes(self) -> int:
        """Per-key lanes alive now."""
        return len(self._lanes)

    # -- sending (the subscription tasks' side) ------------------------------------------------------

    def worker_for(self, key: str) -> int:
        """Index of the worker (and queue) of every message with this key."""
        return fnv1a_32(key) % self.config.workers

    def queue_for(self, item: AggregateMessage) -> int:
        """The worker queue `item` goes to: by its key's hash, or round-robin for a keyless message."""
        if item.key is None:
            return next(self._next_keyless)
        return fnv1a_32(item.key) % self.config.workers

    def send_nowait(self, index: int, item: AggregateMessage) -> bool:
        """Put `item` into worker `index`'s channel if it has room; False (nothing sent) if not.

        Raises trio.ClosedResourceError after `close()`.
        """
        try:
            self._send[index].send_nowait(item)
        except trio.WouldBlock:
            self._call_for_help(index)
            return False
        self._items += 1
        self._queued[index] += 1
        if self._waiting[index] is None:
            self._help_with(index, item)
        return True

    async def send(self, index: int, item: AggregateMessage) -> None:
        """Put `item` into worker `index`'s channel, waiting for room.

        Atomic with respect to cancellation (as trio's channels): if cancelled, the item was not sent.
        Raises trio.ClosedResourceError after `close()`.
        """
        # Counted before the wait: the worker may take it and settle it before this task runs again.
        self._items += 1
        self._queued[index] += 1
        try:
            await self._send[index].send(item)
        except BaseException:
            self._queued[index] -= 1
            self._settled()
            raise

    def _help_with(self, index: int, item: AggregateMessage) -> None:
        """`item` waits in busy worker `index`'s channel: see that a worker takes it when it can run.

        If its key's head is running, `item` cannot run before that head is done, and the worker running
        it takes `item` then (its own channel, or the busy worker's when it looks for stealable channels
        after each message): no idle worker is woken just to append `item` to a lane. A key with a backlog
        (slow handlers, several messages per key) otherwise woke one for nearly every message
        (io_bound[keys=100]: 0.4 wasted wake-ups a message).
        """
        key = item.key
        if key is not None:
            lane = self._lanes.get((item.consumer, key))
            if lane is not None and lane.state == "running":
                if lane.runner != index:
                    self._stealable.add(index)
                return
        self._call_for_help(index)

    def _call_for_help(self, index: int) -> None:
        """Worker `index` is busy (in a handler) with messages waiting in its channel: wake an idle one."""
        if index not in self._helped:
            self._helped.add(index)
            self._stealable.add(index)
            self._wake_one()

    # -- the workers ----------------------------------------------------------------------------------

    def _wake(self, index: int) -> bool:
        """Wake worker `index` from its wait; False if it was not waiting."""
        how = self._waiting[index]
        if how is None:
            return False
        if how == _LOT:
            self._lots[index].unpark()
            return True
        # WouldBlock or closed: it has a message or an end of channel to wake it anyway.
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
            self._send[index].send_nowait(None)
        return True

    def _wake_one(self) -> None:
        """Wake the worker that went idle last.

        Waking the one idle the longest instead woke fewer helpers in io_bound[keys=100] (0.21-0.25 a
        message against 0.31-0.36: the most recent is often the home of a key still publishing, whose next
        message then needs a helper in turn), but cost more CPU: 0.377 against 0.352 s, medians of 8
        interleaved pairs, 7 of them higher. Likely cause: it cycles through every worker's frames, where
        the most recent keeps a few of them warm in the CPU's cache.
        """
        idle = self._idle
        while idle:
            index = idle.popitem()[0]
            if self._wake(index):
                self._woken.add(index)
                return

    def _wake_all(self) -> None:
        for index in range(self.config.workers):
            self._wake(index)
        if self._timer_changed:
            self._timer_changed.unpark_all()

    def _take(self, index: int) -> None:
        """Move what waits in worker `index`'s channel into its lanes, up to its bound."""
        queued = self._queued
        receive = self._receive[index]
        held = self._held
        limit = self.config.queue_size
        while held[index] < limit:
            if not queued[index]:
                self._stealable.discard(index)
                self._helped.discard(index)
                return
            try:
                item = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                self._stealable.discard(index)
                self._helped.discard(index)
                return
            if item is not None:
                queued[index] -= 1
                self._admit(index, item)

    def _admit(self, index: int, item: AggregateMessage) -> None:
        key = item.key
        if key is None:
            lane = _Lane(item.consumer, None, index)
        else:
            lane_key = (item.consumer, key)
            existing = self._lanes.get(lane_key)
            if existing is not None:
                if existing.deferred and item.consumer.active:
                    self._admit_deferred(existing, item)
                elif self._parked_full(existing) and item.consumer.active and item.delivery.spillable:
                    self._spill(existing, item)
                else:
                    self._hold(existing, item)
                return
            spare = self._spare
            if spare:
                lane = spare.pop()
                lane.consumer = item.consumer
                lane.key = key
                lane.worker = index
                lane.state = "ready"
            else:
                lane = _Lane(item.consumer, key, index)
            self._lanes[lane_key] = lane
        self._held[index] += 1
        lane.items.append(item)
        self._ready.append(lane)

    def _hold(self, lane: _Lane, item: AggregateMessage) -> None:
        """Append `item` to its lane, counted against its worker's bound."""
        self._held[lane.worker] += 1
        lane.items.append(item)  # ready, running or parked: its turn comes
        if lane.state == "parked":
            self._parked[lane.worker] += 1
        elif lane.state == "waiting":
            lane.state = "ready"
            self._ready.append(lane)

    # -- a parked key's backlog beyond the bound --------------------------------------------------------
    #
    # A parked key holds its later messages only while its worker's parked lanes hold fewer than
    # `queue_size // 2` messages; beyond, they are spilled: handed back to the broker to come again after
    # the key's retry (persistent: `Delivery.defer`), or dropped and counted (ephemeral), never its
    # neighbours'. A key with deferred messages takes them back oldest first and hands every later message
    # back too, so the key's order holds through the broker's redelivery.

    def _admit_deferred(self, lane: _Lane, item: AggregateMessage) -> None:
        """`item` arrives for a key with messages deferred: take it in its turn, keep it, or spill it."""
        deferred = lane.deferred
        assert deferred is not None
        if item.delivery.epoch != lane.epoch:
            # A later reading (the partition came back): what was deferred went to another reader, and the
            # broker holds this key until it is settled (owed keys), so it orders the key from here on.
            self._hand_back_kept(lane)
            lane.deferred, lane.deferred_due, lane.gone = None, {}, False
            if self._parked_full(lane):
                self._spill(lane, item)
            else:
                self._hold(lane, item)
            return
        if lane.gone:
            self._spill(lane, item)  # the ones before it went to another reader: so does it
            return
        seq = item.delivery.sequence
        now = trio.current_time()
        while (
            deferred
            and deferred[0] != seq
            and deferred[0] not in lane.early
            and (why := self._lost(lane, deferred[0], now, item)) is not None
        ):
            self._give_up(lane, heapq.heappop(deferred), why)
        self._take_early(lane)
        if not lane.deferred:  # it gave up on the rest: the key is back to normal
            if self._parked_full(lane):
                self._spill(lane, item)
            else:
                self._hold(lane, item)
            return
        if deferred[0] == seq and not self._parked_full(lane):
            heapq.heappop(deferred)
            del lane.deferred_due[seq]
            self._hold(lane, item)
        elif (
            seq in lane.deferred_due
            and lane.state != "parked"
            and seq not in lane.early
            and self._parked_room(lane.worker) > 0
        ):
            # Back before an older deferred one: keep it until that one is back (bounded with the parked
            # messages; not against the worker's bound, see `_kept`).
            self._kept[lane.worker] += 1
            lane.early[seq] = item
            if len(lane.early) == 1:  # if the older one never comes, the timer gives up on it
                self._add_timer(self._look_again_at(lane, item, now), lane)
        else:
            self._spill(lane, item)
        self._take_early(lane)

    def _take_early(self, lane: _Lane) -> None:
        """Move the deferred messages kept in `lane.early` into the lane while they are next in order."""
        deferred = lane.deferred
        while deferred and deferred[0] in lane.early:
            seq = heapq.heappop(deferred)
            del lane.deferred_due[seq]
            self._hold(lane, self._unkeep(lane, seq))
        if not deferred:
            lane.deferred = None
            for seq in sorted(lane.early or ()):  # cannot happen (each kept one is deferred): never strand
                self._hold(lane, self._unkeep(lane, seq))

    def _unkeep(self, lane: _Lane, seq: int) -> AggregateMessage:
        """Take deferred message `seq` out of those `lane` keeps early (see `_kept`)."""
        self._kept[lane.worker] -= 1
        return lane.early.pop(seq)

    def _hand_back_kept(self, lane: _Lane) -> None:
        """Hand back to the broker, at once, the deferred messages `lane` kept early."""
        for seq in sorted(lane.early):
            item = self._unkeep(lane, seq)
            if item.delivery.defer(0.0):
                self._settled()
            else:
                self._release(item)  # cannot happen: only what a broker took back once is kept

    @staticmethod
    def _lost(lane: _Lane, seq: int, now: float, probe: AggregateMessage | None) -> str | None:
        """Why deferred `seq` of `lane` will not come back, or None while it may: the broker says so
        (`probe`, a message of the same subscription, asks it), or, where it cannot tell, `DEFER_GRACE` has
        passed since it was due.

        A broker that can tell is trusted over the clock: a deferred message may come back long after its
        due time without being lost (the subscription waits for room in the worker queues meanwhile), and
        giving up on it then runs the key's later messages before it.
        """
        known = None if probe is None else probe.delivery.will_redeliver(seq)
        if known is not None:
            if known:
                return None
            return (
                "will not come back: the broker no longer holds it (settled elsewhere, evicted by a limit, "
                "or its stream deleted)"
            )
        if now < lane.deferred_due[seq] + DEFER_GRACE:
            return None
        return (
            f"did not come back within {DEFER_GRACE} s of its due time, and the broker cannot tell whether "
            "it still holds it (evicted by a limit, or its stream deleted?)"
        )

    @staticmethod
    def _look_again_at(lane: _Lane, probe: AggregateMessage, now: float) -> float:
        """When the timer of `lane` (with messages kept early) next asks whether its oldest deferred
        message is lost: `_RECHECK` after its due time where the broker can tell (again and again while it
        says it still holds it), else `DEFER_GRACE` after it (or a grace from now, once past: not in a
        loop)."""
        seq = lane.deferred[0] if lane.deferred else 0
        due = lane.deferred_due.get(seq, now)
        if probe.delivery.will_redeliver(seq) is None:
            at = due + DEFER_GRACE
            return at if at > now else now + DEFER_GRACE
        return max(due, now) + _RECHECK

    def _go_on_without(self, lane: _Lane) -> None:
        """The broker lost what `lane` deferred: take the ones kept early, in order, and go on."""
        deferred = lane.deferred or []
        gone = [seq for seq in deferred if seq not in lane.early]
        if gone:
            logger.warning(
                "%s: %d deferred message(s) of key %s went with their stream (deleted, or the broker "
                "restarted empty); the key goes on without them",
                lane.consumer.topic,
                len(gone),
                lane.key,
                extra={"topic": lane.consumer.topic, "key": lane.key, "count": len(gone)},
            )
        lane.deferred = sorted(seq for seq in deferred if seq in lane.early)  # sorted: still a heap
        for seq in gone:
            del lane.deferred_due[seq]
        self._take_early(lane)
        if lane.state == "ready":
            self._wake_one()
        elif lane.state == "waiting" and lane.key is not None:
            del self._lanes[(lane.consumer, lane.key)]  # kept only for what will not come

    def _give_up(self, lane: _Lane, lost: int, why: str) -> None:
        del lane.deferred_due[lost]
        logger.warning(
            "%s: a deferred message of key %s (sequence %d) %s; the key goes on without it",
            lane.consumer.topic,
            lane.key,
            lost,
            why,
            extra={"topic": lane.consumer.topic, "key": lane.key},
        )

    def _parked_room(self, worker: int) -> int:
        """Messages `worker`'s parked lanes may still hold: parked ones and those kept early count alike."""
        return self._parked_max - self._parked[worker] - self._kept[worker]

    def _parked_full(self, lane: _Lane) -> bool:
        return lane.state == "parked" and self._parked_room(lane.worker) <= 0

    def _spill(self, lane: _Lane, item: AggregateMessage) -> None:
        """Hand `item` back to the broker, due after the key's retry (persistent), or drop it (ephemeral)."""
        now = trio.current_time()
        if lane.state == "parked":
            delay = lane.due - now + lane.hold
        elif lane.deferred:
            delay = lane.deferred_due[lane.deferred[0]] - now  # behind the oldest deferred one
        else:
            delay = 0.0
        delay = max(delay, _MIN_DEFER)
        if item.delivery.defer(delay):
            lane.spilled = True
            seq = item.delivery.sequence
            if lane.deferred is None:
                lane.epoch = item.delivery.epoch
                lane.deferred = []
                if lane.deferred_due is _NONE_DUE:
                    lane.deferred_due, lane.early = {}, {}
            if seq not in lane.deferred_due:
                heapq.heappush(lane.deferred, seq)
            lane.deferred_due[seq] = now + delay
        else:
            self.counters.dropped += 1
            lane.dropped += 1
            if not lane.drop_logged:
                lane.drop_logged = True
                self._log_dropped(lane)
        self._settled()

    def _log_dropped(self, lane: _Lane) -> None:
        if not lane.dropped:
            return
        logger.warning(
            "dropped %d message(s) of ephemeral topic %s: key %s is parked (failing) and its worker holds "
            "%d message(s) of parked keys at most (PoolConfig.queue_size // 2)",
            lane.dropped,
            lane.consumer.topic,
            lane.key,
            self._parked_max,
            extra={"topic": lane.consumer.topic, "key": lane.key, "count": lane.dropped},
        )
        lane.dropped = 0

    async def _worker(self, index: int) -> None:
        """Take worker `index`'s messages into lanes, run ready lanes (any worker's), help busy workers."""
        try:
            await self._work(index)
        finally:
            self._task_exited()

    async def _work(self, index: int) -> None:
        receive = self._receive[index]
        ready = self._ready
        held = self._held
        limit = self.config.queue_size
        stealable = self._stealable
        since_yield = 0
        lane: _Lane | None = None
        ended = False  # our channel is closed and empty
        queued = self._queued
        while True:
            if not ended and queued[index]:
                self._take(index)
            elif stealable:
                stealable.discard(index)  # nothing waits in our channel
                self._helped.discard(index)
            if stealable:
                for other in list(stealable):
                    if self._waiting[other] is None:
                        self._take(other)
                    else:
                        stealable.discard(other)  # it is back, waiting: its own channel wakes it
                        self._helped.discard(other)
            if ready:
                if len(ready) > 1 + len(self._woken) and self._idle:
                    # More ready lanes than this worker and those already woken will run: share them. (A
                    # wake-up per extra ready lane, whoever else was woken, left io_bound[keys=100] with
                    # 0.4 wasted wake-ups a message: the lane was gone when the woken worker ran.)
                    self._wake_one()
                lane = ready.popleft()
                # A handler need not checkpoint (a no-op does not): yield every few messages, so a worker
                # with a long ready queue never starves the other tasks.
                since_yield += 1
                if since_yield >= 16:
                    since_yield = 0
                    await trio.lowlevel.checkpoint()
                if lane.state != "ready":
                    continue  # handed back while we yielded
                # Run the lane's head message once (here, not in a coroutine of its own: one coroutine level
                # less a message, ~1.5k instructions), then requeue, drop or park it.
                lane.state = "running"
                lane.runner = index
                self._running += 1
                try:
                    delay = await self._attempt(lane.items[0])
                finally:
                    self._running -= 1
                self._ran(lane, delay)
                continue
            if self._closed and not self._items:
                return
            lane = None  # an idle worker keeps no lane (nor its subscription) alive
            since_yield = 0
            self._idle[index] = None
            try:
                if ended or held[index] >= limit:
                    # At the bound it stops receiving: the channel fills and senders wait (or drop).
                    self._waiting[index] = _LOT
                    await self._lots[index].park()
                else:
                    self._waiting[index] = _CHANNEL
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        ended = True
                    else:
                        if item is not None:
                            self._queued[index] -= 1
                            self._admit(index, item)
                            item = None  # an idle worker keeps no message (nor its subscription) alive
            finally:
                self._waiting[index] = None
                self._idle.pop(index, None)
                self._woken.discard(index)

    def _ran(self, lane: _Lane, delay: float | None) -> None:
        """The head message of `lane` ran once (`delay`: `_attempt`'s): requeue, drop or park the lane."""
        if delay is None:
            lane.items.popleft()
            self._held[lane.worker] -= 1
            if lane.spilled:
                lane.spilled, lane.hold = False, 0.0  # it recovered: the next failure starts afresh
            if self._withdrawing:
                while lane.items and lane.items[0].delivery.withdrawn:  # the key's later ones go back too
                    self._release(lane.items.popleft())
                    self._held[lane.worker] -= 1
            if self._waiting[lane.worker] == _LOT:
                self._lots[lane.worker].unpark()  # below its bound again: it may receive
            if lane.items:
                lane.state = "ready"
                self._ready.append(lane)  # behind the other ready keys: round robin
            elif lane.deferred and lane.consumer.active:
                lane.state = "waiting"  # kept: its deferred messages must come back first
            elif lane.key is not None:
                if lane.dropped:
                    self._log_dropped(lane)
                del self._lanes[(lane.consumer, lane.key)]
                if (
                    not lane.timed
                    and lane.deferred_due is _NONE_DUE
                    and not lane.drop_logged
                    and len(self._spare) < _SPARE_MAX
                ):
                    lane.consumer = _NO_CONSUMER
                    self._spare.append(lane)
            return
        # Park the key with its later messages; they still count against their worker's bound. Beyond
        # the parked bound they are spilled, newest first, the head always kept.
        lane.state = "parked"
        lane.due = trio.current_time() + delay
        if lane.spilled:
            self._hold_longer(lane)
        worker = lane.worker
        room = max(1, self._parked_room(worker))
        if len(lane.items) > room and lane.consumer.active and lane.items[-1].delivery.spillable:
            tail = [lane.items.pop() for _ in range(len(lane.items) - room)]
            self._held[worker] -= len(tail)
            for item in reversed(tail):  # oldest first: the broker gives them back in this order
                self._spill(lane, item)
            if self._waiting[worker] == _LOT:
                self._lots[worker].unpark()  # below its bound again: it may receive
        self._parked[worker] += len(lane.items)
        self.counters.parked_keys += 1
        self._add_timer(lane.due, lane)

    @staticmethod
    def _hold_longer(lane: _Lane) -> None:
        """`lane` failed again with messages spilled: hand its spills back for longer beyond its retry.

        Its deferred messages come back when its retry is due; if that retry fails too, each is handed
        back again (a redelivery and a deferral apiece, a JetStream nak on NATS), and a key flooded with
        thousands did that at every retry: work in proportion to backlog times retries, taken from the
        other keys. Doubling the extra wait at each failure (from `_MIN_DEFER`) bounces them a few times,
        then about once per the policy's `max_backoff` (at most that much extra): what it costs is that a key
        which recovers may wait up to that long for the messages it deferred (those it held run meanwhile).
        """
        cap = max(lane.consumer.retry.max_backoff, _MIN_DEFER)
        lane.hold = min(max(2 * lane.hold, _MIN_DEFER), cap)

    def _add_timer(self, due: float, lane: _Lane) -> None:
        lane.timed = True  # never reused: this entry may outlive it
        heapq.heappush(self._timers, (due, next(self._tick), lane))
        if self._timer_changed:
            self._timer_changed.unpark_all()

    def _overdue(self, lane: _Lane) -> None:
        """Give up on deferred messages of `lane` that are overdue, then take the kept ones that follow."""
        deferred = lane.deferred
        now = trio.current_time()
        probe = next(iter(lane.early.values()), None)
        while (
            deferred
            and deferred[0] not in lane.early
            and (why := self._lost(lane, deferred[0], now, probe)) is not None
        ):
            self._give_up(lane, heapq.heappop(deferred), why)
        self._take_early(lane)
        if lane.early and lane.deferred:
            self._add_timer(self._look_again_at(lane, next(iter(lane.early.values())), now), lane)
        if lane.state == "ready":
            self._wake_one()

    def _settled(self) -> None:
        self._items -= 1
        if not self._items:
            if self._idle_lot:
                self._idle_lot.unpark_all()
            if self._closed:
                self._wake_all()

    def _task_exited(self) -> None:
        self._tasks -= 1
        if not self._tasks:
            self.done.set()

    def _resume(self, lane: _Lane) -> None:
        """A parked lane's retry is due (or its subscription is gone): ready again, head first."""
        lane.state = "ready"
        self.counters.parked_keys -= 1
        self._parked[lane.worker] -= len(lane.items)
        self._log_dropped(lane)
        lane.drop_logged = False
        self._ready.appendleft(lane)  # its retry was due already: before keys that just arrived
        self._wake_one()

    async def _timer(self) -> None:
        """Move parked lanes back to ready when their retry is due."""
        timers = self._timers
        try:
            while True:
                if self._closed and not self._items:
                    return  # timers left over are of lanes handed back early
                if timers:
                    with trio.move_on_at(timers[0][0]):
                        await self._timer_changed.park()
                else:
                    await self._timer_changed.park()
                now = trio.current_time()
                while timers and timers[0][0] <= now:
                    due, _, lane = heapq.heappop(timers)
                    if lane.state == "parked" and lane.due == due:  # else: handed back early
                        self._resume(lane)
                    elif lane.early and lane.state != "parked":
                        self._overdue(lane)
                    elif lane.early:
                        # A give-up timer while the key waits for its retry: look again when it resumes
                        # (its retry's timer is older, so it goes first at the same time).
                        self._add_timer(lane.due, lane)
        finally:
            self._task_exited()

    async def _attempt(self, item: AggregateMessage) -> float | None:
        """Run `item` once and settle it; return the seconds to wait before a retry, or None when done.

        The handler runs inside a `handler_timeout` cancel scope. Whatever it raises fails this attempt only,
        a stray trio.Cancelled included (one it caught in a scope of its own and raised outside it). Only the
        bus's own cancellation propagates, and KeyboardInterrupt / SystemExit, which hand the message back.
        """
        consumer: Consumer = item.consumer
        if not consumer.active or (self._withdrawing and item.delivery.withdrawn):
            self._release(item)
            return None
        if item.dead_letter_reason is not None:
            return await self._dead_letter(item, item.dead_letter_reason, None)
        counters = self.counters
        counters.in_flight += 1
        # The handler runs here, not in a coroutine of its own: one coroutine less per message.
        timeout = self.config.handler_timeout
        failure: BaseException | None = None
        stray: BaseException | None = None
        try:
            if timeout is None:
                await consumer.handle(item)
            else:
                with trio.move_on_after(timeout) as scope:  # the handler_timeout cancel scope
                    await consumer.handle(item)
                if scope.cancelled_caught:
                    failure = HandlerTimeoutError(
                        f"handler ran longer than {timeout} s (PoolConfig.handler_timeout) and was cancelled"
                    )
        except (KeyboardInterrupt, SystemExit):
            self._release(item)
            raise
        except trio.Cancelled as exc:
            stray = exc
        except BaseException as exc:
            failure = exc
        finally:
            counters.in_flight -= 1
        if stray is not None:
            # A Cancelled is the bus's own only if this task is being cancelled, and then this checkpoint
            # raises it again. Otherwise the handler let out a Cancelled that is not ours: a failed attempt.
            await trio.lowlevel.checkpoint()
            failure = stray
        if failure is None:
            counters.handled += 1
            item.delivery.ack()
            self._settled()
            return None
        if not consumer.active:
            self._release(item)
            return None
        policy = consumer.retry
        if item.attempt >= policy.max_attempts:
            return await self._dead_letter(item, describe(failure), failure)
        counters.retried += 1
        delay = policy.backoff(item.attempt)
        logger.warning(
            "handler failed on %s (key %s, attempt %d of %d), retrying in %.3f s: %s",
            consumer.topic,
            item.key,
            item.attempt,
            policy.max_attempts,
            delay,
            describe(failure),
            extra={
                "topic": consumer.topic,
                "key": item.key,
                "attempt": item.attempt,
                "message_id": item.delivery.message.message_id,
            },
        )
        item.attempt += 1
        return delay

    async def _dead_letter(
        self, item: AggregateMessage, reason: str, failure: BaseException | None
    ) -> float | None:
        consumer: Consumer = item.consumer
        try:
            await consumer.dead_letter(item, reason, failure)
        except Exception as exc:
            # Never drop it: keep the key parked and try the dead-letter publish again later.
            item.dead_letter_reason = reason
            delay = consumer.retry.max_backoff or 1.0
            logger.error(  # noqa: TRY400 - the reason is in the message; no traceback wanted
                "could not dead-letter a message of %s (key %s), trying again in %.1f s: %s",
                consumer.topic,
                item.key,
                delay,
                exc,
                extra={
                    "topic": consumer.topic,
                    "key": item.key,
                    "attempt": item.attempt,
                    "message_id": item.delivery.message.message_id,
                },
            )
            return delay
        item.delivery.term()
        self.counters.dead_lettered += 1
        self._settled()
        return None

    def _release(self, item: AggregateMessage) -> None:
        item.delivery.release()
        item.consumer.released(item)
        self._settled()
