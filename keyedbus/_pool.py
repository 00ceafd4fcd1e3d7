"""The keyed worker pool every topic shares: worker queues, per-key lanes, workers that help each other.

The shape the design card draws, all under the bus's one nursery:

- **Worker queues are trio memory channels.** One bounded channel per worker (capacity `queue_size`); a
  keyed message goes to worker ``fnv1a_32(key) % workers`` (the same in every process), a keyless one to
  the next worker round-robin. Subscription tasks `send` `AggregateMessage` objects into them, waiting for
  room inside a cancel scope of `wait_timeout` (see `_consumer.py`).
- **Workers own per-key lanes.** A worker receives from its channel and appends each message to the lane
  of its (subscription, key): the key's messages in order, at most one of them running. A worker holds at
  most `queue_size` messages in its lanes (ready, running, or parked behind a failure); at that bound it
  stops receiving, so its channel fills and the subscription tasks' `wait_timeout` applies. A parked key's
  backlog therefore counts against the bound: nothing a slow or failing key collects grows without limit
  (at most ``2 * queue_size`` messages per worker: its channel plus its lanes).
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
from typing import Protocol

import attrs
import trio

from ._config import PoolConfig, RetryPolicy
from ._errors import HandlerTimeoutError
from ._messages import AggregateMessage
from ._statistics import Counters

__all__ = ["Consumer", "KeyedWorkerPool", "describe", "fnv1a_32"]

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
        """Run the user's handler once for `item` (raises what the handler raises)."""

    async def dead_letter(self, item: AggregateMessage, reason: str, failure: BaseException | None) -> None:
        """Publish `item` to the dead-letter topic with `reason` and log it (with `failure`'s traceback).

        Raises if the publish failed.
        """

    def started(self) -> None:
        """A handler of this consumer begins."""

    def finished(self) -> None:
        """A handler of this consumer ended."""

    def released(self, item: AggregateMessage) -> None:
        """`item` was handed back unhandled (its subscription is gone): count it if it cannot come back."""


@attrs.define(eq=False, slots=True)
class _Lane:
    """The messages of one (subscription, key), in order; at most one of them runs at a time."""

    consumer: Consumer
    #: None for a keyless message's lane of its own.
    key: str | None
    #: The worker that received its messages and counts them against its bound.
    worker: int
    items: deque[AggregateMessage] = attrs.Factory(deque)
    #: "ready" (waiting for an executor), "running", or "parked" (waiting for its retry)
    state: str = "ready"
    due: float = 0.0
    #: The worker running its head message, while "running".
    runner: int = -1


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
            if lane.state == "parked" and not lane.consumer.active:
                self._resume(lane)

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
        return sum(self.queue_depths()) + sum(self._held) - self._running

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
        self._held[index] += 1
        key = item.key
        if key is None:
            lane = _Lane(item.consumer, None, index)
        else:
            lane_key = (item.consumer, key)
            existing = self._lanes.get(lane_key)
            if existing is not None:
                existing.items.append(item)  # ready, running or parked: its turn comes
                return
            lane = self._lanes[lane_key] = _Lane(item.consumer, key, index)
        lane.items.append(item)
        self._ready.append(lane)

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
                await self._run(lane, index)
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

    async def _run(self, lane: _Lane, index: int) -> None:
        """Worker `index` runs the head message of a ready lane once, then requeues, drops or parks it."""
        lane.state = "running"
        lane.runner = index
        self._running += 1
        try:
            delay = await self._attempt(lane.items[0])
        finally:
            self._running -= 1
        if delay is None:
            lane.items.popleft()
            self._held[lane.worker] -= 1
            while lane.items and lane.items[0].delivery.withdrawn:  # the key's later ones go back with it
                self._release(lane.items.popleft())
                self._held[lane.worker] -= 1
            if self._waiting[lane.worker] == _LOT:
                self._lots[lane.worker].unpark()  # below its bound again: it may receive
            if lane.items:
                lane.state = "ready"
                self._ready.append(lane)  # behind the other ready keys: round robin
            elif lane.key is not None:
                del self._lanes[(lane.consumer, lane.key)]
            return
        # Park the key with its later messages; they still count against their worker's bound.
        lane.state = "parked"
        lane.due = trio.current_time() + delay
        self.counters.parked_keys += 1
        heapq.heappush(self._timers, (lane.due, next(self._tick), lane))
        if self._timer_changed:
            self._timer_changed.unpark_all()

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
        finally:
            self._task_exited()

    async def _attempt(self, item: AggregateMessage) -> float | None:
        """Run `item` once and settle it; return the seconds to wait before a retry, or None when done.

        The handler runs inside a `handler_timeout` cancel scope. Whatever it raises fails this attempt only,
        a stray trio.Cancelled included (one it caught in a scope of its own and raised outside it). Only the
        bus's own cancellation propagates, and KeyboardInterrupt / SystemExit, which hand the message back.
        """
        consumer: Consumer = item.consumer
        if not consumer.active or item.delivery.withdrawn:
            self._release(item)
            return None
        if item.dead_letter_reason is not None:
            return await self._dead_letter(item, item.dead_letter_reason, None)
        counters = self.counters
        counters.in_flight += 1
        consumer.started()
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
            consumer.finished()
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
