"""open_bus() and Bus: the one nursery, publish/subscribe, statistics, the lifecycle and the drain."""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, final

import trio

from ._admin import Admin
from ._backends._base import Backend, Outgoing
from ._backends.memory import DEFAULT_MAX_PAYLOAD, MemoryBackend
from ._config import PoolConfig, RetryPolicy, TopicConfig
from ._consumer import Consumer, KeyFunction, check_handler
from ._errors import (
    ArgumentTypeError,
    BusClosedError,
    DuplicateSubscriptionError,
    InvalidConfigError,
    InvalidHeaderError,
    InvalidTopicError,
)
from ._groups import is_users, to_raise
from ._messages import (
    KEY_HEADER,
    MSG_ID_HEADER,
    Envelope,
    Message,
    check_data,
    check_headers,
    check_key,
    check_topic,
    new_message_id,
)
from ._options import check_url, nats_options, shown_url
from ._pool import KeyedWorkerPool
from ._runtime import import_nats_backend, require_trio
from ._statistics import BusStatistics, Counters
from ._subscription import Registry, State, Subscription
from ._util import NoPublicConstructor

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Bus", "open_bus"]

logger = logging.getLogger("keyedbus")


#: `wire_size` of a message whose headers are the key alone and that has a message id, less the payload,
#: the key and the id (both ASCII: `check_key`, `new_message_id`): the frame and the two header lines.
_KEY_AND_ID_FRAME = len(b"NATS/1.0\r\n\r\n") + len(MSG_ID_HEADER) + 4 + len(KEY_HEADER) + 4


def _group_name(group: object) -> str:
    if group is None:
        return ""
    if not isinstance(group, str):
        raise ArgumentTypeError(f"group must be a str or None, got {type(group).__name__} {group!r}")
    if not group or "." in group:
        raise InvalidTopicError(f"invalid group {group!r}: use one token of letters, digits, '_' and '-'")
    check_topic(group, what="group")
    return group


