"""Calling asyncio code (nats-py) from trio, in a way that a cancellation always ends.

trio-asyncio's `aio_as_trio` waits, when cancelled, until the asyncio side confirms the cancellation. If the
asyncio loop's own task is gone (a KeyboardInterrupt raised while it ran nats-py code kills it), nothing
confirms anything, and every task waiting on asyncio waits forever: the bus's nursery, and the process, hang.
`aio` gives up at once when cancelled (asking asyncio to cancel, without waiting for it), and refuses to start
anything on a loop that no longer runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import outcome
import trio
import trio_asyncio

from .._errors import ConnectionFailedError

__all__ = ["aio", "loop_running", "open_loop"]

P = ParamSpec("P")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_loop() -> AsyncIterator[Any]:
    """The trio-asyncio loop every nats-py call runs on; open it outside the bus's nursery.

    An error asyncio reports from a callback (`call_exception_handler`) is logged, as plain asyncio does,
    not raised: trio-asyncio's default raises it into the loop's nursery, which ended the whole bus. nats-py
    relies on asyncio's behaviour, e.g. when a server goes down, a closed socket's pending write callback
    reports EBADF and nats-py reconnects on its own. keyedbus's own calls get their errors through `aio`.

    The loop's task is protected from KeyboardInterrupt, as trio protects its own machinery: trio then
    raises a Ctrl+C in the main task (the user's code, at its next checkpoint), which cancels the bus in
    order. Left unprotected, a Ctrl+C raised while the loop ran nats-py code killed the loop's task, and with
    it every asyncio operation the bus and trio-asyncio's own teardown were waiting for: the process hung.
    This reads one private name of trio-asyncio (`_main_loop`, the loop's task function, in 0.15 and later);
    if a later release renames it, the protection is skipped and `aio` still keeps the bus from hanging.
    """
    main_loop = getattr(trio_asyncio.TrioEventLoop, "_main_loop", None)
    if main_loop is not None and hasattr(main_loop, "__code__"):
        trio.lowlevel.enable_ki_protection(main_loop)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(_log_only)
        yield loop


def _log_only(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log an error asyncio reports, as plain asyncio's loop does, and go on."""
    asyncio.BaseEventLoop.default_exception_handler(loop, context)  # type: ignore[arg-type]


def loop_running() -> bool:
    """Whether the asyncio loop nats-py runs on is still running (False once it was interrupted)."""
    loop = trio_asyncio.current_loop.get()
    return loop is not None and bool(loop.is_running())


def aio(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`await aio(fn)(*args)` runs `fn(*args)` on the asyncio loop and returns its result to trio.

    Cancelled, it returns at once: the asyncio call is asked to cancel and its outcome is dropped (a message
    it took is then left for a hand-back or a redelivery, never counted as handled). Raises
    ConnectionFailedError if the asyncio loop is no longer running.
    """

    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        loop = trio_asyncio.current_loop.get()
        if loop is None or not loop.is_running():
            raise ConnectionFailedError(
                "the asyncio loop keyedbus runs nats-py on is gone (the process was interrupted): the NATS "
                "connection can no longer be used"
            )

        async def run() -> T:  # the call itself, its synchronous start included, runs on asyncio's side
            return await fn(*args, **kwargs)

        coro = run()
        try:
            future: asyncio.Future[T] = asyncio.ensure_future(coro, loop=loop)
        except BaseException:
            coro.close()
            raise
        task = trio.lowlevel.current_task()
        abandoned = False

        def done(finished: asyncio.Future[T]) -> None:
            if not abandoned:
                trio.lowlevel.reschedule(task, outcome.capture(finished.result))

        def abort(_: Any) -> trio.lowlevel.Abort:
            nonlocal abandoned
            if future.done() and loop.is_running():
                return trio.lowlevel.Abort.FAILED  # `done` is already scheduled: take the result
            abandoned = True
            future.cancel()
            return trio.lowlevel.Abort.SUCCEEDED

        future.add_done_callback(done)
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    return call
