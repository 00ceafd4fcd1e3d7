"""The keyed worker pool every topic shares: routing by key, per-key order, retries with parking, drain."""

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
class _Parked:
    """A key waiting for its next retry, with the messages of that key that arrived meanwhile (in order)."""

    items: deque[AggregateMessage]
    due: float


class KeyedWorkerPool:
    """One worker task per slot, each with a bounded queue; a key always goes to the same worker.

    A worker runs one handler at a time and settles the message itself (ack, retry, dead-letter), so
    dispatching never waits for a result. A failing message parks its key (with the key's later messages)
    until its backoff is over, and the worker moves on to other keys. Keyless messages run in their own
    tasks, at most `workers` at once.
    """

    def __init__(self, config: PoolConfig, counters: Counters) -> None:
        self.config = config
        self.counters = counters
        # None in a queue only wakes its worker (see release_parked).
        size = config.queue_size
        pairs = [trio.open_memory_channel[AggregateMessage | None](size) for _ in range(config.workers)]
        self._send = [s for s, _ in pairs]
        self._receive = [r for _, r in pairs]
        self._keyless_slots = trio.Semaphore(config.workers)
        self._nursery: trio.Nursery | None = None
        self._items = 0  # dispatched and not yet settled or released
        self._idle = trio.lowlevel.ParkingLot()
        self._closed = False
        self._tick = itertools.count()  # tie-breaker so the timer heap never compares keys
        # A worker waiting for its queue can be woken to hand back the parked keys of a gone subscription.
        self._waits: list[trio.CancelScope | None] = [None] * config.workers
        self._receiving = [False] * config.workers
        self._sweep = [False] * config.workers
        self.done = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until `close()` and every queued, running and parked message is finished.

        Cancelling it leaves whatever is unfinished unsettled (redelivered later on persistent topics).
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for index, receive in enumerate(self._receive):
                    nursery.start_soon(self._worker, index, receive, name=f"keyedbus-worker-{index}")
                task_status.started()
        finally:
            self.done.set()

    def close(self) -> None:
        """Take no more messages; workers exit when their queue and parked keys are done."""
        self._closed = True
        for send in self._send:
            send.close()

    @property
    def closed(self) -> bool:
        """True once `close()` was called: nothing more can be dispatched."""
        return self._closed

    def release_parked(self) -> None:
        """Hand back at once the parked messages of subscriptions that are no longer active.

        Their retry timers are not waited for: a gone subscription's messages go back to the broker.
        """
        for index, scope in enumerate(self._waits):
            self._sweep[index] = True
            if scope is not None:
                scope.cancel()
            elif self._receiving[index]:
                # Its queue is empty (it waits on it), so there is room for the wake-up.
                with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                    self._send[index].send_nowait(None)

    @property
    def unfinished(self) -> int:
        """Messages dispatched and not yet settled or released."""
        return self._items

    async def wait_idle(self) -> None:
        """Wait until no message is queued, running or parked."""
        while self._items:
            await self._idle.park()

    def queue_depths(self) -> tuple[int, ...]:
        """Messages waiting in each worker's queue, by worker index."""
        return tuple(s.statistics().current_buffer_used for s in self._send)

    # -- dispatch -------------------------------------------------------------------------------------------

    def worker_for(self, key: str) -> int:
        """Index of the worker that runs every message with this key."""
        return fnv1a_32(key) % self.config.workers

    async def dispatch(self, item: AggregateMessage) -> None:
        """Queue `item` on its key's worker (or start it, keyless), waiting for room.

        Atomic with respect to cancellation: if cancelled, the item was not queued. Raises
        trio.ClosedResourceError after `close()`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the worker pool is closed")
        if item.key is None:
            await self._keyless_slots.acquire()
            assert self._nursery is not None, "pool not running"
            self._items += 1
            self._nursery.start_soon(self._keyless, item)
            return
        if not self.dispatch_nowait(item):
            send = self._send[fnv1a_32(item.key) % self.config.workers]
            # Counted before the send: once sent, the worker may settle it before this task runs again.
            self._items += 1
            try:
                await send.send(item)
            except BaseException:
                self._settled()
                raise

    def dispatch_nowait(self, item: AggregateMessage) -> bool:
        """Queue a keyed `item` if its worker's queue has room; return False (not queued) if not.

        Raises trio.ClosedResourceError after `close()`.
        """
        if self._closed:
            raise trio.ClosedResourceError("the worker pool is closed")
        if item.key is None:
            return False
        self._items += 1
        try:
            self._send[fnv1a_32(item.key) % self.config.workers].send_nowait(item)
        except trio.WouldBlock:
            self._settled()
            return False
        return True

    # -- running ------------------------------------------------------------------------------------------

    def _settled(self) -> None:
        self._items -= 1
        if not self._items and self._idle:
            self._idle.unpark_all()

    async def _worker(self, index: int, receive: trio.MemoryReceiveChannel[AggregateMessage | None]) -> None:
        parked: dict[tuple[Consumer, str], _Parked] = {}
        timers: list[tuple[float, int, tuple[Consumer, str]]] = []
        closed = False
        with receive:
            while True:
                if self._sweep[index]:
                    self._sweep[index] = False
                    for pkey in [p for p in parked if not p[0].active]:
                        await self._resume(parked, timers, pkey)
                    # Forget the handed-back keys' timers, or a closing worker would wait for them.
                    timers[:] = [t for t in timers if t[2] in parked]
                    heapq.heapify(timers)
                while timers and timers[0][0] <= trio.current_time():
                    _, _, pkey = heapq.heappop(timers)
                    if pkey in parked:  # not already handed back by a sweep
                        await self._resume(parked, timers, pkey)
                if closed:
                    if not timers:
                        return
                    with trio.move_on_at(timers[0][0]) as wait:
                        self._waits[index] = wait
                        try:
                            await trio.sleep_forever()
                        finally:
                            self._waits[index] = None
                    continue
                item: AggregateMessage | None = None
                # WouldBlock and EndOfChannel are both handled by the wait below.
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    item = receive.receive_nowait()
                if item is not None:
                    await trio.lowlevel.checkpoint()  # a busy worker still lets others run
                    await self._take(item, parked, timers)
                    continue
                # Only the receive sits inside the deadline scope: a handler is never cut short by it. With no
                # timer (the common case) there is no scope at all, one per message adds up; a wake-up then
                # comes as None in the queue (release_parked).
                deadline = trio.move_on_at(timers[0][0]) if timers else None
                with deadline if deadline is not None else contextlib.nullcontext():
                    self._waits[index] = deadline
                    self._receiving[index] = deadline is None
                    try:
                        item = await receive.receive()
                    except trio.EndOfChannel:
                        closed = True
                    finally:
                        self._waits[index] = None
                        self._receiving[index] = False
                if item is not None:
                    await self._take(item, parked, timers)

    async def _take(
        self,
        item: AggregateMessage,
        parked: dict[tuple[Consumer, str], _Parked],
        timers: list[tuple[float, int, tuple[Consumer, str]]],
    ) -> None:
        """Run a newly queued item, or park it behind its key's failed message."""
        assert item.key is not None, "keyless items never reach a worker"
        pkey = (item.consumer, item.key)
        waiting = parked.get(pkey)
        if waiting is not None:
            waiting.items.append(item)
            self.counters.waiting += 1
            return
        delay = await self._attempt(item)
        if delay is not None:
            due = trio.current_time() + delay
            parked[pkey] = _Parked(deque([item]), due)
            self.counters.waiting += 1
            self.counters.parked_keys += 1
            heapq.heappush(timers, (due, next(self._tick), pkey))

    async def _resume(
        self,
        parked: dict[tuple[Consumer, str], _Parked],
        timers: list[tuple[float, int, tuple[Consumer, str]]],
        pkey: tuple[Consumer, str],
    ) -> None:
        """Retry a parked key's head message, then run its later messages in order until one fails again."""
        waiting = parked[pkey]
        while waiting.items:
            item = waiting.items[0]
            delay = await self._attempt(item)
            if delay is not None:
                waiting.due = trio.current_time() + delay
                heapq.heappush(timers, (waiting.due, next(self._tick), pkey))
                return
            waiting.items.popleft()
            self.counters.waiting -= 1
        del parked[pkey]
        self.counters.parked_keys -= 1

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
                extra={"topic": consumer.topic, "key": item.key, "attempt": item.attempt},
            )
            return delay
        item.delivery.term()
        self.counters.dead_lettered += 1
        self._settled()
        return None

    def _release(self, item: AggregateMessage) -> None:
        item.delivery.release()
        self._settled()
