"""The embedded broker behind ``memory://``: JetStream-like logs, cursors, acks and redelivery, in process.

Persistent topics keep a bounded log; each (topic, group) has its own cursor, acks and redelivery list, and a
message leaves the log once every group has settled it (acked or terminated), even while an older message is
not: JetStream's interest retention. A message settled above a group's ack floor (behind a parked key, say)
leaves a shared `_GONE` marker in its slot, so the log stays indexed by sequence: a parked key pins sequence
numbers (an 8-byte slot; with several groups also an entry in a group's set of acks above its floor), not
messages. A group that subscribes later starts at the oldest message kept, so it gets every message some group
has not settled yet and none that every group had settled before it came (a topic no group has subscribed to
keeps everything up to its bound, so its first group gets all of that). Ephemeral topics fan out to each
subscriber's bounded buffer with no log (at-most-once): a full buffer drops the message and counts it.

Limits and retention (docs/semantics.md): limits the user set (max_msgs, max_bytes, max_age) evict the
oldest messages, as JetStream's ``discard: old`` does; a topic no group has subscribed to keeps at most
UNREAD_MAX_MSGS / UNREAD_MAX_BYTES and evicts the oldest beyond; every eviction of a message some group had
not settled is counted and logged. Without user limits nothing a group has not settled is evicted: at
DEFAULT_MAX_MSGS a publish waits while a subscriber can make room, else raises TopicFullError. Every bound
(max_msgs, max_bytes, DEFAULT_MAX_MSGS) counts the messages kept, never a settled one's marker.

A publish only stores (appends to the log, or puts into each ephemeral subscriber's buffer) and wakes the
subscription's task. That task takes what was stored in batches and hands them to the bus (`Inbox.deliver`:
decoding, keys and the wait for room in the worker queues happen there, never in the publisher's task).
A subscription's task runs while it has something to take and exits one scheduling round after it has
taken everything (a publisher still publishing finds it running, not gone); the next publish starts it
again. So an idle subscription costs no task: a thousand quiet topics cost no more tasks than one (flat
cost, guarantee 4).
"""

from __future__ import annotations

import contextvars
import heapq
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from itertools import islice
from typing import Any

import trio

from .._config import TopicConfig
from .._errors import MessageTooLargeError, TopicConfigConflictError, TopicFullError
from .._messages import KEY_HEADER, Message, key_of_headers, make_message, wire_size
from ._base import AtMostOnceDelivery, Inbox, Outgoing

__all__ = [
    "DEDUP_WINDOW",
    "DEFAULT_MAX_MSGS",
    "DEFAULT_MAX_PAYLOAD",
    "HANDLING_TOPIC",
    "UNREAD_MAX_BYTES",
    "UNREAD_MAX_MSGS",
    "MemoryBackend",
]

logger = logging.getLogger("keyedbus")

#: Messages a persistent memory topic keeps for its groups when TopicConfig.max_msgs is None: a publish
#: beyond it waits for a subscriber to settle one (or raises TopicFullError when none can).
DEFAULT_MAX_MSGS = 1_000_000
#: What a topic no group has ever subscribed to keeps when the user set no limit (every default dead-letter
#: topic): the newest 100,000 messages and 64 MiB of payload; older ones are evicted, counted and logged.
UNREAD_MAX_MSGS = 100_000
UNREAD_MAX_BYTES = 64 * 1024 * 1024
#: Largest message memory:// takes, payload plus encoded headers: nats-server's default max_payload.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
#: The topic whose handler the current task runs (set by the bus around each handler call): a handler that
#: publishes into its own full topic would wait for itself, so it gets TopicFullError at once instead.
HANDLING_TOPIC: contextvars.ContextVar[str | None] = contextvars.ContextVar("keyedbus_handling", default=None)
#: Seconds between two eviction warnings of one topic; the count in each covers everything since the last.
_EVICTION_LOG_INTERVAL = 10.0
#: Seconds during which a message id seen before is not stored again (JetStream's default window).
DEDUP_WINDOW = 120.0
_BATCH = 256
_PUBLISHES_PER_YIELD = 16
#: A run of publishes (see _Starts) shorter than this yields at every publish.
_BURST = 256
#: From _BURST publishes on, a run yields every 2 publishes; from _FLOOD on, one more every _RUN_PER_STEP.
_FLOOD = 1024
_RUN_PER_STEP = 64


class _Delivery:
    """A persistent message delivered to one group; settles against the group it came from."""

    __slots__ = ("generation", "group", "message", "seq")

    def __init__(self, group: _Group, seq: int, generation: int, message: Message) -> None:
        self.group = group
        self.seq = seq
        self.generation = generation
        self.message = message

    def ack(self) -> None:
        self.group.settle(self)

    def term(self) -> None:
        self.group.settle(self)

    def release(self) -> None:
        """Handed back unrun: it stays outstanding and is redelivered after detach (meanwhile a limit that
        evicts it counts it). One a limit evicted while it was queued cannot be: it is counted now."""
        self.group.released(self)

    withdrawn = False  # memory:// has no partitions to move
    spillable = True  # deferred: redelivered from the log when due

    @property
    def sequence(self) -> int:
        return self.seq

    def defer(self, delay: float) -> bool:
        self.group.defer(self, delay)
        return True

    def will_redeliver(self, sequence: int) -> bool | None:
        """A deferred message stays outstanding until redelivered and settled; a limit's eviction (counted)
        is the only way it leaves, unless it was evicted on its way back to the pool (redelivered, not yet
        there): that copy still comes. None once the group was handed to another subscriber (a new
        reading)."""
        group = self.group
        if self.generation != group.generation:
            return None
        if sequence in group.outstanding:
            return True
        held = group.evicted_in_hand
        return held is not None and sequence in held and held[sequence][0] == group.generation

    @property
    def epoch(self) -> int:
        return self.generation


