"""The small interface every transport implements, so the pool and the bus never know which one runs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs

from .._config import TopicConfig
from .._messages import Message

__all__ = ["AtMostOnceDelivery", "Backend", "BackendSubscription", "Delivery", "Inbox", "Outgoing"]


class Delivery(Protocol):
    """One delivered message and the means to settle it; settling never blocks (backends batch it)."""

    @property
    def message(self) -> Message:
        """The message as delivered (its `attempt` is the broker's delivery count)."""
        ...

    def ack(self) -> None:
        """Settle as handled: the broker will not deliver it again."""

    def term(self) -> None:
        """Settle as given up (after it was dead-lettered): the broker will not deliver it again."""

    def release(self) -> None:
        """Leave unsettled: the broker delivers it again later, to this group's next subscriber."""

    @property
    def withdrawn(self) -> bool:
        """True once the backend took it back while it waited (its partition went to another process):
        the pool must release it without running it. A backend sets it only right before it calls
        `Inbox.forget_deferred` (no checkpoint between): the pool looks at it only from then on."""
        ...

    @property
    def sequence(self) -> int:
        """The broker's sequence of this message (stream order); 0 where there is none (ephemeral)."""
        ...

    @property
    def spillable(self) -> bool:
        """Whether the pool may spill it past a parked key's bound (`defer` it, or drop it if ephemeral)."""
        ...

    def defer(self, delay: float) -> bool:
        """Hand it back now, to be delivered again no sooner than `delay` seconds from now.

        The pool uses it for a parked key's backlog beyond its bound. The redelivery's `attempt` does not
        count the deferral. False if the broker cannot take it back (ephemeral: the message is gone).
        """
        ...

    def will_redeliver(self, sequence: int) -> bool | None:
        """Whether the broker will deliver `sequence` (deferred by this subscription) again: False once it
        cannot (a limit evicted it), None where the broker cannot tell (the pool then waits `DEFER_GRACE`)."""
        ...

    @property
    def epoch(self) -> int:
        """Which reading of its messages by this process it came in: one that ended (a JetStream partition
        given to another process) gives what it deferred to the next reader, not back here."""
        ...


@attrs.define(eq=False)
class Outgoing:
    """One message on its way to the broker, as the bus checked it."""

    topic: str
    config: TopicConfig
    data: bytes
    headers: dict[str, str]
    message_id: str
    #: False when the id was generated for this publish: it cannot repeat, so the broker need not remember it.
    dedup: bool = True
    #: Its `wire_size`, when the bus knew it without counting (a key and a generated id: ASCII of known
    #: length); -1 when not.
    size: int = -1


@attrs.define(eq=False)
class AtMostOnceDelivery:
    """A delivery on an ephemeral topic: there is nothing to settle with the broker."""

    message: Message

    def ack(self) -> None:
        """At-most-once: nothing to settle."""

    def term(self) -> None:
        """At-most-once: nothing to settle."""

    def release(self) -> None:
        """At-most-once: nothing to settle."""

    withdrawn = False  # nothing takes an ephemeral delivery back
    spillable = True  # dropped, counted

    @property
    def sequence(self) -> int:
        """At-most-once: no sequence."""
        return 0

    def defer(self, delay: float) -> bool:
        """At-most-once: the broker cannot take it back."""
        return False

    def will_redeliver(self, sequence: int) -> bool | None:
        """At-most-once: nothing is deferred."""
        return None

    @property
    def epoch(self) -> int:
        """At-most-once: nothing is deferred."""
        return 0


class Inbox(Protocol):
    """Where a backend's subscription task hands its deliveries: the bus's side of one subscription.

    Every backend runs one subscription task per subscription (memory:// included); only that task calls
    `deliver`, never a publisher's task.
    """

    async def deliver(self, batch: Sequence[Delivery], *, checked: bool = False) -> None:
        """Build each delivery's AggregateMessage and send it into its worker's queue, waiting for room.

        Backpressure: it returns once every delivery is queued (or, ephemeral, dropped and counted after
        `wait_timeout`). If cancelled, a prefix of `batch` was queued and the rest was handed back: released
        (persistent: left unsettled, for the broker to deliver again) or counted as dropped (ephemeral).
        `checked`: every message was stored by a bus that applied the header and key rules when it published
        it (memory://: nothing else can store there), so the rules for what arrives from the wire need not
        run again; a broker others publish to (NATS) passes False.
        """

    def dropped(self, count: int, why: str) -> None:
        """Record `count` ephemeral messages that were dropped (at-most-once topics only)."""

    def forget_deferred(self, keys: Callable[[str], bool], *, lost: bool = False) -> None:
        """Another reader gets the messages of the keys `keys` selects from now on (a partition changed
        hands; the deliveries' `epoch` changes if this process reads them again): what the pool deferred
        of them comes back there, not here. Called right after marking any delivery `withdrawn`.
        `lost`: it comes back nowhere (its stream is gone): the keys go on without it at once."""

    def key_of(self, message: Message) -> str | None:
        """The key the bus orders `message` by (from its header, envelope or key function)."""
        ...


class BackendSubscription(Protocol):
    """A live subscription of one (topic, group) inside a backend."""

    async def stop(self) -> None:
        """Stop delivering; after it returns the inbox is called no more."""

    async def detach(self) -> None:
        """Once stopped and idle: leave what is unsettled to the group's next subscriber."""


class Backend(Protocol):
    """A transport: the embedded broker, NATS core or JetStream."""

    @property
    def connected(self) -> bool:
        """Whether the backend can reach its broker now."""
        ...

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        """Create or update how `topic` is stored."""

    async def publish(self, out: Outgoing) -> None:
        """Store (persistent) or send (ephemeral) one message; returns once the broker has it.

        `out.config` is the topic's configuration, used to create the topic on first use.
        """

    def publish_keyed(
        self, topic: str, config: TopicConfig, data: bytes, key: str, message_id: str, size: int
    ) -> Awaitable[None]:
        """The common publish: `publish(Outgoing(topic, config, data, {KEY_HEADER: key}, message_id,
        dedup=False, size=size))`, for a backend that needs no Outgoing to store it (memory:// stores the
        Message its subscribers receive: one object less a message).

        The bus checked `key` and `topic`, generated `message_id` (it cannot repeat: nothing to deduplicate)
        and counted `size` (`wire_size`). The same waiting, errors and cancellation as `publish`.
        """
        ...

    def publish_nowait(self, out: Outgoing) -> None:
        """Like publish, but raise trio.WouldBlock instead of waiting for room."""

    async def subscribe(
        self, topic: str, config: TopicConfig, group: str, inbox: Inbox
    ) -> BackendSubscription:
        """Deliver `topic` to `inbox` for `group`; returns once later publishes will be seen."""

    def settled(self) -> bool:
        """True when every message on a subscribed topic has been delivered and settled (drain helper)."""
        ...

    def lag(self) -> int:
        """Messages stored for this bus's persistent subscriptions and not delivered to it yet."""
        ...

    def evicted(self) -> int:
        """Messages a limit (max_msgs, max_bytes, max_age, a bound) evicted before a group settled them."""
        ...

    def recovering(self) -> int:
        """Subscriptions whose broker-side consumer or stream vanished and is being recreated now."""
        ...

    def partitions(self) -> dict[tuple[str, str | None], tuple[int, ...]]:
        """The partitions this process reads now, per persistent (topic, group) it subscribes to."""
        ...

    async def aclose(self) -> None:
        """Flush pending acks and close the connection; shielded and bounded, so safe in a finally."""

    async def wait_settled(self) -> None:
        """Wait until `settled()` is true; backends that cannot tell return at once."""
