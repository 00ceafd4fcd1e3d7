"""NATS core (ephemeral topics) and JetStream (persistent topics) through nats-py, bridged with trio-asyncio.

The only module that imports asyncio code. Each trio<->asyncio crossing costs tens of microseconds, so
every direction crosses once per batch: publishes are gathered by one pump task, acks by another, and
subscriptions fetch whole batches.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

import attrs
import nats
import nats.errors
import nats.js.api
import nats.js.errors
import trio
import trio_asyncio

from .._config import TopicConfig
from .._errors import ConnectionFailedError, KeyedBusError, PublishError
from .._messages import KEY_HEADER, MSG_ID_HEADER, Message
from .._pool import fnv1a_32
from ._base import AtMostOnceDelivery, Inbox
from ._urls import safe_url

__all__ = ["NatsBackend", "connect", "open_loop", "safe_url"]

logger = logging.getLogger("keyedbus")

_BATCH = 256
_FETCH_WAIT = 1.0  # seconds a pull request waits on the server for messages
#: Seconds JetStream waits for an ack before redelivering; heartbeats (in_progress) keep slow ones alive.
ACK_WAIT = 30.0
#: Unacked messages one durable consumer may have outstanding: what bounds memory on the consumer side.
MAX_ACK_PENDING = 20_000
#: Messages waiting in one core-NATS subscription before new ones are dropped (and counted).
_CORE_BUFFER = 65_536


def _name(prefix: str, text: str) -> str:
    """A JetStream name (no dots) that is unique per topic: readable part plus a stable hash."""
    return f"{prefix}_{text.replace('.', '_')[:80]}_{fnv1a_32(text):08x}"


@attrs.define(eq=False)
class _Publish:
    topic: str
    data: bytes
    headers: dict[str, str]
    persistent: bool
    done: trio.Event = attrs.field(factory=trio.Event)
    error: BaseException | None = None


@attrs.define(eq=False)
class _NatsDelivery:
    backend: NatsBackend
    raw: Any  # nats.aio.msg.Msg
    message: Message

    def ack(self) -> None:
        self.backend._settle(self, "ack")

    def term(self) -> None:
        self.backend._settle(self, "term")

    def release(self) -> None:
        # Left un-acked: JetStream redelivers it after ack_wait; stop heart-beating it.
        self.backend._outstanding.pop(id(self), None)


class _Stoppable:
    def __init__(
        self, backend: NatsBackend, scope: trio.CancelScope, stopped: trio.Event, aio_sub: Any
    ) -> None:
        self._backend = backend
        self._scope = scope
        self._stopped = stopped
        self._aio_sub = aio_sub

    async def stop(self) -> None:
        self._scope.cancel()
        await self._stopped.wait()

    async def detach(self) -> None:
        # Un-acked messages return to the durable consumer by themselves (ack_wait); drop the client side.
        try:
            await trio_asyncio.aio_as_trio(self._aio_sub.unsubscribe)()
        except Exception as exc:  # the connection may be gone; the server forgets the interest then too
            logger.debug("unsubscribe failed: %s", exc)


class NatsBackend:
    """A nats-py connection driven from trio; see the module docstring for the bridge design."""

    def __init__(self, nc: Any, nursery: trio.Nursery, url: str) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._nursery = nursery
        self._url = url
        self._streams: set[str] = set()
        self._stream_lock = trio.Lock()
        self._pub_send, self._pub_recv = trio.open_memory_channel[_Publish](4096)
        self._settle_queue: list[tuple[_NatsDelivery, str]] = []
        self._settle_wakeup = trio.Event()
        self._outstanding: dict[int, _NatsDelivery] = {}
        self.closing = False

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    async def start(self) -> None:
        self._nursery.start_soon(self._publish_pump)
        self._nursery.start_soon(self._settle_pump)
        self._nursery.start_soon(self._heartbeat)

    # -- topics -------------------------------------------------------------------------------------------

    async def configure_topic(self, topic: str, config: TopicConfig) -> None:
        if config.persistent:
            await self._ensure_stream(topic, config, update=True)

    async def _ensure_stream(self, topic: str, config: TopicConfig, *, update: bool = False) -> str:
        name = _name("KB", topic)
        if name in self._streams and not update:
            return name
        async with self._stream_lock:
            if name in self._streams and not update:
                return name
            stream = nats.js.api.StreamConfig(
                name=name,
                subjects=[topic],
                max_age=config.max_age,
                max_bytes=config.max_bytes or -1,
                max_msgs=config.max_msgs or -1,
                num_replicas=config.replicas,
                duplicate_window=120.0,
                storage=nats.js.api.StorageType.FILE,
            )
            try:
                await trio_asyncio.aio_as_trio(self._add_or_update_stream)(stream)
            except nats.errors.Error as exc:
                raise KeyedBusError(
                    f"could not create the JetStream stream for topic {topic!r}: {exc}"
                ) from exc
            self._streams.add(name)
        return name

    async def _add_or_update_stream(self, stream: Any) -> None:
        try:
            await self._js.add_stream(stream)
        except nats.js.errors.BadRequestError:
            await self._js.update_stream(stream)

    # -- publishing -----------------------------------------------------------------------------------

    async def publish(
        self, topic: str, config: TopicConfig, data: bytes, headers: dict[str, str], message_id: str
    ) -> None:
        if config.persistent:
            await self._ensure_stream(topic, config)
            headers = {**headers, MSG_ID_HEADER: message_id}
        request = _Publish(topic, data, headers, config.persistent)
        await self._pub_send.send(request)
        await request.done.wait()
        if request.error is not None:
            raise request.error

    def publish_nowait(
        self, topic: str, config: TopicConfig, data: bytes, headers: dict[str, str], message_id: str
    ) -> None:
        if config.persistent:
            raise KeyedBusError(
                f"publish_nowait cannot wait for JetStream's store ack on persistent topic {topic!r}: "
                "use 'await bus.publish(...)'"
            )
        self._pub_send.send_nowait(_Publish(topic, data, headers, False))

    async def _publish_pump(self) -> None:
        """Cross into asyncio once per batch of publishes; JetStream publishes in a batch are pipelined."""
        async for first in self._pub_recv:
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._pub_recv.receive_nowait())
                except trio.WouldBlock:
                    break
            errors = await trio_asyncio.aio_as_trio(self._aio_publish)(batch)
            for request, error in zip(batch, errors, strict=True):
                request.error = error
                request.done.set()

    async def _aio_publish(self, batch: list[_Publish]) -> list[BaseException | None]:
        errors: list[BaseException | None] = [None] * len(batch)
        pending: list[tuple[int, Any]] = []
        for index, request in enumerate(batch):
            try:
                if request.persistent:
                    pending.append(
                        (index, self._js.publish(request.topic, request.data, headers=request.headers))
                    )
                else:
                    await self._nc.publish(request.topic, request.data, headers=request.headers or None)
            except Exception as exc:
                errors[index] = _publish_error(request.topic, exc)
        if pending:
            results = await asyncio.gather(*(c for _, c in pending), return_exceptions=True)
            for (index, _), result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    errors[index] = _publish_error(batch[index].topic, result)
        else:
            await self._nc.flush()
        return errors

    # -- subscribing ----------------------------------------------------------------------------------

    async def subscribe(self, topic: str, config: TopicConfig, group: str, inbox: Inbox) -> _Stoppable:
        scope = trio.CancelScope()
        stopped = trio.Event()
        if config.persistent:
            stream = await self._ensure_stream(topic, config)
            durable = _name("KBC", f"{topic}.{group or 'default'}")
            consumer = nats.js.api.ConsumerConfig(
                durable_name=durable,
                ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT,
                max_ack_pending=MAX_ACK_PENDING,
                deliver_policy=nats.js.api.DeliverPolicy.ALL,
            )
            psub = await trio_asyncio.aio_as_trio(self._js.pull_subscribe)(
                topic, durable=durable, stream=stream, config=consumer
            )
            await self._nursery.start(self._pull_reader, topic, psub, inbox, scope, stopped)
            return _Stoppable(self, scope, stopped, psub)
        state = _CoreState()
        sub = await trio_asyncio.aio_as_trio(self._aio_core_subscribe)(topic, group, state)
        await self._nursery.start(self._core_reader, topic, state, inbox, scope, stopped)
        return _Stoppable(self, scope, stopped, sub)

    async def _aio_core_subscribe(self, topic: str, group: str, state: _CoreState) -> Any:
        sub = await self._nc.subscribe(topic, queue=group, cb=state.on_message)
        await self._nc.flush()  # the server knows the interest before subscribe returns
        return sub

    async def _core_reader(
        self,
        topic: str,
        state: _CoreState,
        inbox: Inbox,
        scope: trio.CancelScope,
        stopped: trio.Event,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with scope:
                task_status.started()
                while True:
                    raw, dropped = await trio_asyncio.aio_as_trio(state.take)()
                    if dropped:
                        inbox.dropped(dropped, "the subscription's buffer was full")
                    await inbox.deliver([AtMostOnceDelivery(_message(topic, m, 1)) for m in raw])
        finally:
            stopped.set()

    async def _pull_reader(
        self,
        topic: str,
        psub: Any,
        inbox: Inbox,
        scope: trio.CancelScope,
        stopped: trio.Event,
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            with scope:
                task_status.started()
                while True:
                    raw = await trio_asyncio.aio_as_trio(_aio_fetch)(psub)
                    batch = []
                    for m in raw:
                        delivery = _NatsDelivery(self, m, _message(topic, m, m.metadata.num_delivered))
                        self._outstanding[id(delivery)] = delivery
                        batch.append(delivery)
                    await inbox.deliver(batch)
        finally:
            stopped.set()

    # -- settling -------------------------------------------------------------------------------------

    def _settle(self, delivery: _NatsDelivery, how: str) -> None:
        self._outstanding.pop(id(delivery), None)
        self._settle_queue.append((delivery, how))
        self._settle_wakeup.set()

    async def _settle_pump(self) -> None:
        while True:
            await self._settle_wakeup.wait()
            self._settle_wakeup = trio.Event()
            batch, self._settle_queue = self._settle_queue, []
            await trio_asyncio.aio_as_trio(_aio_settle)(batch)

    async def _heartbeat(self) -> None:
        """Tell JetStream that queued, parked and running messages are still being worked on."""
        while True:
            await trio.sleep(ACK_WAIT / 3)
            alive = [d.raw for d in self._outstanding.values()]
            if alive:
                await trio_asyncio.aio_as_trio(_aio_in_progress)(alive)

    def settled(self) -> bool:
        return True

    async def wait_settled(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send the acks still queued, then close the connection (bounded, shielded)."""
        self.closing = True
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                if self._settle_queue:
                    batch, self._settle_queue = self._settle_queue, []
                    await trio_asyncio.aio_as_trio(_aio_settle)(batch)
                await trio_asyncio.aio_as_trio(self._nc.close)()
            except Exception as exc:
                logger.warning("closing the NATS connection to %s failed: %s", safe_url(self._url), exc)


