"""Admin: the broker-side operations an operator runs (the CLI's stats, groups and dead-letters commands)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, final, runtime_checkable

import trio

from ._errors import KeyedBusError
from ._messages import Message
from ._util import NoPublicConstructor

__all__ = ["Admin", "AdminBackend"]


@runtime_checkable
class AdminBackend(Protocol):
    """What a backend offers operators (NATS JetStream does; the embedded broker does not)."""

    async def topic_state(self, topic: str) -> dict[str, Any]:
        """The stream of a persistent topic and its consumers: stored, pending, redelivered, lag."""
        ...

    async def stored(self, topic: str) -> list[tuple[int, Message]]:
        """Every message stored for a persistent topic, with its stream sequence, oldest first."""
        ...

    async def delete_group(self, topic: str, group: str) -> bool:
        """Delete the durable consumer of (topic, group) and so its position; False if there is none."""
        ...

    def watch(self, topic: str) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Message]]:
        """Messages published to `topic` from now on, without consuming: nothing created, nothing acked."""
        ...

    async def delete_stored(self, topic: str, seq: int) -> None:
        """Remove one stored message (a replayed dead letter) from a persistent topic's stream."""

    async def jetstream_info(self) -> str:
        """A line on JetStream availability for this account, or why it is not available."""
        ...


@final
class Admin(metaclass=NoPublicConstructor):
    """Operator commands on the bus's broker: `Bus.admin`. NATS only; memory:// raises KeyedBusError."""

    __slots__ = ("_backend", "_url")

    def __init__(self, backend: object, url: str) -> None:
        self._backend = backend if isinstance(backend, AdminBackend) else None
        self._url = url

    def _nats(self, what: str) -> AdminBackend:
        if self._backend is None:
            raise KeyedBusError(
                f"{what} needs a NATS JetStream broker, not {self._url}: the embedded broker lives and dies "
                "with its bus, so there is nothing to inspect from outside; pass a nats:// URL"
            )
        return self._backend

    async def topic_state(self, topic: str) -> dict[str, Any]:
        """The stream of a persistent topic and its consumers: stored, pending, redelivered, lag."""
        return await self._nats("topic state").topic_state(topic)

    async def stored(self, topic: str) -> list[tuple[int, Message]]:
        """Every message stored for a persistent topic, with its stream sequence, oldest first."""
        return await self._nats("reading stored messages").stored(topic)

    async def delete_group(self, topic: str, group: str) -> bool:
        """Delete the durable consumer of (topic, group) and so its position; False if there is none."""
        return await self._nats("deleting a group").delete_group(topic, group)

    def watch(self, topic: str) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Message]]:
        """`async with admin.watch(topic) as messages:` the messages published to `topic` from now on,
        persistent or not, every partition included, without consuming them: nothing is created on the
        server and nothing is acked (a plain NATS subscription to the topic's subjects)."""
        return self._nats("watching a topic").watch(topic)

    async def delete_stored(self, topic: str, seq: int) -> None:
        """Remove one stored message (a replayed dead letter) from a persistent topic's stream."""
        await self._nats("deleting a stored message").delete_stored(topic, seq)

    async def jetstream_info(self) -> str:
        """A line on JetStream availability, or "built in (memory://)" on the embedded broker."""
        if self._backend is None:
            return "built in (memory://)"
        return await self._backend.jetstream_info()
