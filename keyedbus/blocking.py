"""keyedbus for code that is not async: scripts, notebooks (where an asyncio loop already runs), WSGI apps.

`with keyedbus.blocking.open_bus(url) as bus:` runs a real `keyedbus.open_bus` on an anyio blocking portal: a
thread of its own running trio. The bus's methods are the same, without `await`, and raise the same errors.
Async handlers run in the portal's trio thread, like in an async program; plain (sync) functions run in worker
threads (`trio.to_thread`), at most `sync_handler_threads` at once, one message of a key at a time and in
order, as the pool guarantees for every handler. Leaving the block drains the bus as `open_bus` does; an
exception in the block, KeyboardInterrupt included, cancels it (unfinished messages stay unacked) and
propagates as itself once the portal's thread has stopped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar, final

import anyio.from_thread
import attrs
import outcome
import trio

from ._bus import Bus
from ._bus import open_bus as _open_async_bus
from ._config import RetryPolicy, TopicConfig
from ._consumer import KeyFunction
from ._errors import BusClosedError, InvalidConfigError
from ._messages import Envelope, Message
from ._statistics import BusStatistics
from ._subscription import Subscription

__all__ = ["BlockingBus", "BlockingSubscription", "open_bus"]

_CLOSED = "this blocking bus is closed: use it inside its 'with keyedbus.blocking.open_bus()' block"

M = TypeVar("M", Message, Envelope)
R = TypeVar("R")
#: An async handler, or a plain function run in a worker thread.
AnyHandler = Callable[[M], "Awaitable[None] | None"]


def _is_async(handler: object) -> bool:
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - the method, not callable()
    return inspect.iscoroutinefunction(handler) or (
        not inspect.isroutine(handler) and inspect.iscoroutinefunction(call)
    )


def _in_threads(handler: Any, limiter: trio.CapacityLimiter) -> Any:
    """Wrap a sync handler so the pool awaits it while it runs in a worker thread."""
    if not callable(handler) or _is_async(handler):
        return handler  # async handlers run in the portal; keyedbus itself refuses non-callables

    async def run_in_thread(message: Any) -> None:
        # abandon_on_cancel=False: a cancelled wait (handler_timeout, shutdown) still waits for the thread,
        # so the key's next message never starts while this one is running.
        result = await trio.to_thread.run_sync(handler, message, limiter=limiter, abandon_on_cancel=False)
        if inspect.isawaitable(result):  # a lambda around an async function
            await result

    run_in_thread.__qualname__ = getattr(handler, "__qualname__", repr(handler))
    return run_in_thread


@attrs.frozen
class _Opened:
    bus: Bus
    limiter: trio.CapacityLimiter
    requests: trio.MemorySendChannel[_Request]
    #: The context `open_bus` set up (the NATS backend finds its trio-asyncio loop in a context variable).
    context: contextvars.Context

    async def run(self, function: Callable[[], Awaitable[R]]) -> R:
        """Run `function()` in a task that has the bus's context, and return its outcome."""
        request = _Request(function, self.context)
        try:
            await self.requests.send(request)
        except trio.ClosedResourceError:
            raise BusClosedError(_CLOSED) from None
        await request.done.wait()
        if request.result is None:  # cancelled: the bus closed with the call still waiting
            raise BusClosedError(_CLOSED)
        return request.result.unwrap()  # type: ignore[no-any-return]


@attrs.define
class _Request:
    function: Callable[[], Awaitable[Any]]
    context: contextvars.Context
    result: outcome.Outcome[Any] | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        try:
            value = await self.function()
        except Exception as exc:  # the caller's to see; Cancelled and KeyboardInterrupt propagate here
            self.result = outcome.Error(exc)
        else:
            self.result = outcome.Value(value)
        finally:
            self.done.set()


async def _serve(requests: trio.MemoryReceiveChannel[_Request]) -> None:
    """Run each request in a task of its own, in the bus's context, until the channel is closed.

    Tasks the portal starts lack what `open_bus` set up in its own context (the NATS backend's trio-asyncio
    loop), so bus calls start here: `start_soon` copies the current context, which `Context.run` sets.
    This task outlives the bus's drain, so sync handlers may still publish while it drains.
    """
    async with trio.open_nursery() as nursery, requests:
        async for request in requests:
            request.context.run(nursery.start_soon, request.run)


@attrs.define
class _Portal:
    """The portal a BlockingBus and its subscriptions call through; `open_bus` closes it on exit."""

    portal: anyio.from_thread.BlockingPortal
    opened: _Opened
    closed: bool = False

    def call(self, function: Callable[[], Awaitable[R]]) -> R:
        """Run `function()` in the bus's context and return its result (or raise its error) here."""
        self._check_open()
        return self.portal.call(self.opened.run, function)

    def call_sync(self, function: Callable[[], R]) -> R:
        self._check_open()
        return self.portal.call(function)

    def _check_open(self) -> None:
        if self.closed:
            raise BusClosedError(_CLOSED)


@final
class BlockingSubscription:
    """A live subscription of a blocking bus; `unsubscribe()` works as `Subscription.unsubscribe`."""

    def __init__(self, portal: _Portal, subscription: Subscription) -> None:
        self._portal = portal
        self._subscription = subscription

    @property
    def topic(self) -> str:
        """The subscribed topic."""
        return self._subscription.topic

    @property
    def group(self) -> str | None:
        """The group, or None for the default group."""
        return self._subscription.group

    def __repr__(self) -> str:
        return f"<keyedbus.blocking.BlockingSubscription topic={self.topic!r} group={self.group!r}>"

    def unsubscribe(self) -> None:
        """Stop delivery, wait for this subscription's running handlers, hand the rest back to its group.

        Returns at once if the bus is already closed.
        """
        if self._portal.closed:
            return
        self._portal.call(self._subscription.unsubscribe)


