"""Subscription: the handle `Bus.subscribe` returns, with its lifecycle (open -> draining -> closed)."""

from __future__ import annotations

import logging
from typing import Any, Literal, final

import trio

from ._backends._base import BackendSubscription
from ._consumer import Consumer
from ._pool import KeyedWorkerPool
from ._util import NoPublicConstructor

__all__ = ["HAND_BACK_TIMEOUT", "Registry", "State", "Subscription"]

logger = logging.getLogger("keyedbus")

#: "open": delivering; "draining": stopping (unsubscribe or the bus's drain); "closed": nothing more happens.
State = Literal["open", "draining", "closed"]

#: Seconds a cancelled `unsubscribe()` still spends, shielded, finishing its hand-back.
HAND_BACK_TIMEOUT = 5.0


class Registry:
    """A bus's subscriptions by (topic, group), and the bus's state: what its subscriptions may ask of it."""

    def __init__(self) -> None:
        #: None while a subscribe is under way: the slot is reserved, so a concurrent duplicate fails too.
        self.subscriptions: dict[tuple[str, str], Subscription | None] = {}
        self.state: State = "open"

    def forget(self, slot: tuple[str, str], subscription: Subscription) -> None:
        """Free `slot` if `subscription` still holds it."""
        if self.subscriptions.get(slot) is subscription:
            del self.subscriptions[slot]


@final
class Subscription(metaclass=NoPublicConstructor):
    """A live subscription, returned by `Bus.subscribe` and `Bus.subscribe_envelope`."""

    __slots__ = ("_backend_sub", "_consumer", "_pool", "_registry", "_state")

    def __init__(
        self,
        consumer: Consumer[Any],
        backend_sub: BackendSubscription,
        pool: KeyedWorkerPool,
        registry: Registry,
    ) -> None:
        self._consumer = consumer
        self._backend_sub = backend_sub
        self._pool = pool
        self._registry = registry
        self._state: State = "open"

    @property
    def topic(self) -> str:
        """The subscribed topic."""
        return self._consumer.topic

    @property
    def group(self) -> str | None:
        """The group, or None for the default group."""
        return self._consumer.group or None

    @property
    def state(self) -> State:
        """The lifecycle state: open (delivering), draining (unsubscribing), closed (or the bus closed)."""
        if self._registry.state == "closed":
            return "closed"
        return self._state

    def __repr__(self) -> str:
        return f"<keyedbus.Subscription topic={self.topic!r} group={self.group!r} {self.state}>"

    async def stop(self) -> None:
        """Stop the subscription task (the bus's drain): nothing more is taken from the broker."""
        await self._backend_sub.stop()

    async def unsubscribe(self) -> None:
        """Stop delivery, let this subscription's running handlers finish, and hand back the rest.

        What it had not settled (queued, parked or never started) stays with the broker and goes to the next
        subscriber of the same (topic, group), redelivered with `attempt > 1`, in key order. Calling it again,
        or once the bus is closed, returns at once. If cancelled, the (topic, group) is still freed at once
        and the hand-back still finishes, shielded, within `HAND_BACK_TIMEOUT` seconds.
        """
        if self._state != "open" or self._registry.state == "closed":
            await trio.lowlevel.checkpoint()
            return
        self._state = "draining"
        consumer = self._consumer
        consumer.active = False
        self._pool.release_parked()
        stopped = False
        try:
            await self._backend_sub.stop()
            stopped = True
            await consumer.wait_no_handler_running()
        finally:
            # Cancelled or not: hand back what is unsettled, then free the slot. Shielded, so a cancelled
            # unsubscribe cannot leave the group's messages with a subscription nobody reads; bounded, so it
            # cannot hang on a dead connection.
            with trio.move_on_after(HAND_BACK_TIMEOUT) as scope:
                scope.shield = True
                if not stopped:
                    await self._backend_sub.stop()
                await consumer.wait_no_handler_running()
                await self._backend_sub.detach()
            if scope.cancelled_caught:
                logger.warning(
                    "unsubscribe from %s: the hand-back did not finish within %s s; what is unsettled is "
                    "redelivered when the bus closes",
                    self.topic,
                    HAND_BACK_TIMEOUT,
                    extra={"topic": self.topic},
                )
            self._registry.forget((consumer.topic, consumer.group), self)
            self._state = "closed"