class _Entry(_Delivery):
    """A stored message (`message`, as first delivered: attempt 1), and its first delivery.

    One object a message, not two, on the common path: the first group to take it gets the entry itself as
    its delivery (`take` sets `group` and `generation` then); every other delivery of it (another group's,
    a redelivery) is a `_Delivery` of its own, so a stale copy in the pool never shares the current one's
    generation. Until it is taken, `generation` is -1 and `group` is unset: nothing settles an entry that
    was never handed out.
    """

    __slots__ = ("stored_at",)

    def __init__(self, seq: int, message: Message, stored_at: float) -> None:
        self.seq = seq
        self.message = message
        self.stored_at = stored_at
        self.generation = -1  # not handed out yet (a group's generation is never negative)


class _Redelivery(_Delivery):
    """A deferred message delivered again, with its log entry: deferring it again (its key still parked) keeps
    the entry without indexing the log, a deque indexed in O(distance from its nearer end): behind a
    long-parked key the log holds a marker per settled message, and each index into its middle walked
    hundreds of cold blocks."""

    __slots__ = ("entry",)

    def __init__(self, group: _Group, seq: int, generation: int, message: Message, entry: _Entry) -> None:
        super().__init__(group, seq, generation, message)
        self.entry = entry


#: What stands in the log for a message every group has settled while an older one is not (interest
#: retention): its body and everything it pinned are freed; only the slot keeps the log indexed by sequence.
#: Its stored_at is -inf so a max_age pass drops it with the evicted ones (it never counts as evicted).
_GONE = _Entry(0, make_message("", b"", None, {}, 1, ""), float("-inf"))
#: The log of every topic with nothing stored (see _Topic.__init__); nothing is ever appended to it.
_NO_LOG: deque[_Entry] = deque()
#: The `room` of every topic no publisher ever waited on; nobody ever parks in it (publish swaps it first).
_NOBODY_WAITS = trio.lowlevel.ParkingLot()


class _Changes:
    """Where `wait_settled` (the bus's drain) waits for a store, a delivery or a settle to look again.

    Told of every one of them, so its check is an attribute read, not ParkingLot.__bool__ (a Python call
    at each store, delivery and settle: ~2.6 a message).
    """

    __slots__ = ("lot", "waiting")

    def __init__(self) -> None:
        self.lot = trio.lowlevel.ParkingLot()
        self.waiting = 0  # tasks in wait_settled

    def tell(self) -> None:
        """Something changed: wake whoever waits (only called when `waiting`)."""
        self.lot.unpark_all()


class _Evictions:
    """Evictions of messages some group had not settled (or that no group had read): total and warnings."""

    def __init__(self) -> None:
        self.total = 0

    def record(self, topic: _Topic, count: int, why: str, now: float) -> None:
        self.total += count
        topic.unlogged += count
        topic.evicted_why = why
        if now >= topic.logged_at + _EVICTION_LOG_INTERVAL or topic.logged_at < 0:
            self.log(topic, now)

    def log(self, topic: _Topic, now: float) -> None:
        if not topic.unlogged:
            return
        logger.warning(
            "evicted %d message(s) of topic %s before every group had handled them: %s",
            topic.unlogged,
            topic.name,
            topic.evicted_why,
            extra={"topic": topic.name, "count": topic.unlogged},
        )
        topic.unlogged = 0
        topic.logged_at = now