@final
class Bus(metaclass=NoPublicConstructor):
    """An open event bus: publish, subscribe, statistics. Only `open_bus` creates one."""

    def __init__(
        self,
        backend: Backend,
        pool: KeyedWorkerPool,
        counters: Counters,
        *,
        url: str,
        retry: RetryPolicy,
        default_topic: TopicConfig,
    ) -> None:
        self._backend = backend
        self._pool = pool
        self._counters = counters
        self._url = url
        self._retry = retry
        self._default_topic = default_topic
        self._topics: dict[str, TopicConfig] = {}
        self._registry = Registry()
        self._subscriptions = self._registry.subscriptions

    def __repr__(self) -> str:
        return f"<keyedbus.Bus {self._url} {self._registry.state}>"

    @property
    def url(self) -> str:
        """The bus's URL, without credentials."""
        return self._url

    @property
    def admin(self) -> Admin:
        """Operator commands on the broker (stream and consumer state, stored messages); NATS only."""
        return Admin._create(self._backend, self._url)

    @property
    def state(self) -> State:
        """The lifecycle state: open (inside the `open_bus` block), draining (leaving it), then closed."""
        return self._registry.state

    def _close(self) -> None:
        """The `open_bus` block has returned: everything refuses from now on."""
        self._registry.state = "closed"

    def _check_open(self, *, subscribing: bool = False) -> None:
        if self._registry.state == "closed":
            raise BusClosedError(
                f"the bus for {self._url} is closed: publish and subscribe inside its "
                "'async with open_bus()' block"
            )
        if subscribing and self._registry.state == "draining":
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
        published again with the same `message_id` is stored once. On a memory topic at its default bound it
        waits while a subscriber can make room, else raises TopicFullError at once (docs/semantics.md, "Limits
        and retention"). Raises an InvalidTopicError, InvalidKeyError, InvalidHeaderError or ArgumentTypeError
        for bad arguments, MessageTooLargeError for a message over max_payload (payload plus encoded headers),
        and BusClosedError once the bus is closed. If cancelled, the message may or may not have been stored:
        publish it again with the same `message_id` to be sure it is stored exactly once.
        """
        if headers is None and message_id is None and key is not None and type(data) is bytes:
            # The common publish (bytes and a key): the checks `_prepare` makes that apply, without their
            # calls, handed to the backend without an Outgoing (memory:// builds the Message its subscribers
            # receive instead). Its wire size is known: the key and the id are ASCII (`wire_size` counts ~70
            # bytecodes a publish for it). A generated id cannot repeat: nothing to deduplicate.
            check_topic(topic)
            checked = check_key(key)
            self._check_open()
            message_id = new_message_id()
            size = _KEY_AND_ID_FRAME + len(data) + len(checked) + len(message_id)
            config = self._topics.get(topic, self._default_topic)
            await self._backend.publish_keyed(topic, config, data, checked, message_id, size)
            return
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
        if self._registry.state == "closed":
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
        """Deliver every message of `topic` to `handler`, an async function taking one Message.

        Any callable returning an awaitable will do (a lambda around an async function, say).

        Messages with the same key run one after another in publish order; different keys run concurrently.
        `group` shares the topic's messages between the subscribers of that group (None: the default group);
        `retry` overrides the bus's RetryPolicy; `dead_letter` names the topic that receives messages
        that failed every attempt (default ``<topic>.dead-letter``); `key` computes a key for messages from
        publishers that do not set ``X-Aggregate-ID``. Returns once the subscription is live. Raises
        InvalidHandlerError for a non-callable or a plain `def` function, DuplicateSubscriptionError if this
        bus already subscribes to (topic, group), InvalidTopicError for a bad name. A handler call that
        returns no awaitable fails that attempt with InvalidHandlerError.
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
        check_result = check_handler(handler)
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
            consumer: Consumer[Any] = Consumer(
                self._pool,
                self._counters,
                self._publish_internal,
                topic,
                group_name,
                handler,
                retry=retry or self._retry,
                dead_letter=dlq,
                key_fn=key,
                envelope=envelope,
                ephemeral=not config.persistent,
                check_result=check_result,
            )
            backend_sub = await self._backend.subscribe(topic, config, group_name, consumer)
        except BaseException:
            del self._subscriptions[slot]
            raise
        subscription = Subscription._create(consumer, backend_sub, self._pool, self._registry)
        self._subscriptions[slot] = subscription
        return subscription

    # -- state -----------------------------------------------------------------------------------------

    def statistics(self) -> BusStatistics:
        """A frozen snapshot of the pool and the counters."""
        c = self._counters
        pool = self._pool
        return BusStatistics(
            workers=pool.config.workers,
            queued=pool.queued(),
            in_flight=c.in_flight,
            handled=c.handled,
            retried=c.retried,
            dead_lettered=c.dead_lettered,
            dropped=c.dropped,
            parked_keys=c.parked_keys,
            connected=self._backend.connected,
            worker_queue_depths=pool.queue_depths(),
            lag=self._backend.lag(),
            evicted=self._backend.evicted(),
            recovering=self._backend.recovering(),
            lanes=pool.lanes(),
            partitions=self._backend.partitions(),
        )

    async def wait_idle(self) -> None:
        """Return once everything published so far to subscribed topics is handled (or dead-lettered).

        Waits on the bus's own state, never on a timer: bound it yourself (`with trio.fail_after(5):`). It
        also waits for retries, dead letters, and messages those handlers publish. Cancelling it changes
        nothing.
        """
        while True:
            await self._backend.wait_settled()
            await self._pool.wait_idle()
            if self._backend.settled() and not self._pool.unfinished:
                return

    async def _drain(self, drain_timeout: float) -> None:
        """Handle everything already published to subscribed topics, then stop the workers.

        Ends as soon as nothing is unfinished; at `drain_timeout` it gives up and logs what is left.
        """
        self._registry.state = "draining"
        with trio.move_on_after(drain_timeout) as scope:
            await self.wait_idle()
            async with trio.open_nursery() as nursery:
                for sub in list(self._subscriptions.values()):
                    if sub is not None:
                        nursery.start_soon(sub.stop)
            self._pool.close()
            await self._pool.done.wait()
        if scope.cancelled_caught:
            logger.warning(
                "drain_timeout (%s s) passed with %d message(s) unfinished; they stay unacked "
                "(redelivered later on persistent topics)",
                drain_timeout,
                self._pool.unfinished,
            )


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
    scheme = check_url(url)
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
    options = nats_options(user=user, password=password, token=token, credentials=credentials, tls=tls)
    counters = Counters()
    bus: Bus | None = None
    raised: BaseException | None = None  # what the block raised
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
                worker_pool.start(nursery)
                bus = Bus._create(
                    backend,
                    worker_pool,
                    counters,
                    url=shown_url(url),
                    retry=retry,
                    default_topic=default_topic,
                )
                try:
                    yield bus
                except BaseException as exc:
                    raised = exc
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
        ours: BaseExceptionGroup[BaseException] = group
        # With NATS, trio_asyncio's loop wraps our nursery's group in groups of its own: not levels of ours.
        while (
            scheme != "memory"
            and len(ours.exceptions) == 1
            and isinstance(ours.exceptions[0], BaseExceptionGroup)
            and not is_users(ours.exceptions[0], raised)
        ):
            ours = ours.exceptions[0]
        chosen = to_raise(ours, raised)
        if chosen is group:
            raise
        context = chosen.__context__
        try:
            raise chosen
        finally:
            chosen.__context__ = context
    finally:
        if bus is not None:
            bus._close()