class _CoreState:
    """The asyncio side of one core subscription: a bounded buffer the trio reader empties in batches."""

    def __init__(self) -> None:
        self.buffer: deque[Any] = deque()
        self.dropped = 0
        self.event = asyncio.Event()

    async def on_message(self, msg: Any) -> None:
        if len(self.buffer) >= _CORE_BUFFER:
            self.dropped += 1
            return
        self.buffer.append(msg)
        self.event.set()

    async def take(self) -> tuple[list[Any], int]:
        await self.event.wait()
        self.event.clear()
        batch = list(self.buffer)
        self.buffer.clear()
        dropped, self.dropped = self.dropped, 0
        return batch, dropped


def _message(topic: str, raw: Any, attempt: int) -> Message:
    headers = dict(raw.headers or {})
    return Message(
        topic=topic,
        data=raw.data,
        key=headers.get(KEY_HEADER),
        headers=headers,
        attempt=attempt,
        message_id=headers.get(MSG_ID_HEADER, ""),
    )


async def _aio_fetch(psub: Any) -> list[Any]:
    try:
        return list(await psub.fetch(_BATCH, timeout=_FETCH_WAIT))
    except nats.errors.TimeoutError:
        return []


async def _aio_settle(batch: list[tuple[_NatsDelivery, str]]) -> None:
    for delivery, how in batch:
        try:
            await (delivery.raw.ack() if how == "ack" else delivery.raw.term())
        except Exception as exc:  # a lost ack means a redelivery (attempt > 1), never a loss
            logger.warning("could not %s message %s: %s", how, delivery.message.message_id, exc)