class _Topic:
    __slots__ = (
        "bytes",
        "changed",
        "config",
        "ephemeral_subs",
        "evicted_why",
        "evictions",
        "gone",
        "groups",
        "head",
        "log",
        "logged_at",
        "name",
        "next_seq",
        "persistent",
        "recent_ids",
        "recent_order",
        "room",
        "unlogged",
    )

    def __init__(self, name: str, config: TopicConfig, changed: _Changes, evictions: _Evictions) -> None:
        self.name = name
        self.config = config
        self.persistent = config.persistent  # never changes (configure_topic refuses to)
        # An empty deque holds a 64-slot block (~760 bytes): a topic with nothing stored shares _NO_LOG, never
        # appended to, so idle and drained topics cost little (flat cost, many topics).
        self.log: deque[_Entry] = _NO_LOG
        self.head = 1  # the sequence of log[0]; next_seq when the log is empty
        self.gone = 0  # _GONE slots in the log: stored messages are len(log) - gone
        self.bytes = 0  # payload bytes of the stored messages (not of _GONE slots)
        self.next_seq = 1
        self.groups: dict[str, _Group] = {}
        self.ephemeral_subs: list[_EphemeralSubscription] = []
        self.room = _NOBODY_WAITS  # a ParkingLot costs ~180 bytes: made when a publisher first waits
        self.changed = changed
        self.recent_ids: dict[str, float] = {}
        # Created on the first message id: an idle topic should cost little (flat cost, many topics).
        self.recent_order: deque[tuple[float, str]] | None = None
        self.evictions = evictions
        self.unlogged = 0
        self.logged_at = -1.0
        self.evicted_why = ""

    @property
    def first_seq(self) -> int:
        return self.head

    @property
    def stored(self) -> int:
        """Messages kept for some group (or for none yet): what max_msgs and DEFAULT_MAX_MSGS count."""
        return len(self.log) - self.gone

    def _pop(self) -> _Entry:
        """Drop the oldest slot of the log and account for it; the caller knows the log is not empty."""
        entry = self.log.popleft()
        self.head += 1
        if entry is _GONE:
            self.gone -= 1
        else:
            self.bytes -= len(entry.message.data)
        return entry

    def forget(self, seq: int, by: _Group) -> None:
        """`by` has just settled `seq`: drop its message if every other group has settled it too.

        Interest retention: a message every group has settled holds neither memory nor room, even while an
        older one keeps a group's ack floor below it (a parked key pins sequences, not messages).
        """
        groups = self.groups
        if len(groups) > 1 and not all(g is by or g.has_settled(seq) for g in groups.values()):
            return
        i = seq - self.head
        if i < 0:
            return  # evicted already
        log = self.log
        entry = log[i]
        if entry is _GONE:
            return
        log[i] = _GONE
        self.gone += 1
        self.bytes -= len(entry.message.data)
        if self.room is not _NOBODY_WAITS and self.room:
            self.room.unpark_all()

    def make_room(self, size: int, now: float | None = None) -> bool:
        """Evict what the limits say must go for a message of `size` bytes; False if it must wait instead.

        Only limits the user set, and the bound of a topic no group has subscribed to, evict. `now` (for the
        eviction log) is read from the clock only when something is evicted: most publishes evict nothing.
        """
        cfg = self.config
        if self.groups and cfg.max_msgs is None and cfg.max_bytes is None:
            return len(self.log) - self.gone < DEFAULT_MAX_MSGS  # the common case, checked on every publish
        if not self.groups:
            max_msgs = cfg.max_msgs or UNREAD_MAX_MSGS
            max_bytes = cfg.max_bytes or UNREAD_MAX_BYTES
            why = (
                f"no group subscribes to it, so it keeps the newest {max_msgs} message(s) and {max_bytes} "
                "bytes (subscribe to it, or set TopicConfig max_msgs / max_bytes)"
            )
            self._evict(why, now, max_msgs=max_msgs, max_bytes=max_bytes, size=size)
            return True
        if cfg.max_msgs is not None:
            self._evict(f"TopicConfig max_msgs={cfg.max_msgs}", now, max_msgs=cfg.max_msgs)
        if cfg.max_bytes is not None:
            self._evict(f"TopicConfig max_bytes={cfg.max_bytes}", now, max_bytes=cfg.max_bytes, size=size)
        return cfg.max_msgs is not None or len(self.log) - self.gone < DEFAULT_MAX_MSGS

    def _evict(
        self,
        why: str,
        now: float | None,
        *,
        max_msgs: int | None = None,
        max_bytes: int | None = None,
        size: int = 0,
        older_than: float | None = None,
    ) -> None:
        """Drop the oldest messages until one more of `size` bytes fits the limits given (and none is stored
        at or before `older_than`); count and log those some group will now never handle."""
        log = self.log
        groups = self.groups.values()
        unsettled = 0
        head = self.head
        while log and (
            (max_msgs is not None and len(log) - self.gone >= max_msgs)
            or (max_bytes is not None and self.bytes + size > max_bytes)
            or (older_than is not None and log[0].stored_at <= older_than)
        ):
            entry = self._pop()
            if entry is _GONE:
                continue  # every group had settled it
            seq = entry.seq
            counted = not groups or any(g.will_not_handle(seq) for g in groups)
            if counted:
                unsettled += 1
            for group in groups:
                # A group's copy in the pool or on its way there runs all the same (counted or not): note
                # it, so its key waits for it (`will_redeliver`) and a hand-back unrun is counted once.
                if not counted or not group.will_not_handle(seq):
                    group.note_evicted_in_hand(seq, None if counted else why)
        if self.head == head:
            return
        while log and log[0] is _GONE:
            self._pop()  # settled by every group: nobody needs the slot once the message before it is gone
        if not log:
            self.log = _NO_LOG
        for group in groups:
            group.skip_to(self.head)
        if unsettled:
            self.evictions.record(self, unsettled, why, trio.current_time() if now is None else now)

    def can_make_room(self) -> str | None:
        """None if a subscriber may settle the oldest message; else why nobody can (for TopicFullError)."""
        if HANDLING_TOPIC.get() == self.name:
            return (
                f"the publisher is a handler of {self.name!r}: waiting for room could wait for itself "
                "(the message it handles must settle first). The attempt fails and is retried after its "
                "backoff; publish from outside the handler, or set TopicConfig(max_msgs=...) to evict the "
                "oldest instead"
            )
        first = self.first_seq
        idle = sorted(
            g.name or "default" for g in self.groups.values() if g.floor <= first and g.inbox is None
        )
        if idle:
            return (
                f"group(s) {', '.join(idle)} hold its oldest message(s) and have no subscriber to settle "
                "them: subscribe them again, or set TopicConfig(max_msgs=...) / max_age to evict the oldest"
            )
        return None

    def duplicate(self, message_id: str, now: float) -> bool:
        order = self.recent_order
        while order and order[0][0] <= now - DEDUP_WINDOW:
            _, old = order.popleft()
            if self.recent_ids.get(old, now) <= now - DEDUP_WINDOW:
                del self.recent_ids[old]
        return message_id in self.recent_ids

    def append(self, message: Message, now: float, remember: bool) -> None:
        """Store `message` (its first delivery's, attempt 1) as the next sequence; `remember` its id for
        deduplication."""
        if self.log is _NO_LOG:
            self.log = deque()
            self.head = self.next_seq
        self.log.append(_Entry(self.next_seq, message, now))
        self.next_seq += 1
        self.bytes += len(message.data)
        message_id = message.message_id
        if message_id and remember:
            self.recent_ids[message_id] = now
            if self.recent_order is None:
                self.recent_order = deque()
            self.recent_order.append((now, message_id))
        for group in self.groups.values():
            if group.task is not None:
                group.task.wake()  # group.wake() inlined: once per group and publish
        if self.changed.waiting:
            self.changed.tell()

    def trim(self, now: float | None = None) -> None:
        """Drop what every group has acked, and evict what is older than max_age (`now`: the clock's)."""
        groups = self.groups
        if groups:
            # Called on every ack that moves a floor: one group (the common case) needs no min().
            if len(groups) == 1:
                low = next(iter(groups.values())).floor
            else:
                low = min(g.floor for g in groups.values())
            log = self.log
            if log and self.head < low:
                while log and self.head < low:
                    self._pop()
                if not log:
                    self.log = _NO_LOG
        max_age = self.config.max_age
        if max_age is not None and self.log:
            now = trio.current_time() if now is None else now
            if self.log[0].stored_at <= now - max_age:
                self._evict(f"TopicConfig max_age={max_age}", now, older_than=now - max_age)
        if self.room is not _NOBODY_WAITS and self.room:  # on every ack: skip the lot's __bool__ call
            self.room.unpark_all()


