"""open_bus() and Bus: the one nursery, publish/subscribe, statistics and the drain on exit."""

from __future__ import annotations

import inspect
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Generic, TypeVar, final
from urllib.parse import urlsplit

import attrs
import trio

from ._backends._base import Backend, BackendSubscription, Delivery, Outgoing
from ._backends.memory import DEFAULT_MAX_PAYLOAD, HANDLING_TOPIC, MemoryBackend
from ._config import PoolConfig, RetryPolicy, TopicConfig
from ._errors import (
    ArgumentTypeError,
    BusClosedError,
    DuplicateSubscriptionError,
    InvalidConfigError,
    InvalidEnvelopeError,
    InvalidHandlerError,
    InvalidHeaderError,
    InvalidTopicError,
)
from ._messages import (
    KEY_HEADER,
    AggregateMessage,
    Envelope,
    Message,
    check_data,
    check_headers,
    check_key,
    check_topic,
    dead_letter_headers,
    header_problem,
    key_problem,
    new_message_id,
    wire_key_problem,
)
from ._pool import Counters, KeyedWorkerPool
from ._runtime import import_nats_backend, require_trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Bus", "BusStatistics", "Subscription", "open_bus"]

logger = logging.getLogger("keyedbus")

T = TypeVar("T", Message, Envelope)
Handler = Callable[[T], Awaitable[None]]
KeyFunction = Callable[[Message], "str | None"]


@attrs.frozen(kw_only=True, repr=False)
class BusStatistics:
    """A snapshot of the bus's pool and counters; counters are totals since the bus opened.

    Its repr (and str) is a one-line summary: the totals and the busiest shards, not every shard's depth.
    """

    #: Worker tasks in the pool.
    workers: int
    #: Messages waiting: to run, parked behind a failing key, or between keyless retries.
    queued: int
    #: Handlers running now.
    in_flight: int
    #: Messages whose handler succeeded (each counted once, before its ack).
    handled: int
    #: Failed attempts that will be retried.
    retried: int
    #: Messages sent to a dead-letter topic.
    dead_lettered: int
    #: Ephemeral messages dropped because no queue had room within `wait_timeout`.
    dropped: int
    #: Keys parked now, waiting for a retry.
    parked_keys: int
    #: Whether the backend can reach its broker now.
    connected: bool
    #: Messages waiting to run in each shard (`fnv1a_32(key) % workers`), by shard index.
    worker_queue_depths: tuple[int, ...]
    #: Messages stored for this bus's persistent subscriptions and not delivered to it yet (on JetStream,
    #: the consumers' pending count as of their newest delivery).
    lag: int = 0
    #: Messages a topic limit (max_msgs, max_bytes, max_age, or the bound of a topic no group subscribes to)
    #: evicted before every subscribed group had settled them; each eviction is also logged with the topic.
    evicted: int = 0
    #: Subscriptions whose broker-side consumer or stream vanished (deleted by an operator, or a server
    #: restarted with an empty store) and is being recreated now, with backoff; each incident is logged.
    recovering: int = 0

    #: Shards named in the repr, busiest first.
    _SHOWN_SHARDS = 5

    def __repr__(self) -> str:
        busy = sorted(
            ((depth, shard) for shard, depth in enumerate(self.worker_queue_depths) if depth),
            key=lambda item: (-item[0], item[1]),
        )
        shown = ", ".join(f"#{shard}: {depth}" for depth, shard in busy[: self._SHOWN_SHARDS])
        more = len(busy) - self._SHOWN_SHARDS
        shards = f"{{{shown}}}" + (f" (+{more} more non-empty)" if more > 0 else "")
        recovering = f"recovering={self.recovering}, " if self.recovering else ""
        return (
            f"BusStatistics(workers={self.workers}, queued={self.queued}, in_flight={self.in_flight}, "
            f"handled={self.handled}, retried={self.retried}, dead_lettered={self.dead_lettered}, "
            f"dropped={self.dropped}, evicted={self.evicted}, parked_keys={self.parked_keys}, "
            f"lag={self.lag}, connected={self.connected}, {recovering}busiest_shards={shards})"
        )

    __str__ = __repr__


