"""One subscription as the backend and the pool see it: the subscription task's side and the handler's.

A backend runs one subscription task per subscription (every backend, memory:// included). That task takes
messages from the broker and calls `deliver`, which builds each `AggregateMessage` (its key, the handler's
decoded argument, or the reason it must be dead-lettered) and **sends it into its worker's memory channel**,
waiting for room inside a cancel scope of `wait_timeout`. The publisher's task never runs any of this.
The pool's workers later call `handle` (the user's handler) and `dead_letter`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import attrs
import trio

from ._backends._base import Delivery
from ._backends.memory import HANDLING_TOPIC
from ._config import RetryPolicy
from ._errors import InvalidHandlerError, MessageTooLargeError
from ._messages import (
    AggregateMessage,
    Envelope,
    Message,
    dead_letter_headers,
    header_problem,
    key_problem,
    new_message_id,
    shrink_dead_letter,
    wire_key_problem,
)
from ._pool import KeyedWorkerPool
from ._statistics import Counters

__all__ = [
    "Handler",
    "KeyFunction",
    "check_handler",
]

logger = logging.getLogger("keyedbus")

T = TypeVar("T", Message, Envelope)
Handler = Callable[[T], Awaitable[None]]
KeyFunction = Callable[[Message], "str | None"]


def _name(handler: object) -> str:
    return str(getattr(handler, "__qualname__", None) or repr(handler))


def check_handler(handler: object) -> bool:
    """Refuse what cannot be a handler; return True if each call's result must be checked for an awaitable.

    Accepted: `async def` functions, objects with an `async def __call__`, and any other callable that may
    return an awaitable (a lambda around an async function, a partial...). Refused at once, where it is
    certain: non-callables, and plain `def` functions and methods (and builtins), which return no awaitable.
    """
    if not callable(handler):
        raise InvalidHandlerError(
            f"handler must be an async function taking one message, got {type(handler).__name__} {handler!r}"
        )
    if inspect.iscoroutinefunction(handler):
        return False
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - we need the method, not callable()
    if not inspect.isroutine(handler) and inspect.iscoroutinefunction(call):
        return False
    plain_def = (inspect.isfunction(handler) or inspect.ismethod(handler)) and handler.__name__ != "<lambda>"
    if plain_def or inspect.isbuiltin(handler):
        raise InvalidHandlerError(
            f"handler {_name(handler)} is not async: define it with 'async def' "
            "(keyedbus awaits every handler)"
        )
    return True


class Consumer(Generic[T]):
    """One subscription: the Inbox its backend's subscription task feeds, and the pool's Consumer."""

    # One exists per subscription: slots keep a thousand idle subscriptions small (flat cost).
    __slots__ = (
        "_check_result",
        "_counters",
        "_idle",
        "_pool",
        "_publish",
        "_stalled",
        "active",
        "dead_letter_topic",
        "envelope",
        "ephemeral",
        "group",
        "handler",
        "key_fn",
        "retry",
        "running",
        "topic",
    )

    def __init__(
        self,
        pool: KeyedWorkerPool,
        counters: Counters,
        publish: Callable[[str, bytes, dict[str, str], str], Awaitable[None]],
        topic: str,
        group: str,
        handler: Handler[T],
        *,
        retry: RetryPolicy,
        dead_letter: str,
        key_fn: KeyFunction | None,
        envelope: bool,
        ephemeral: bool,
        check_result: bool,
    ) -> None:
        self._pool = pool
        self._counters = counters
        self._publish = publish
        self.topic = topic
        self.group = group
        self.handler: Handler[T] = handler
        self.retry = retry
        self.dead_letter_topic = dead_letter
        self.key_fn = key_fn
        self.envelope = envelope
        self.ephemeral = ephemeral
        self._check_result = check_result
        self.active = True
        self.running = 0
        self._idle: trio.Event | None = None  # while someone waits for no handler to run
        self._stalled = False

    # -- Inbox: called by the backend's subscription task ---------------------------------------------

    async def deliver(self, batch: Sequence[Delivery], *, checked: bool = False) -> None:
        """Send every delivery of `batch` into its worker's channel, in order, waiting for room.

        Waiting for room happens inside a `wait_timeout` cancel scope: an ephemeral message still without
        room is dropped (counted and logged); a persistent one keeps waiting, so the backend stops taking
        more from the broker (backpressure), logged once per stall. If cancelled (or the pool closed), a
        prefix of `batch` was sent and the rest is handed back: released to the broker (persistent, it stays
        unsettled and is redelivered in order to the group's next subscriber) or counted as dropped
        (ephemeral). `checked`: the messages passed the header and key rules when published (see Inbox).
        """
        # Method calls, not bound methods taken first: at one message a batch (a paced publisher) the three
        # bound methods cost more than they save.
        pool = self._pool
        sent = 0
        try:
            for delivery in batch:
                if not self.active:
                    break
                item = self._item(delivery, checked)
                index = pool.queue_for(item)
                if pool.send_nowait(index, item):
                    self._stalled = False
                else:
                    await self._send_waiting(index, item)
                sent += 1
        except trio.ClosedResourceError:
            pass  # the pool closed (the bus is shutting down): the rest is handed back below
        finally:
            if sent < len(batch):
                self._hand_back(batch[sent:])
        await trio.lowlevel.checkpoint()

    async def _send_waiting(self, index: int, item: AggregateMessage) -> None:
        wait = self._pool.config.wait_timeout
        with trio.move_on_after(wait):
            await self._pool.send(index, item)
            return
        if self.ephemeral:
            self.dropped(1, f"no room in worker queue {index} within wait_timeout={wait} s")
            return
        if not self._stalled:
            self._stalled = True
            logger.warning(
                "subscription to %s: worker queue %d has had no room for wait_timeout=%s s; taking nothing "
                "more from the broker until it has (backpressure)",
                self.topic,
                index,
                wait,
                extra={"topic": self.topic},
            )
        await self._pool.send(index, item)

    def _hand_back(self, rest: Sequence[Delivery]) -> None:
        if self.ephemeral:
            self.dropped(len(rest), "its subscription stopped before they were queued")
            return
        for delivery in rest:
            delivery.release()

    def forget_deferred(self, keys: Callable[[str], bool], *, lost: bool = False) -> None:
        """Another reader gets the messages of the keys `keys` selects now (or nobody, `lost`): see the
        pool's."""
        self._pool.forget_deferred(self, keys, lost=lost)

    def dropped(self, count: int, why: str) -> None:
        """Count and log `count` ephemeral messages that were dropped."""
        self._counters.dropped += count
        logger.warning(
            "dropped %d message(s) of ephemeral topic %s: %s",
            count,
            self.topic,
            why,
            extra={"topic": self.topic},
        )

    def key_of(self, message: Message) -> str | None:
        """The key the bus orders `message` by (from its header, envelope or key function)."""
        return self._resolve(message)[0]

    def _item(self, delivery: Delivery, checked: bool) -> AggregateMessage:
        message = delivery.message
        if self.key_fn is None and not self.envelope:
            # The common case, _resolve's first lines without its tuple: the key from the header.
            key = message.key
            if checked:  # stored through this bus's publish checks (or a dead letter built to pass them)
                return AggregateMessage(key, delivery, self, message, message.attempt, None)
            reason = header_problem(message.headers)
            if reason is None and key is not None:
                reason = wire_key_problem(key)
            return AggregateMessage(key, delivery, self, message, message.attempt, reason)
        key, value, reason = self._resolve(message)
        return AggregateMessage(key, delivery, self, value, message.attempt, reason)

    def _resolve(self, message: Message) -> tuple[str | None, object, str | None]:
        """The ordering key, the handler's argument, and why it must be dead-lettered (None: it need not).

        Any failure to key or decode, of any exception type, becomes the reason; only trio.Cancelled,
        KeyboardInterrupt and SystemExit propagate.
        """
        key = message.key
        value: object = message
        # Rules for what arrives from the wire (a foreign publisher may break them; keyedbus's own cannot).
        reason = header_problem(message.headers)
        if reason is None and key is not None and not self.envelope and self.key_fn is None:
            reason = wire_key_problem(key)
        if self.key_fn is not None:
            try:
                key = self.key_fn(message)
            except (trio.Cancelled, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:
                key, reason = message.key, f"key function failed: {type(exc).__name__}: {exc}"
            else:
                if key is not None and not isinstance(key, str):
                    key, reason = (
                        message.key,
                        f"key function returned {type(key).__name__}, expected str or None",
                    )
                elif key is not None and (problem := key_problem(key)) is not None:
                    reason = f"InvalidKeyError: key function returned {key[:64]!r}, which {problem}"
        if self.envelope and reason is None:
            try:
                envelope = Envelope.decode(message.data)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                value = envelope
                if self.key_fn is None:
                    key = envelope.aggregate_id
        return key, value, reason

    # -- Consumer: called by the pool's workers -----------------------------------------------------------

    async def handle(self, item: AggregateMessage) -> None:
        """Run the handler once for `item`; raises what it raises. `running` counts it while it runs."""
        value = item.value
        if isinstance(value, Message) and value.attempt != item.attempt:
            value = attrs.evolve(value, attempt=item.attempt)
        # A publish into this topic must not wait for itself. The worker's task keeps the topic it handled
        # last (set only when it changes: a set and a reset cost ~1.6k instructions a message); the only
        # other publish a worker makes, a dead letter, clears it first (see dead_letter).
        if HANDLING_TOPIC.get() != self.topic:
            HANDLING_TOPIC.set(self.topic)
        self.running += 1
        try:
            result: Any = self.handler(value)
            if self._check_result and not inspect.isawaitable(result):
                raise InvalidHandlerError(
                    f"handler {_name(self.handler)} returned {type(result).__name__}, not an awaitable: "
                    "pass an 'async def' function (or a callable returning a coroutine)"
                )
            await result
        finally:
            self.running -= 1
            if not self.running and self._idle is not None:
                self._idle.set()
                self._idle = None

    async def dead_letter(self, item: AggregateMessage, reason: str, failure: BaseException | None) -> None:
        """Publish `item` to the dead-letter topic with `reason`, then log it with `failure`'s traceback."""
        original = item.delivery.message
        headers = dead_letter_headers(
            original.headers, key=item.key, error=reason, attempts=item.attempt, topic=self.topic
        )
        message_id = f"{original.message_id}.dead-letter" if original.message_id else new_message_id()
        # Not a handler's publish: the worker may still carry the topic it handled last (see handle).
        if HANDLING_TOPIC.get() is not None:
            HANDLING_TOPIC.set(None)
        try:
            await self._publish(self.dead_letter_topic, original.data, headers, message_id)
        except MessageTooLargeError as exc:  # the original fitted; with keyedbus's headers it does not
            data, headers = shrink_dead_letter(original.data, headers, message_id=message_id, limit=exc.limit)
            await self._publish(self.dead_letter_topic, data, headers, message_id)
        logger.error(
            "dead-lettered a message of %s (key %s) to %s after %d attempt(s): %s",
            self.topic,
            item.key,
            self.dead_letter_topic,
            item.attempt,
            reason,
            exc_info=failure,
            extra={
                "topic": self.topic,
                "key": item.key,
                "attempt": item.attempt,
                "message_id": original.message_id,
            },
        )

    def released(self, item: AggregateMessage) -> None:
        """An unsubscribed subscription's message was handed back: on an ephemeral topic it is gone."""
        if self.ephemeral:
            self.dropped(1, "unsubscribed before it was handled")

    async def wait_no_handler_running(self) -> None:
        """Wait until none of this subscription's handlers runs."""
        while self.running:
            if self._idle is None:
                self._idle = trio.Event()
            await self._idle.wait()
        await trio.lowlevel.checkpoint()