class _Group:
    """One (topic, group): where its cursor is, what it has acked, what it must deliver again."""

    __slots__ = (
        "acked",
        "cursor",
        "deferred",
        "deferred_entries",
        "deferred_order",
        "deferred_scope",
        "deferred_wait",
        "evicted_in_hand",
        "floor",
        "generation",
        "handed_back",
        "inbox",
        "name",
        "outstanding",
        "redeliver",
        "subscribed",
        "task",
        "topic",
    )

    def __init__(self, topic: _Topic, name: str) -> None:
        self.topic = topic
        self.name = name
        # A new group starts at the oldest message kept: one some group has not settled (interest retention),
        # or, on a topic no group had subscribed to, the oldest its bound kept.
        self.cursor = topic.head
        self.floor = topic.head  # every seq below it is settled
        #: Acked above the floor (settled out of order) and not gone; None while there are none: an idle
        #: group is small. A topic's only group keeps none: its out-of-order acks are the _GONE markers.
        self.acked: set[int] | None = None
        self.outstanding: dict[int, int] = {}  # delivered, not settled: seq -> deliveries so far
        #: Evicted by a limit while delivered and unsettled, so not counted (the pool still handles them):
        #: seq -> (generation of the copy in the pool, why). If the pool hands that copy back unrun instead
        #: (its subscription stopped first), the log has nothing left to redeliver: it is counted then (why
        #: is None if it was counted already, for another group that never got it). None while there are
        #: none.
        self.evicted_in_hand: dict[int, tuple[int, str | None]] | None = None
        #: Outstanding, and handed back by the pool unrun (its subscription is stopping), not yet detached:
        #: no copy of them is handled any more, so evicting one now loses it. None while there are none.
        self.handed_back: set[int] | None = None
        #: Sequences to deliver again, the next one last (a list: an empty deque costs 760 bytes a group).
        self.redeliver: list[int] = []
        #: Handed back by the pool to be delivered again at a time: seq -> due (still outstanding).
        self.deferred: dict[int, float] = {}
        #: The same as (due, seq), a heap: the next due first without a pass over every deferred message (a
        #: flooded parked key defers thousands). May hold stale pairs (`deferred` decides). None until the
        #: group first defers anything: an idle group stays small.
        self.deferred_order: list[tuple[float, int]] | None = None
        #: The log entries of the deferred messages (and of those due, until taken): see _Redelivery. None
        #: while there are none.
        self.deferred_entries: dict[int, _Entry] | None = None
        self.deferred_scope: trio.CancelScope | None = None  # while a task waits to redeliver them
        #: The wait for the next one due, while the task waits: an earlier deferral moves its deadline.
        self.deferred_wait: trio.CancelScope | None = None
        self.generation = 0
        self.subscribed = False
        self.inbox: Inbox | None = None  # set while subscribed and not stopped
        self.task: _SubscriptionTask | None = None  # while subscribed

    def settled(self) -> bool:
        return not self.outstanding and not self.redeliver and self.cursor >= self.topic.next_seq

    def has_settled(self, seq: int) -> bool:
        """Whether this group is done with `seq`: below its floor, acked above it, or gone (for all)."""
        if seq < self.floor or (self.acked is not None and seq in self.acked):
            return True
        topic = self.topic
        return topic.head <= seq < topic.next_seq and topic.log[seq - topic.head] is _GONE

    def will_not_handle(self, seq: int) -> bool:
        """Whether evicting `seq` now loses it for this group: not delivered yet, or handed back undelivered.

        A delivered, unsettled message is in the pool and is still handled (its ack is then ignored), unless
        it was handed back (`detach`: the pool's copy is stale), which `outstanding` alone does not say (it
        keeps the delivery count for the next attempt number).
        """
        if seq >= self.cursor:
            return True
        if self.has_settled(seq):
            return False
        return (
            seq not in self.outstanding
            or not self.subscribed
            or (bool(self.redeliver) and seq in self.redeliver)
            or seq in self.deferred  # handed back by the pool, due later: not in the pool any more
            or (self.handed_back is not None and seq in self.handed_back)
        )

    def note_evicted_in_hand(self, seq: int, why: str | None) -> None:
        """A limit evicted `seq`, which this group holds delivered and unsettled (see `evicted_in_hand`)."""
        if seq in self.outstanding:
            if self.evicted_in_hand is None:
                self.evicted_in_hand = {}
            self.evicted_in_hand[seq] = (self.generation, why)

    def _handled_evicted(self, delivery: _Delivery) -> str | None:
        """Forget `delivery` if it is the copy of an evicted message noted in `evicted_in_hand`."""
        held = self.evicted_in_hand
        if held is None:
            return None
        noted = held.get(delivery.seq)
        if noted is None or noted[0] != delivery.generation:
            return None  # another copy (one handed back before it was delivered again) or not evicted
        del held[delivery.seq]
        if not held:
            self.evicted_in_hand = None
        return noted[1]

    def released(self, delivery: _Delivery) -> None:
        """The pool handed `delivery` back unrun: note it (see `handed_back`), or, if a limit evicted it
        while it was queued, it is lost: count it."""
        if delivery.generation == self.generation and delivery.seq in self.outstanding:
            if self.handed_back is None:
                self.handed_back = set()
            self.handed_back.add(delivery.seq)
            return
        why = self._handled_evicted(delivery)
        if why is None:
            return
        topic = self.topic
        topic.evictions.record(
            topic,
            1,
            f"{why} (evicted while queued; its subscription stopped before running it)",
            trio.current_time(),
        )

    def skip_to(self, first: int) -> None:
        """Forget messages evicted from the log (limits, max_age)."""
        if self.floor >= first:
            return  # nothing of this group's was below `first`
        self.cursor = max(self.cursor, first)
        self.floor = first
        if self.acked is not None:
            self.acked = {s for s in self.acked if s >= first} or None
        self._raise_floor()  # the new floor may be settled already: it must not wait for an ack never sent
        self.outstanding = {s: n for s, n in self.outstanding.items() if s >= first}
        self.redeliver = [s for s in self.redeliver if s >= first]
        self.deferred = {s: due for s, due in self.deferred.items() if s >= first}
        if self.deferred_entries is not None:
            self.deferred_entries = {s: e for s, e in self.deferred_entries.items() if s >= first} or None
        if self.handed_back is not None:
            self.handed_back = {s for s in self.handed_back if s >= first} or None

    def _raise_floor(self) -> None:
        """Move the floor past the sequences settled out of order right above it (acked, or gone)."""
        topic = self.topic
        acked = self.acked
        floor = self.floor
        start = floor - topic.head  # every floor is at or above the log's head (trim, skip_to)
        if start >= 0:
            for entry in islice(topic.log, start, None):
                if acked is not None and floor in acked:
                    acked.remove(floor)
                elif entry is not _GONE:
                    break
                floor += 1
        self.floor = floor
        if acked is not None and not acked:
            self.acked = None

    def take(self, limit: int) -> list[_Delivery]:
        out: list[_Delivery] = []
        topic = self.topic
        log = topic.log
        first = topic.head  # nothing is stored or trimmed while it takes
        end = topic.next_seq
        outstanding = self.outstanding
        redeliver = self.redeliver
        skipped = False
        while len(out) < limit and (redeliver or self.cursor < end):
            if redeliver:
                seq = redeliver.pop()
                entries = self.deferred_entries
                kept = entries.pop(seq, None) if entries else None
                entry = log[seq - first] if kept is None else kept
            else:
                seq = self.cursor
                self.cursor += 1
                kept = None
                entry = log[seq - first]
            if entry is _GONE:
                # Every group that existed when it was settled had settled it; this one came later (see
                # __init__): gone counts as settled for every group (has_settled, _raise_floor).
                skipped = True
                continue
            count = outstanding.get(seq, 0) + 1
            outstanding[seq] = count
            message = entry.message  # as stored: attempt 1
            if count != 1:
                message = make_message(
                    message.topic, message.data, message.key, message.headers, count, message.message_id
                )
            if kept is not None:
                out.append(_Redelivery(self, seq, self.generation, message, kept))
            elif entry.generation < 0:
                # Its first delivery to any group: the entry itself is the delivery (see _Entry).
                entry.group = self
                entry.generation = self.generation
                out.append(entry)
            else:
                out.append(_Delivery(self, seq, self.generation, message))
        if skipped:
            floor = self.floor
            self._raise_floor()
            if self.floor != floor:
                topic.trim()
        return out

    def has_backlog(self) -> bool:
        return bool(self.redeliver) or self.cursor < self.topic.next_seq

    def wake(self) -> None:
        """There may be something to deliver: wake the subscription task (the publisher runs nothing else)."""
        if self.task is not None:
            self.task.wake()

    def settle(self, delivery: _Delivery) -> None:
        seq = delivery.seq
        if delivery.generation != self.generation or seq not in self.outstanding:
            # Stale: handed back to the group by a detach, or evicted (then handled all the same).
            if self.evicted_in_hand is not None:
                self._handled_evicted(delivery)
            return
        del self.outstanding[seq]
        topic = self.topic
        if seq != self.floor:
            if len(topic.groups) == 1:
                # topic.forget inlined (it runs on most acks: settling is out of order across workers). The
                # only group has settled it, so its message goes, and the _GONE marker left in its slot is
                # this group's record of the ack: no set of acks above the floor (~70 bytes a sequence)
                # grows behind a parked key. It is in the log (evicted, the delivery would be stale).
                log = topic.log
                i = seq - topic.head
                entry = log[i]
                log[i] = _GONE
                topic.gone += 1
                topic.bytes -= len(entry.message.data)
                if topic.room is not _NOBODY_WAITS and topic.room:
                    topic.room.unpark_all()
            else:
                if self.acked is None:
                    self.acked = set()
                self.acked.add(seq)
                topic.forget(seq, self)
        else:
            floor = seq + 1
            if self.acked is None:
                log = topic.log
                i = floor - topic.head
                if i < len(log) and log[i] is _GONE:
                    # Markers above (a parked key just settled): one iterator walks them, where indexing
                    # each would walk the deque's blocks again (quadratic behind a long-parked key).
                    for entry in islice(log, i, None):
                        if entry is not _GONE:
                            break
                        floor += 1
                self.floor = floor
            else:
                self.floor = floor
                self._raise_floor()
            if len(topic.groups) > 1:
                topic.forget(seq, self)  # trim drops it only once every floor has passed it
                topic.trim()
            elif topic.config.max_age is not None:
                topic.trim()
            else:
                # topic.trim() inlined for a topic's only group without max_age (most acks move the floor
                # by one: two calls and the group lookup were ~60 bytecodes an ack): drop what is below it.
                log = topic.log
                while log and topic.head < floor:
                    entry = log.popleft()
                    topic.head += 1
                    if entry is _GONE:
                        topic.gone -= 1
                    else:
                        topic.bytes -= len(entry.message.data)
                if not log:
                    topic.log = _NO_LOG
                if topic.room is not _NOBODY_WAITS and topic.room:
                    topic.room.unpark_all()
        if self.topic.changed.waiting:
            self.topic.changed.tell()

    def defer(self, delivery: _Delivery, delay: float) -> None:
        """Deliver `delivery` again no sooner than `delay` s from now; the deferral is not an attempt."""
        seq = delivery.seq
        if delivery.generation != self.generation or seq not in self.outstanding or self.task is None:
            # Handed back to the group by a detach already (or about to be), or evicted while in the pool:
            # as a hand-back, it is then counted (see `released`).
            self.released(delivery)
            return
        self.outstanding[seq] -= 1  # take() adds the delivery back: the redelivery's attempt is the same
        if self.deferred_entries is None:
            self.deferred_entries = {}
        topic = self.topic
        # Outstanding, so in the log (neither evicted nor settled). A first deferral is of a message just
        # delivered, near the log's end: cheap to index.
        if isinstance(delivery, _Redelivery):
            self.deferred_entries[seq] = delivery.entry
        elif isinstance(delivery, _Entry):
            self.deferred_entries[seq] = delivery  # its own entry
        else:
            self.deferred_entries[seq] = topic.log[seq - topic.head]
        due = trio.current_time() + delay
        self.deferred[seq] = due
        if self.deferred_order is None:
            self.deferred_order = []
        heapq.heappush(self.deferred_order, (due, seq))
        wait = self.deferred_wait
        if wait is not None and due < wait.deadline:
            wait.deadline = due  # due before what the task waits for (a hand-back at once, say)
        if self.deferred_scope is None:
            self.deferred_scope = trio.CancelScope()
            self.task.nursery.start_soon(self._redeliver_deferred, self.deferred_scope)

    async def _redeliver_deferred(self, scope: trio.CancelScope) -> None:
        """Move deferred messages to the redelivery list, in log order, as they fall due."""
        with scope:
            while self.deferred:  # (skip_to replaces the dict: never held across a wait)
                order = self.deferred_order
                assert order is not None  # every deferred message has its pair in it
                at, seq = order[0]
                if self.deferred.get(seq) != at:
                    heapq.heappop(order)  # stale: no longer deferred (skip_to evicted it)
                    continue
                with trio.move_on_at(at) as self.deferred_wait:
                    await trio.sleep_forever()
                self.deferred_wait = None
                now = trio.current_time()
                deferred = self.deferred
                due: list[int] = []
                while order and order[0][0] <= now:
                    at, seq = heapq.heappop(order)
                    if deferred.get(seq) == at:
                        del deferred[seq]
                        due.append(seq)
                if not due:
                    continue
                if self.redeliver:
                    self.redeliver = sorted(set(self.redeliver).union(due), reverse=True)
                else:
                    due.sort(reverse=True)
                    self.redeliver = due
                self.wake()
        if self.deferred_scope is scope:
            self.deferred_scope = None

    def detach(self) -> None:
        """Hand every unsettled message back, in log order, for the group's next subscriber."""
        # Deferred ones are outstanding: they go back with the rest, at once.
        self.deferred.clear()
        self.deferred_order = None
        self.deferred_entries = None  # all go back through the log
        if self.deferred_scope is not None:
            self.deferred_scope.cancel()
            self.deferred_scope = None
            self.deferred_wait = None
        self.generation += 1
        self.redeliver = sorted(set(self.outstanding) | set(self.redeliver), reverse=True)
        self.handed_back = None  # redeliver has them now
        self.subscribed = False
        if self.topic.changed.waiting:
            self.topic.changed.tell()
        if self.topic.room:
            self.topic.room.unpark_all()  # publishers waiting for this group to make room must give up

    async def deliver(self) -> bool:
        """The subscription task's body: hand the group's messages to its inbox in batches until none is left.

        Returns whether it handed any. Taken messages stay outstanding until settled: if cancelled mid-batch,
        what was not queued is handed back by `detach`, in log order.
        """
        took = False
        while self.inbox is not None:
            batch = self.take(_BATCH)
            if not batch:
                break
            took = True
            await self.inbox.deliver(batch, checked=True)
        return took


