"""The keyed worker pool every topic shares: routing by key, per-key order, retries with parking, drain."""

from __future__ import annotations

import functools
import heapq
import itertools
import logging
from collections import deque
from typing import Protocol

import attrs
import trio

from ._config import PoolConfig, RetryPolicy
from ._messages import AggregateMessage

__all__ = ["Consumer", "Counters", "KeyedWorkerPool", "fnv1a_32"]

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

    async def dead_letter(self, item: AggregateMessage, reason: str) -> None:
        """Publish `item` to the dead-letter topic with `reason`; raises if the publish failed."""

    def started(self) -> None:
        """A handler of this consumer begins."""

    def finished(self) -> None:
        """A handler of this consumer ended."""


@attrs.define
class Counters:
    """Mutable totals behind `Bus.statistics()`."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    in_flight: int = 0
    waiting: int = 0
    parked_keys: int = 0


@attrs.define(eq=False)
class _Lane:
    """The messages of one (subscription, key), in order; at most one of them runs at a time."""

    consumer: Consumer
    key: str
    shard: int
    items: deque[AggregateMessage] = attrs.Factory(deque)
    #: "ready" (waiting for an executor), "running", or "parked" (waiting for its retry)
    state: str = "ready"
    due: float = 0.0


class KeyedWorkerPool:
    """Per-key order with `workers` handlers at most running at once, shared by every topic.

    Each (subscription, key) has a lane: its messages in order, one running at a time. `workers` executor
    tasks take whichever lane is ready, run its head message, and settle it themselves (ack, retry,
    dead-letter), so dispatching never waits for a result and keys never wait for each other: a slow key
    holds one executor, not the keys that hash near it. A failed message parks its lane (with the key's
    later messages) until its backoff is over. A key's shard, `fnv1a_32(key) % workers`, the same in every
    process, bounds how many messages wait to run (`queue_size` per shard; a parked key's backlog is not
    counted, so a poison key never blocks its shard). Keyless messages run in their own tasks, at most
    `workers` at once.
    """

    def __init__(self, config: PoolConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        self._lanes: dict[tuple[Consumer, str], _Lane] = {}
        self._ready: deque[_Lane] = deque()
        self._work = trio.lowlevel.ParkingLot()  # executors with nothing to run
        self._queued = [0] * config.workers  # per shard: messages waiting to run (not running, not parked)
        self._room = [trio.lowlevel.ParkingLot() for _ in range(config.workers)]
        self._timers: list[tuple[float, int, _Lane]] = []
        self._timer_changed = trio.lowlevel.ParkingLot()
        self._keyless_slots = trio.Semaphore(config.workers)
        self._nursery: trio.Nursery | None = None
        self._items = 0  # dispatched and not yet settled or released
        self._idle = trio.lowlevel.ParkingLot()
        self._closed = False
        self._tick = itertools.count()  # tie-breaker so the timer heap never compares lanes
        self.done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the executors until `close()` and every queued, running and parked message is finished.

        Cancelling it leaves whatever is unfinished unsettled (redelivered later on persistent topics).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer, name="keyedbus-retry-timer")
                for index in range(self.config.workers):
                    nursery.start_soon(self._executor, name=f"keyedbus-worker-{index}")
                task_status.started()
        finally:
            self.done.set()

    def close(self) -> None:
        """Take no more messages; the executors exit once every queued and parked message is done."""
        self._closed = True
        self._wake_all()

    @property
    def closed(self) -> bool:
        """True once `close()` was called: nothing more can be dispatched."""
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
        """Messages dispatched and not yet settled or released."""
        return self._items

    async def wait_idle(self) -> None:
        """Wait until no message is queued, running or parked."""
        while self._items:
            await self._idle.park()

    def queue_depths(self) -> tuple[int, ...]:
        """Messages waiting to run in each shard (not running, not parked), by shard index."""
        return tuple(self._queued)

    # -- dispatch -------------------------------------------------------------------------------------------

    def worker_for(self, key: str) -> int:
        """Index of the shard (queue) of every message with this key."""
        return fnv1a_32(key) % self.config.workers

    async def dispatch(self, item: AggregateMessage) -> None:
        """Queue `item` in its key's lane (or start it, keyless), waiting for room in its shard.

        Atomic with respect to cancellation: if cancelled, the item was not queued. Raises
        trio.ClosedResourceError after `close()`.
        """
        if item.key is None:
            if self._closed:
                raise trio.ClosedResourceError("the worker pool is closed")
            await self._keyless_slots.acquire()
            assert self._nursery is not None, "pool not running"
            self._items += 1
            self._nursery.start_soon(self._keyless, item)
            return
        while not self.dispatch_nowait(item):
            await self._room[fnv1a_32(item.key) % self.config.workers].park()

    def dispatch_nowait(self, item: AggregateMessage) -> bool:
        """Queue a keyed `item` if its shard has room; return False (not queued) if not.

        Raises trio.ClosedResourceError after `close()`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the worker pool is closed")
        key = item.key
        if key is None:
            return False
        lane = self._lanes.get((item.consumer, key))
        if lane is not None and lane.state == "parked":
            # Behind a failed message: waits with it, outside the shard's bound (isolation).
            lane.items.append(item)
            self.counters.waiting += 1
            self._items += 1
            return True
        shard = fnv1a_32(key) % self.config.workers
        if self._queued[shard] >= self.config.queue_size:
            return False
        self._queued[shard] += 1
        self._items += 1
        if lane is None:
            lane = self._lanes[(item.consumer, key)] = _Lane(item.consumer, key, shard)
            lane.items.append(item)
            self._ready.append(lane)
            if self._work:
                self._work.unpark()
        else:
            lane.items.append(item)  # ready or running: the executor comes back for it
        return True

    # -- running ------------------------------------------------------------------------------------------

    def _settled(self) -> None:
        self._items -= 1
        if not self._items:
            if self._idle:
                self._idle.unpark_all()
            if self._closed:
                self._wake_all()

    def _wake_all(self) -> None:
        if self._work:
            self._work.unpark_all()
        if self._timer_changed:
            self._timer_changed.unpark_all()

    def _unqueue(self, shard: int, count: int) -> None:
        self._queued[shard] -= count
        if self._room[shard]:
            self._room[shard].unpark_all()

    async def _executor(self) -> None:
        ready = self._ready
        since_yield = 0
        lane: _Lane | None = None
        while True:
            if not ready:
                if self._closed and not self._items:
                    return
                lane = None  # an idle executor keeps no lane (nor its subscription) alive
                await self._work.park()
                since_yield = 0
                continue
            lane = ready.popleft()
            lane.state = "running"
            self._unqueue(lane.shard, 1)
            # A handler need not checkpoint (a no-op does not): yield every few messages, so that an executor
            # with a long ready queue never starves the other tasks (every message would cost 10%).
            since_yield += 1
            if since_yield >= 16:
                since_yield = 0
                await trio.lowlevel.checkpoint()
            delay = await self._attempt(lane.items[0])
            if delay is None:
                lane.items.popleft()
                if lane.items:
                    lane.state = "ready"
                    ready.append(lane)  # behind the other ready keys: round robin
                else:
                    del self._lanes[(lane.consumer, lane.key)]
                continue
            # Park the key with its later messages; they stop counting against the shard's bound.
            lane.state = "parked"
            lane.due = trio.current_time() + delay
            later = len(lane.items) - 1
            self._unqueue(lane.shard, later)
            self.counters.waiting += later + 1
            self.counters.parked_keys += 1
            heapq.heappush(self._timers, (lane.due, next(self._tick), lane))
            if self._timer_changed:
                self._timer_changed.unpark_all()

    def _resume(self, lane: _Lane) -> None:
        """A parked lane's retry is due (or its subscription is gone): ready again, head first."""
        lane.state = "ready"
        count = len(lane.items)
        self._queued[lane.shard] += count
        self.counters.waiting -= count
        self.counters.parked_keys -= 1
        self._ready.appendleft(lane)  # its retry was due already: before keys that just arrived
        if self._work:
            self._work.unpark()

    async def _timer(self) -> None:
        """Move parked lanes back to ready when their retry is due."""
        timers = self._timers
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

    async def _keyless(self, item: AggregateMessage) -> None:
        """Run one keyless message to the end, releasing its slot while it waits between attempts."""
        try:
            delay = await self._attempt(item)
        finally:
            self._keyless_slots.release()
        while delay is not None:
            self.counters.waiting += 1
            try:
                await trio.sleep(delay)
            finally:
                self.counters.waiting -= 1
            async with self._keyless_slots:
                delay = await self._attempt(item)

    async def _attempt(self, item: AggregateMessage) -> float | None:
        """Run `item` once and settle it; return the seconds to wait before a retry, or None when done."""
        consumer: Consumer = item.consumer
        if not consumer.active:
            self._release(item)
            return None
        if item.dead_letter_reason is not None:
            return await self._dead_letter(item, item.dead_letter_reason)
        counters = self.counters
        counters.in_flight += 1
        consumer.started()
        try:
            failure = await self._call(consumer, item)
        finally:
            counters.in_flight -= 1
            consumer.finished()
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
            return await self._dead_letter(item, failure)
        counters.retried += 1
        delay = policy.backoff(item.attempt)
        logger.warning(
            "handler failed on %s (key %s, attempt %d of %d), retrying in %.3f s: %s",
            consumer.topic,
            item.key,
            item.attempt,
            policy.max_attempts,
            delay,
            failure,
            extra={
                "topic": consumer.topic,
                "key": item.key,
                "attempt": item.attempt,
                "message_id": item.delivery.message.message_id,
            },
        )
        item.attempt += 1
        return delay

    async def _call(self, consumer: Consumer, item: AggregateMessage) -> str | None:
        """Run the handler once; return None on success or the failure as 'Type: message'."""
        timeout = self.config.handler_timeout
        try:
            if timeout is None:
                await consumer.handle(item)
                return None
            with trio.move_on_after(timeout) as scope:
                await consumer.handle(item)
            if scope.cancelled_caught:
                return (
                    f"HandlerTimeoutError: handler ran longer than {timeout} s "
                    "(PoolConfig.handler_timeout) and was cancelled"
                )
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _dead_letter(self, item: AggregateMessage, reason: str) -> float | None:
        consumer: Consumer = item.consumer
        try:
            await consumer.dead_letter(item, reason)
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
        self._settled()