async def _aio_in_progress(raws: list[Any]) -> None:
    for raw in raws:
        try:
            await raw.in_progress()
        except Exception as exc:
            logger.debug("in_progress failed: %s", exc)


def _publish_error(topic: str, exc: BaseException) -> KeyedBusError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return PublishError(f"message for {topic!r} is larger than the server's max_payload: {exc}")
    return PublishError(f"the broker did not store a message for {topic!r}: {type(exc).__name__}: {exc}")


def open_loop() -> Any:
    """The trio-asyncio loop every nats-py call runs on; open it outside the bus's nursery."""
    return trio_asyncio.open_loop()


async def connect(
    url: str, nursery: trio.Nursery, *, connect_timeout: float, options: dict[str, Any]
) -> NatsBackend:
    """Connect to the NATS servers in `url` and start the pumps in `nursery`.

    Raises ConnectionFailedError naming the servers (never the credentials) when none answers within
    `connect_timeout` seconds or the server refuses the connection.
    """
    shown = safe_url(url)
    servers = [s.strip() for s in url.split(",")]

    async def on_error(exc: Exception) -> None:
        logger.warning("NATS connection to %s: %s", shown, type(exc).__name__)

    async def on_disconnect() -> None:
        if backend is None or not backend.closing:
            logger.warning("disconnected from NATS at %s; reconnecting", shown)

    async def on_reconnect() -> None:
        logger.warning("reconnected to NATS at %s", shown)

    backend: NatsBackend | None = None
    nc: Any = None
    with trio.move_on_after(connect_timeout):
        try:
            nc = await trio_asyncio.aio_as_trio(nats.connect)(
                servers=servers,
                connect_timeout=min(connect_timeout, 2.0),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                **options,
            )
        except (nats.errors.Error, OSError) as exc:
            raise ConnectionFailedError(
                f"could not connect to NATS at {shown}: {type(exc).__name__}; check the address, "
                "that nats-server runs there, and the credentials"
            ) from None
    if nc is None:
        raise ConnectionFailedError(
            f"no NATS server answered at {shown} within connect_timeout={connect_timeout} s: check the "
            "address and that nats-server runs there"
        )
    backend = NatsBackend(nc, nursery, url)
    await backend.start()
    return backend