class _Starts:
    """What publishes need to know of the subscription tasks to choose when to yield.

    `count`: how many tasks publishes have started (a publish that started one lets it run at once).
    `running`: how many tasks run now. `run`: publishes since a task started while none ran, or since the
    last running one exited. Since a task lingers one round after it found nothing, a publisher that keeps
    publishing keeps it running and the run growing; only a pause long enough for every task to exit starts
    a new run. A publish yields:

    - at every publish for the first _BURST publishes of a run: a burst goes one message per scheduling
      round, so no message waits for later ones to be published and handled first (latency);
    - every 2 publishes until _FLOOD: half the rounds per message, and a message waits for one later publish
      at most. A publisher that keeps publishing faster than one message per round can carry (a paced one
      that fell behind its schedule, as the latency benchmark's does on a busy machine) catches up there;
    - then one more every _RUN_PER_STEP publishes, up to _PUBLISHES_PER_YIELD after about 2,000: a flood,
      taken in ever bigger batches (throughput).

    Batches of 3 and more cost latency in proportion (each message waits for the rest of its batch to be
    published, delivered and handled in random order): when the batch grew by one every 64 publishes from
    the start, a paced publisher behind its schedule reached batches of 3 to 16, and their messages were
    the latency benchmark's slowest 1% (benchmarks/README.md, "latency on memory://").
    """

    __slots__ = ("count", "run", "running")

    def __init__(self) -> None:
        self.count = 0
        self.running = 0
        self.run = 0

    def every(self) -> int:
        """Publishes between two yields now."""
        run = self.run
        if run < _BURST:
            return 1
        if run < _FLOOD:
            return 2
        return min(2 + (run - _FLOOD) // _RUN_PER_STEP, _PUBLISHES_PER_YIELD)


class _SubscriptionTask:
    """A subscription's task: runs `body` while there is something to take; woken (started) by publishes.

    `body` returns whether it took anything. When it did, the task checks once more one scheduling round
    later before it exits: a publisher in the middle of a burst (which yields every publish, see _Starts)
    finds the task running, not gone, so the next message costs no task start, and a flood keeps it
    running (the signal publishes batch on).
    """

    # Slots, and nothing allocated while idle: one of these exists per subscription (flat cost).
    __slots__ = ("body", "done", "nursery", "scope", "starts", "stopped", "topic")

    def __init__(
        self, nursery: trio.Nursery, body: Callable[[], Awaitable[bool]], topic: str, starts: _Starts
    ) -> None:
        self.nursery = nursery
        self.body = body
        self.topic = topic
        self.starts = starts
        self.scope: trio.CancelScope | None = None  # while the task runs
        self.done: trio.Event | None = None  # while the task runs
        self.stopped = False

    def wake(self) -> None:
        """There may be something to take: start the task unless it runs (it re-checks before it exits)."""
        if self.scope is None and not self.stopped:
            self.scope = trio.CancelScope()
            self.done = trio.Event()
            self.nursery.start_soon(self._run, name=f"keyedbus-subscription-{self.topic}")
            starts = self.starts
            starts.count += 1
            if not starts.running:
                starts.run = 0
            starts.running += 1

    async def _run(self) -> None:
        assert self.scope is not None
        assert self.done is not None
        done = self.done
        try:
            with self.scope:
                while await self.body():
                    await trio.lowlevel.checkpoint()  # linger one round: see the class docstring
        finally:
            # No checkpoint between the body finding nothing left and this: no publish is missed.
            self.scope = None
            self.done = None
            done.set()
            starts = self.starts
            starts.running -= 1
            if not starts.running:
                starts.run = 0

    async def stop(self) -> None:
        """Stop for good: cancel the task if it runs and wait until it has exited."""
        self.stopped = True
        if self.scope is not None and self.done is not None:
            self.scope.cancel()
            await self.done.wait()
        await trio.lowlevel.checkpoint()


class _PersistentSubscription:
    __slots__ = ("group", "task")

    def __init__(self, group: _Group, task: _SubscriptionTask) -> None:
        self.group = group
        self.task = task

    async def stop(self) -> None:
        group = self.group
        group.inbox = None
        if group.topic.room:
            group.topic.room.unpark_all()  # publishers waiting for this group to make room must give up
        await self.task.stop()

    async def detach(self) -> None:
        self.group.task = None
        self.group.detach()
        await trio.lowlevel.checkpoint()


class _EphemeralSubscription:
    def __init__(
        self, topic: _Topic, inbox: Inbox, size: int, nursery: trio.Nursery, starts: _Starts
    ) -> None:
        self.topic = topic
        self.inbox = inbox
        self.active = True
        self.send, self.receive = trio.open_memory_channel[Message](size)
        self.in_hand = 0  # taken from the buffer by the subscription task, not yet queued
        self.task = _SubscriptionTask(nursery, self._deliver, topic.name, starts)

    def settled(self) -> bool:
        return not self.in_hand and self.receive.statistics().current_buffer_used == 0

    def offer(self, message: Message) -> None:
        """Store `message` in the buffer and wake the task (the publisher's side): full, it is dropped."""
        if not self.active:
            return
        try:
            self.send.send_nowait(message)
        except trio.WouldBlock:
            self.inbox.dropped(1, f"subscriber buffer of {self.topic.name!r} is full")
            return
        self.task.wake()

    async def _deliver(self) -> bool:
        """The subscription task's body: hand what waits in the buffer to the inbox, in batches.

        Returns whether it handed any.
        """
        changed = self.topic.changed
        took = False
        while True:
            batch: list[AtMostOnceDelivery] = []
            while len(batch) < _BATCH:
                try:
                    batch.append(AtMostOnceDelivery(self.receive.receive_nowait()))
                except trio.WouldBlock:
                    break
            if not batch:
                return took
            took = True
            self.in_hand = len(batch)
            try:
                await self.inbox.deliver(batch, checked=True)  # cancelled: it counts the rest as dropped
            finally:
                self.in_hand = 0
                if changed.waiting:
                    changed.tell()

    async def stop(self) -> None:
        self.active = False
        await self.task.stop()
        left = self.receive.statistics().current_buffer_used
        if left:
            self.inbox.dropped(left, "its subscription stopped before they were delivered")
            while True:
                try:
                    self.receive.receive_nowait()
                except trio.WouldBlock:
                    break

    async def detach(self) -> None:
        if self in self.topic.ephemeral_subs:
            self.topic.ephemeral_subs.remove(self)
        await trio.lowlevel.checkpoint()


class MemoryBackend:
    """The embedded broker; it lives and dies with its bus."""

    def __init__(
        self, nursery: trio.Nursery, *, buffer_size: int, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        self._nursery = nursery
        self._buffer_size = buffer_size
        self._max_payload = max_payload
        self._topics: dict[str, _Topic] = {}
        self._changed = _Changes()
        self._evictions = _Evictions()
        self._since_yield = 0
        self._starts = _Starts()
        # trio.current_time() without its two calls to get here: read on every publish.
        self._clock = trio.lowlevel.current_clock()

    @property
    def connected(self) -> bool:
        return True

    def _topic(self, name: str, config: TopicConfig) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic(name, config, self._changed, self._evictions)
        return topic

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        existing = self._topics.get(topic)
        if existing is not None:
            if existing.config.persistence != config.persistence:
                raise TopicConfigConflictError(
                    f"topic {topic!r} is already {existing.config.persistence}; its persistence cannot "
                    "change while the bus runs: configure it before first use"
                )
            existing.config = config
            existing.trim(trio.current_time())
        else:
            self._topic(topic, config)
        await trio.lowlevel.checkpoint()

    def _check_size(self, message: Message, size: int) -> None:
        """Raise MessageTooLargeError if `message` is over max_payload; `size`: its `wire_size`, or -1."""
        if size < 0:
            size = wire_size(message.data, message.headers, message.message_id)
        if size > self._max_payload:
            raise MessageTooLargeError(
                f"message for topic {message.topic!r} is {size} bytes (payload {len(message.data)} + headers "
                f"{size - len(message.data)}), over memory://'s max_payload of {self._max_payload} bytes, as "
                "NATS would refuse it: send big data elsewhere and publish a reference, or raise "
                "open_bus(max_payload=...) (and nats-server's max_payload) to match",
                size=size,
                limit=self._max_payload,
                topic=message.topic,
                message_id=message.message_id,
            )

    # publish and publish_keyed return _publish's coroutine rather than await it: one coroutine level less
    # a message (~1.5k instructions). Each builds the Message its subscribers receive first (attempt 1): the
    # log stores it (see _Entry), and an ephemeral topic hands it to every subscriber.

    def publish(self, out: Outgoing) -> Coroutine[Any, Any, None]:
        """Store or send one message; at DEFAULT_MAX_MSGS wait while a subscriber can make room.

        Raises PublishError for a message over max_payload and TopicFullError when the topic is full and no
        subscriber can settle its oldest message. If cancelled while waiting, nothing was stored.
        """
        return self._publish(self._message_of(out), out.config, out.size, out.dedup)

    @staticmethod
    def _message_of(out: Outgoing) -> Message:
        """The Message the subscribers of `out` receive (attempt 1)."""
        headers = out.headers
        return make_message(out.topic, out.data, key_of_headers(headers), headers, 1, out.message_id)

    def publish_keyed(
        self, topic: str, config: TopicConfig, data: bytes, key: str, message_id: str, size: int
    ) -> Coroutine[Any, Any, None]:
        """The common publish (see Backend.publish_keyed), as `publish` does it."""
        message = make_message(topic, data, key, {KEY_HEADER: key}, 1, message_id)
        return self._publish(message, config, size, False)

    async def _publish(self, message: Message, config: TopicConfig, size: int, dedup: bool) -> None:
        self._check_size(message, size)
        t = self._topics.get(message.topic) or self._topic(message.topic, config)
        if t.persistent and not t.make_room(len(message.data)):
            while not t.make_room(len(message.data)):
                self._full(t)
                if t.room is _NOBODY_WAITS:
                    t.room = trio.lowlevel.ParkingLot()
                await t.room.park()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled: nothing stored
        starts = self._starts
        started = starts.count
        self._publish_now(t, message, dedup)
        # A schedule point when this publish started an idle subscription's task (it runs at once: low
        # latency), else every few publishes (see _Starts): every publish in a short burst (a message does
        # not wait for later ones to be published and handled first: latency), every few in a flood (the
        # running tasks take what accumulated in one batch, not one task switch per message: throughput).
        starts.run += 1
        self._since_yield += 1
        if starts.count != started or starts.run < _BURST or self._since_yield >= starts.every():
            self._since_yield = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def publish_nowait(self, out: Outgoing) -> None:
        """Like publish, but raise trio.WouldBlock where publish would wait."""
        message = self._message_of(out)
        self._check_size(message, out.size)
        t = self._topics.get(out.topic) or self._topic(out.topic, out.config)
        if t.persistent and not t.make_room(len(out.data)):
            self._full(t)
            raise trio.WouldBlock
        self._publish_now(t, message, out.dedup)

    @staticmethod
    def _full(t: _Topic) -> None:
        """Raise TopicFullError unless a subscriber can make room in `t`."""
        why = t.can_make_room()
        if why is not None:
            raise TopicFullError(
                f"topic {t.name!r} is full ({t.stored} messages unsettled): {why}", topic=t.name
            )

    def evicted(self) -> int:
        """Messages evicted by a limit before every group had settled them (or with no group), in total."""
        return self._evictions.total

    def recovering(self) -> int:
        """Always 0: the embedded broker lives and dies with the bus, nobody can delete its topics."""
        return 0

    def _publish_now(self, t: _Topic, message: Message, dedup: bool) -> None:
        """Store `message` in `t` (persistent: unless `dedup` finds its id stored already) or hand it to
        every subscriber (ephemeral)."""
        now = self._clock.current_time()
        if not t.persistent:
            for sub in t.ephemeral_subs:
                sub.offer(message)
            if self._changed.waiting:
                self._changed.tell()
            return
        if t.config.max_age is not None:
            t.trim(now)
        # Only ids the publisher chose can repeat: remembering generated ones for the whole window would
        # hold every message id of the last 120 s in memory (millions under load).
        if dedup and message.message_id and t.duplicate(message.message_id, now):
            return
        t.append(message, now, dedup)

    async def subscribe(
        self, topic: str, config: TopicConfig, group: str, inbox: Inbox
    ) -> _PersistentSubscription | _EphemeralSubscription:
        # The checkpoint first: cancelled, it leaves nothing subscribed (no half subscription that would
        # deliver to a subscriber that never got its Subscription).
        await trio.lowlevel.checkpoint()
        t = self._topic(topic, config)
        if not t.persistent:
            sub = _EphemeralSubscription(t, inbox, self._buffer_size, self._nursery, self._starts)
            t.ephemeral_subs.append(sub)
            return sub
        g = t.groups.get(group)
        if g is None:
            g = t.groups[group] = _Group(t, group)
        g.subscribed = True
        g.inbox = inbox
        g.task = _SubscriptionTask(self._nursery, g.deliver, topic, self._starts)
        g.wake()  # what the group already holds (an earlier subscriber's hand-back, retained messages)
        return _PersistentSubscription(g, g.task)

    def partitions(self) -> dict[tuple[str, str | None], tuple[int, ...]]:
        # One process owns the embedded broker: nothing is shared, so there is nothing to report.
        return {}

    def lag(self) -> int:
        return sum(
            (t.next_seq - g.cursor) + len(g.redeliver)
            for t in self._topics.values()
            for g in t.groups.values()
            if g.subscribed
        )

    def settled(self) -> bool:
        for t in self._topics.values():
            if any(g.subscribed and not g.settled() for g in t.groups.values()):
                return False
            if not all(s.settled() for s in t.ephemeral_subs):
                return False
        return True

    async def aclose(self) -> None:
        """The broker dies with the bus: log the evictions not logged yet, nothing to close."""
        now = trio.current_time()
        for topic in self._topics.values():
            self._evictions.log(topic, now)
        await trio.lowlevel.checkpoint()

    async def wait_settled(self) -> None:
        changed = self._changed
        while not self.settled():
            changed.waiting += 1
            try:
                await changed.lot.park()
            finally:
                changed.waiting -= 1
        await trio.lowlevel.checkpoint()