def _check_handler(handler: object) -> None:
    if not callable(handler):
        raise InvalidHandlerError(
            f"handler must be an async function taking one message, got {type(handler).__name__} {handler!r}"
        )
    # An object with an `async def __call__` is as good as an async function.
    call = getattr(type(handler), "__call__", None)  # noqa: B004 - we need the method, not callable()
    is_async = inspect.iscoroutinefunction(handler) or (
        not inspect.isroutine(handler) and inspect.iscoroutinefunction(call)
    )
    if not is_async:
        name = getattr(handler, "__qualname__", repr(handler))
        raise InvalidHandlerError(
            f"handler {name} is not async: define it with 'async def' (keyedbus awaits every handler)"
        )


def _group_name(group: object) -> str:
    if group is None:
        return ""
    if not isinstance(group, str):
        raise ArgumentTypeError(f"group must be a str or None, got {type(group).__name__} {group!r}")
    if not group or "." in group:
        raise InvalidTopicError(f"invalid group {group!r}: use one token of letters, digits, '_' and '-'")
    check_topic(group, what="group")
    return group


class _Consumer(Generic[T]):
    """One subscription as the pool and the backend see it: builds pool items and runs the handler."""

    def __init__(
        self,
        bus: Bus,
        topic: str,
        group: str,
        handler: Handler[T],
        *,
        retry: RetryPolicy,
        dead_letter: str,
        key_fn: KeyFunction | None,
        envelope: bool,
        ephemeral: bool,
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.handler: Handler[T] = handler
        self.retry = retry
        self.dead_letter_topic = dead_letter
        self.key_fn = key_fn
        self.envelope = envelope
        self.ephemeral = ephemeral
        self.active = True
        self.running = 0
        self._idle = trio.lowlevel.ParkingLot()

    # -- Inbox ----------------------------------------------------------------------------------------

    async def deliver(self, batch: Sequence[Delivery]) -> None:
        pool = self.bus._pool
        for delivery in batch:
            item = self._item(delivery)
            if pool.dispatch_nowait(item):
                continue
            if not self.ephemeral:
                await pool.dispatch(item)
                continue
            with trio.move_on_after(pool.config.wait_timeout):
                await pool.dispatch(item)
                continue
            self.dropped(1, f"no room in the key's shard within wait_timeout={pool.config.wait_timeout} s")
        await trio.lowlevel.checkpoint()

    def deliver_nowait(self, delivery: Delivery) -> bool:
        if not self.active or self.bus._pool.closed:
            return False
        return self.bus._pool.dispatch_nowait(self._item(delivery))

    def dropped(self, count: int, why: str) -> None:
        self.bus._counters.dropped += count
        logger.warning(
            "dropped %d message(s) of ephemeral topic %s: %s",
            count,
            self.topic,
            why,
            extra={"topic": self.topic},
        )

    def key_of(self, message: Message) -> str | None:
        return self._resolve(message)[0]

    def _item(self, delivery: Delivery) -> AggregateMessage:
        message = delivery.message
        key, value, reason = self._resolve(message)
        return AggregateMessage(
            key, delivery, self, value, attempt=message.attempt, dead_letter_reason=reason
        )

    def _resolve(self, message: Message) -> tuple[str | None, object, str | None]:
        """The ordering key, the handler's argument, and why it must be dead-lettered (None: it need not)."""
        key = message.key
        value: object = message
        # Rules for what arrives from the wire (a foreign publisher may break them; keyedbus's own cannot).
        reason = header_problem(message.headers)
        if reason is None and key is not None and not self.envelope and self.key_fn is None:
            reason = wire_key_problem(key)
        if self.key_fn is not None:
            try:
                key = self.key_fn(message)
            except Exception as exc:
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
            except InvalidEnvelopeError as exc:
                reason = f"InvalidEnvelopeError: {exc}"
            else:
                value = envelope
                if self.key_fn is None:
                    key = envelope.aggregate_id
        return key, value, reason

    # -- Consumer (for the pool) ----------------------------------------------------------------------

    async def handle(self, item: AggregateMessage) -> None:
        value = item.value
        if isinstance(value, Message) and value.attempt != item.attempt:
            value = attrs.evolve(value, attempt=item.attempt)
        token = HANDLING_TOPIC.set(self.topic)  # a publish into this topic must not wait for itself
        try:
            await self.handler(value)
        finally:
            HANDLING_TOPIC.reset(token)

    async def dead_letter(self, item: AggregateMessage, reason: str) -> None:
        original = item.delivery.message
        headers = dead_letter_headers(
            original.headers, key=item.key, error=reason, attempts=item.attempt, topic=self.topic
        )
        message_id = f"{original.message_id}.dead-letter" if original.message_id else new_message_id()
        await self.bus._publish_internal(self.dead_letter_topic, original.data, headers, message_id)
        logger.error(
            "dead-lettered a message of %s (key %s) to %s after %d attempt(s): %s",
            self.topic,
            item.key,
            self.dead_letter_topic,
            item.attempt,
            reason,
            extra={
                "topic": self.topic,
                "key": item.key,
                "attempt": item.attempt,
                "message_id": original.message_id,
            },
        )

    def started(self) -> None:
        self.running += 1

    def finished(self) -> None:
        self.running -= 1
        if not self.running and self._idle:
            self._idle.unpark_all()

    async def wait_no_handler_running(self) -> None:
        while self.running:
            await self._idle.park()


@final
class Subscription:
    """A live subscription, returned by `Bus.subscribe` and `Bus.subscribe_envelope`."""

    def __init__(self, consumer: _Consumer[Any], backend_sub: BackendSubscription) -> None:
        self._consumer = consumer
        self._backend_sub = backend_sub
        self._done = False

    @property
    def topic(self) -> str:
        """The subscribed topic."""
        return self._consumer.topic

    @property
    def group(self) -> str | None:
        """The group, or None for the default group."""
        return self._consumer.group or None

    def __repr__(self) -> str:
        return f"<keyedbus.Subscription topic={self.topic!r} group={self.group!r}>"

    async def unsubscribe(self) -> None:
        """Stop delivery, let this subscription's running handlers finish, and hand back the rest.

        What it had not settled (queued, parked or never started) stays with the broker and goes to the next
        subscriber of the same (topic, group), redelivered with `attempt > 1`, in key order. Calling it again
        does nothing. If cancelled, delivery has stopped but the hand-back happens when the bus closes.
        """
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        self._done = True
        consumer = self._consumer
        consumer.active = False
        consumer.bus._pool.release_parked()
        await self._backend_sub.stop()
        await consumer.wait_no_handler_running()
        await self._backend_sub.detach()
        consumer.bus._subscriptions.pop((consumer.topic, consumer.group), None)


@final
class Bus:
    """An open event bus: publish, subscribe, statistics. Only `open_bus` creates one."""

    def __init__(
        self,
        _backend: Backend,
        _pool: KeyedWorkerPool,
        _counters: Counters,
        *,
        url: str,
        retry: RetryPolicy,
        default_topic: TopicConfig,
    ) -> None:
        self._backend = _backend
        self._pool = _pool
        self._counters = _counters
        self._url = url
        self._retry = retry
        self._default_topic = default_topic
        self._topics: dict[str, TopicConfig] = {}
        self._subscriptions: dict[tuple[str, str], Subscription | None] = {}
        self._closing = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<keyedbus.Bus {self._url}>"

    def _check_open(self, *, subscribing: bool = False) -> None:
        if self._closed:
            raise BusClosedError(
                f"the bus for {self._url} is closed: publish and subscribe inside its "
                "'async with open_bus()' block"
            )
        if subscribing and self._closing:
            raise BusClosedError(
                f"the bus for {self._url} is draining (its 'async with open_bus()' block has ended): "
                "it takes no new subscriptions; subscribe before leaving the block"
            )

    def _topic_config(self, topic: str) -> TopicConfig:
        return self._topics.get(topic, self._default_topic)

    # -- topics ---------------------------------------------------------------------------------------

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        """Set how `topic` is stored (persistent or ephemeral, limits); call it before first use.

        Raises TopicConfigConflictError if the topic is already in use with a different persistence.
        """
        check_topic(topic)
        if not isinstance(config, TopicConfig):
            raise ArgumentTypeError(f"config must be a keyedbus.TopicConfig, got {type(config).__name__}")
        self._check_open()
        await self._backend.configure_topic(topic, config)
        self._topics[topic] = config

    # -- publishing ------------------------------------------------------------------------------------

    def _prepare(
        self, topic: str, data: object, key: object, headers: object, message_id: object
    ) -> Outgoing:
        check_topic(topic)
        payload = check_data(data)
        wire_headers = check_headers(headers)  # the key header in any case becomes KEY_HEADER
        if key is None:
            given = wire_headers.get(KEY_HEADER)
            if given == "":
                del wire_headers[KEY_HEADER]  # an empty key header means keyless: send none
            elif given is not None:
                check_key(given, what=f"header {KEY_HEADER}")
        else:
            check_key(key)
            given = wire_headers.get(KEY_HEADER)
            if given is not None and given != key:
                raise InvalidHeaderError(
                    f"header {KEY_HEADER}={given!r} contradicts key={key!r}: pass the key once, as key="
                )
            wire_headers[KEY_HEADER] = key  # type: ignore[assignment]
        chosen = message_id is not None  # only an id the caller chose can come again (a retried publish)
        if message_id is None:
            message_id = new_message_id()
        elif not isinstance(message_id, str) or not message_id:
            raise ArgumentTypeError(f"message_id must be a non-empty str or None, got {message_id!r}")
        self._check_open()
        return Outgoing(topic, self._topic_config(topic), payload, wire_headers, message_id, dedup=chosen)

    async def publish(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> None:
        """Publish raw bytes; messages with the same `key` are handled in publish order.

        Returns once the broker has stored the message (persistent topics) or sent it (ephemeral). A message
        published again with the same `message_id` is stored once. On a full memory topic it waits for room.
        Raises an InvalidTopicError, InvalidKeyError or ArgumentTypeError for bad arguments, and
        BusClosedError once the bus is closed. If cancelled, the message may or may not have been stored:
        publish it again with the same `message_id` to be sure it is stored exactly once.
        """
        await self._backend.publish(self._prepare(topic, data, key, headers, message_id))

    def publish_nowait(
        self,
        topic: str,
        data: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
        message_id: str | None = None,
    ) -> None:
        """Like `publish`, but raise trio.WouldBlock instead of waiting when the topic is full."""
        self._backend.publish_nowait(self._prepare(topic, data, key, headers, message_id))

    async def publish_envelope(
        self, topic: str, envelope: Envelope, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish an Envelope as the Go system's JSON, keyed by its aggregate_id, deduplicated by event_id.

        Same waiting, errors and cancellation as `publish`.
        """
        if not isinstance(envelope, Envelope):
            raise ArgumentTypeError(
                f"publish_envelope takes a keyedbus.Envelope, got {type(envelope).__name__}; "
                "use publish() for raw bytes"
            )
        await self.publish(
            topic,
            envelope.encode(),
            key=envelope.aggregate_id,
            headers=headers,
            message_id=envelope.event_id or None,
        )

    async def _publish_internal(
        self, topic: str, data: bytes, headers: dict[str, str], message_id: str
    ) -> None:
        """Publish for the bus itself (dead letters): allowed while draining."""
        if self._closed:
            raise BusClosedError("the bus is closed")
        await self._backend.publish(Outgoing(topic, self._topic_config(topic), data, headers, message_id))

    # -- subscribing -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        topic: str,
        handler: Callable[[Message], Awaitable[None]],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = None,
        key: KeyFunction | None = None,
    ) -> Subscription:
        """Deliver every message of `topic` to `handler` (an async function taking one Message).

        Messages with the same key run one after another in publish order; different keys run concurrently.
        `group` shares the topic's messages between the subscribers of that group (None: the default group);
        `retry` overrides the bus's RetryPolicy; `dead_letter` names the topic that receives messages
        that failed every attempt (default ``<topic>.dead-letter``); `key` computes a key for messages from
        publishers that do not set ``X-Aggregate-ID``. Returns once the subscription is live. Raises
        InvalidHandlerError for a sync or non-callable handler, DuplicateSubscriptionError if this bus already
        subscribes to (topic, group), InvalidTopicError for a bad name.
        """
        return await self._subscribe(
            topic, handler, envelope=False, group=group, retry=retry, dead_letter=dead_letter, key=key
        )

    async def subscribe_envelope(
        self,
        topic: str,
        handler: Callable[[Envelope], Awaitable[None]],
        *,
        group: str | None = None,
        retry: RetryPolicy | None = None,
        dead_letter: str | None = None,
        key: KeyFunction | None = None,
    ) -> Subscription:
        """Like `subscribe`, but the handler receives a decoded Envelope, ordered by its aggregate_id.

        Bytes that do not decode as an envelope are dead-lettered at once with the reason in the
        ``Keyedbus-Error`` header; the subscription keeps running.
        """
        return await self._subscribe(
            topic, handler, envelope=True, group=group, retry=retry, dead_letter=dead_letter, key=key
        )

    async def _subscribe(
        self,
        topic: str,
        handler: Any,
        *,
        envelope: bool,
        group: object,
        retry: object,
        dead_letter: object,
        key: Any,
    ) -> Subscription:
        check_topic(topic)
        _check_handler(handler)
        group_name = _group_name(group)
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ArgumentTypeError(
                f"retry must be a keyedbus.RetryPolicy or None, got {type(retry).__name__}"
            )
        dlq = (
            f"{topic}.dead-letter"
            if dead_letter is None
            else check_topic(dead_letter, what="dead_letter topic")
        )
        if dlq == topic:
            raise InvalidTopicError(f"dead_letter topic {dlq!r} is the subscribed topic: pick another one")
        if key is not None and not callable(key):
            raise ArgumentTypeError(f"key must be a callable Message -> str | None, got {type(key).__name__}")
        self._check_open(subscribing=True)
        slot = (topic, group_name)
        if slot in self._subscriptions:
            raise DuplicateSubscriptionError(
                f"this bus already subscribes to topic {topic!r} in group {group!r}: unsubscribe the first "
                "subscription, or pass a different group="
            )
        self._subscriptions[slot] = None  # reserved now, so a concurrent duplicate fails too
        try:
            config = self._topic_config(topic)
            consumer: _Consumer[Any] = _Consumer(
                self,
                topic,
                group_name,
                handler,
                retry=retry or self._retry,
                dead_letter=dlq,
                key_fn=key,
                envelope=envelope,
                ephemeral=not config.persistent,
            )
            backend_sub = await self._backend.subscribe(topic, config, group_name, consumer)
        except BaseException:
            del self._subscriptions[slot]
            raise
        subscription = Subscription(consumer, backend_sub)
        self._subscriptions[slot] = subscription
        return subscription

    # -- state -----------------------------------------------------------------------------------------

    def statistics(self) -> BusStatistics:
        """A frozen snapshot of the pool and the counters."""
        c = self._counters
        depths = self._pool.queue_depths()
        return BusStatistics(
            workers=self._pool.config.workers,
            queued=sum(depths) + c.waiting,
            in_flight=c.in_flight,
            handled=c.handled,
            retried=c.retried,
            dead_lettered=c.dead_lettered,
            dropped=c.dropped,
            parked_keys=c.parked_keys,
            connected=self._backend.connected,
            worker_queue_depths=depths,
            lag=self._backend.lag(),
            evicted=self._backend.evicted(),
            recovering=self._backend.recovering(),
        )

    async def _drain(self, drain_timeout: float) -> None:
        """Handle everything already published to subscribed topics, then stop the workers."""
        self._closing = True
        with trio.move_on_after(drain_timeout) as scope:
            while True:
                await self._backend.wait_settled()
                await self._pool.wait_idle()
                if self._backend.settled():
                    break
            async with trio.open_nursery() as nursery:
                for sub in list(self._subscriptions.values()):
                    if sub is not None:
                        nursery.start_soon(sub._backend_sub.stop)
            self._pool.close()
            await self._pool.done.wait()
        if scope.cancelled_caught:
            logger.warning(
                "drain_timeout (%s s) passed with %d message(s) unfinished; they stay unacked "
                "(redelivered later on persistent topics)",
                drain_timeout,
                self._pool.unfinished,
            )


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _shown(url: str) -> str:
    """The URL as it may appear in reprs, logs and errors: no credentials."""
    if url.startswith("memory"):
        return url
    from ._backends._urls import safe_url

    return safe_url(url)


def _nats_options(**given: Any) -> dict[str, Any]:
    """Map open_bus's auth and TLS options to nats-py's connect() keywords, checking their types."""
    names = {"user": "user", "password": "password", "token": "token", "credentials": "user_credentials"}
    out: dict[str, Any] = {}
    for name, target in names.items():
        value = given[name]
        if value is not None:
            if not isinstance(value, str):
                raise ArgumentTypeError(f"{name} must be a str or None, got {type(value).__name__}")
            out[target] = value
    if given["tls"] is not None:
        if not isinstance(given["tls"], ssl.SSLContext):
            raise ArgumentTypeError(
                f"tls must be an ssl.SSLContext or None, got {type(given['tls']).__name__}"
            )
        out["tls"] = given["tls"]
    return out


def _check_url(url: object) -> str:
    if not isinstance(url, str):
        raise ArgumentTypeError(
            f"url must be a str such as 'memory://' or 'nats://127.0.0.1:4222', got {url!r}"
        )
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in ("memory", "nats", "tls"):
        raise InvalidConfigError(
            f"unsupported bus URL scheme {scheme or url!r}: use 'memory://' or 'nats://host:port'"
        )
    if scheme == "memory" and url != "memory://":
        raise InvalidConfigError(f"the embedded broker takes no address: use 'memory://', got {url!r}")
    return scheme


@asynccontextmanager
async def open_bus(
    url: str = "memory://",
    *,
    pool: PoolConfig = PoolConfig(),  # noqa: B008 - frozen, so a shared default is safe
    retry: RetryPolicy = RetryPolicy(),  # noqa: B008
    drain_timeout: float = 30.0,
    default_topic: TopicConfig = TopicConfig(),  # noqa: B008
    connect_timeout: float = 10.0,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    credentials: str | None = None,
    tls: ssl.SSLContext | None = None,
    max_payload: int | None = None,
) -> AsyncIterator[Bus]:
    """Open an event bus on `url` ("memory://", the default, or "nats://host:port") and yield it.

    Entering returns once the backend is connected. Leaving the block drains: nothing new is taken, queued
    and running handlers finish (at most `drain_timeout` seconds), messages are settled, the connection
    closes; on memory:// everything published to a subscribed topic before leaving is handled first. An
    exception raised in the block cancels the bus and propagates as itself. If the block is cancelled or the
    drain deadline passes, unfinished messages stay unacked (redelivered on persistent topics) and their
    number is logged. `max_payload` (memory:// only; NATS uses its server's) is the largest message in bytes,
    payload plus encoded headers, 1 MiB by default as on nats-server.
    """
    require_trio("keyedbus.open_bus")
    scheme = _check_url(url)
    if not isinstance(pool, PoolConfig):
        raise ArgumentTypeError(f"pool must be a keyedbus.PoolConfig, got {type(pool).__name__}")
    if not isinstance(retry, RetryPolicy):
        raise ArgumentTypeError(f"retry must be a keyedbus.RetryPolicy, got {type(retry).__name__}")
    if not isinstance(default_topic, TopicConfig):
        raise ArgumentTypeError(
            f"default_topic must be a keyedbus.TopicConfig, got {type(default_topic).__name__}"
        )
    for name, value in (("drain_timeout", drain_timeout), ("connect_timeout", connect_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise InvalidConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
    if max_payload is not None:
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or max_payload < 1:
            raise InvalidConfigError(f"max_payload must be an int of bytes >= 1, got {max_payload!r}")
        if scheme != "memory":
            raise InvalidConfigError(
                "max_payload applies to memory:// only: on NATS the server's max_payload applies "
                "(set it in nats-server's configuration)"
            )
    options = _nats_options(user=user, password=password, token=token, credentials=credentials, tls=tls)
    counters = Counters()
    bus: Bus | None = None
    try:
        async with AsyncExitStack() as stack:
            nats_backend: Any = None
            if scheme != "memory":
                # Imported here only: trio_asyncio re-routes asyncio for the whole process.
                nats_backend = import_nats_backend()

                await stack.enter_async_context(nats_backend.open_loop())
            async with trio.open_nursery() as nursery:
                backend: Backend
                if nats_backend is None:
                    backend = MemoryBackend(
                        nursery, buffer_size=pool.queue_size, max_payload=max_payload or DEFAULT_MAX_PAYLOAD
                    )
                else:
                    backend = await nats_backend.connect(
                        url, nursery, connect_timeout=connect_timeout, options=options
                    )
                stack.push_async_callback(backend.aclose)
                worker_pool = KeyedWorkerPool(pool, counters)
                await nursery.start(worker_pool.run)
                bus = Bus(
                    backend, worker_pool, counters, url=_shown(url), retry=retry, default_topic=default_topic
                )
                try:
                    yield bus
                except BaseException:
                    unfinished = worker_pool.unfinished
                    if unfinished:
                        logger.warning(
                            "bus cancelled with %d message(s) unfinished; they stay unacked", unfinished
                        )
                    nursery.cancel_scope.cancel()
                    raise
                await bus._drain(drain_timeout)
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        exc = _unwrap(group)
        if exc is group:
            raise
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
    finally:
        if bus is not None:
            bus._closed = True