@final
class BlockingBus:
    """An open bus for sync code; only `keyedbus.blocking.open_bus` creates one."""

    def __init__(self, portal: _Portal, opened: _Opened) -> None:
        self._portal = portal
        self._bus = opened.bus
        self._limiter = opened.limiter

    def __repr__(self) -> str:
        return f"<keyedbus.blocking.BlockingBus {self._bus!r}>"

    @property
    def closed(self) -> bool:
        """Whether the `with` block that opened this bus has ended."""
        return self._portal.closed

    def configure_topic(self, topic: str, config: TopicConfig) -> None:
        """Set how `topic` is stored, as `Bus.configure_topic`."""
        self._portal.call(functools.partial(self._bus.configure_topic, topic, config))

    def publish(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish raw bytes, as `Bus.publish`: returns once the broker has stored (or sent) the message."""
        self._portal.call(
            functools.partial(self._bus.publish, topic, data, key=key, headers=headers, message_id=message_id)
        )

    def publish_envelope(
        self, topic: str, envelope: Envelope, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish an Envelope, as `Bus.publish_envelope`."""
        self._portal.call(functools.partial(self._bus.publish_envelope, topic, envelope, headers=headers))

    def subscribe(
        self,
        topic: str,
        handler: AnyHandler[Message],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = None,
        key: KeyFunction | None = None,
    ) -> BlockingSubscription:
        """Deliver every message of `topic` to `handler`, as `Bus.subscribe` (same options and errors).

        `handler` is an async function (run in the portal's trio thread) or a plain function (run in a
        worker thread). Either way a key's messages run one at a time, in publish order. Returns once the
        subscription is live.
        """
        subscription = self._portal.call(
            functools.partial(
                self._bus.subscribe,
                topic,
                _in_threads(handler, self._limiter),
                group=group,
                retry=retry,
                dead_letter=dead_letter,
                key=key,
            )
        )
        return BlockingSubscription(self._portal, subscription)

    def subscribe_envelope(
        self,
        topic: str,
        handler: AnyHandler[Envelope],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = None,
        key: KeyFunction | None = None,
    ) -> BlockingSubscription:
        """Like `subscribe`, but the handler receives a decoded Envelope, as `Bus.subscribe_envelope`."""
        subscription = self._portal.call(
            functools.partial(
                self._bus.subscribe_envelope,
                topic,
                _in_threads(handler, self._limiter),
                group=group,
                retry=retry,
                dead_letter=dead_letter,
                key=key,
            )
        )
        return BlockingSubscription(self._portal, subscription)

    def statistics(self) -> BusStatistics:
        """A frozen snapshot of the pool and the counters, as `Bus.statistics`."""
        return self._portal.call_sync(self._bus.statistics)


@asynccontextmanager
async def _open(
    url: str, threads: int, options: dict[str, Any], requests: trio.MemorySendChannel[_Request]
) -> AsyncIterator[_Opened]:
    async with _open_async_bus(url, **options) as bus:
        yield _Opened(bus, trio.CapacityLimiter(threads), requests, contextvars.copy_context())


async def _channel() -> tuple[trio.MemorySendChannel[_Request], trio.MemoryReceiveChannel[_Request]]:
    return trio.open_memory_channel[_Request](0)


@contextmanager
def open_bus(
    url: str = "memory://", *, sync_handler_threads: int = 16, **options: Any
) -> Iterator[BlockingBus]:
    """Open a bus for sync code and yield a BlockingBus; `options` are those of `keyedbus.open_bus`.

    Starts a thread running trio (an anyio blocking portal), opens the bus in it and returns once it is
    connected. Leaving the block drains the bus (as `keyedbus.open_bus`) and stops the thread. An exception
    raised in the block, KeyboardInterrupt included, cancels the bus instead (unfinished messages stay
    unacked, redelivered on persistent topics) and propagates unchanged; sync handlers still running are
    waited for, since a thread cannot be interrupted. Errors are those of the async API.
    """
    if isinstance(sync_handler_threads, bool) or not isinstance(sync_handler_threads, int):
        raise InvalidConfigError(f"sync_handler_threads must be an int >= 1, got {sync_handler_threads!r}")
    if sync_handler_threads < 1:
        raise InvalidConfigError(f"sync_handler_threads must be an int >= 1, got {sync_handler_threads!r}")
    with anyio.from_thread.start_blocking_portal(backend="trio") as portal:
        send, receive = portal.call(_channel)
        served = portal.start_task_soon(_serve, receive)
        calls: _Portal | None = None
        try:
            with portal.wrap_async_context_manager(_open(url, sync_handler_threads, options, send)) as opened:
                calls = _Portal(portal, opened)
                yield BlockingBus(calls, opened)
        finally:
            if calls is not None:
                calls.closed = True
            portal.call(send.aclose)
            # The bus has closed (drained or cancelled): a call still running can only wait for a broker
            # that is gone. Cancelling it makes its caller raise BusClosedError instead of hanging.
            served.cancel()
            with contextlib.suppress(concurrent.futures.CancelledError):
                served.result()
