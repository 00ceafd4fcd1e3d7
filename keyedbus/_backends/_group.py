"""One process's membership in a (topic, group) on JetStream: a consumer per partition, read while owned.

See `_scaleout` for the design: the server's pinned_client priority group keeps each partition to one
reader at a time; the heartbeat records decide which partitions this process reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from .._config import TopicConfig
from . import _scaleout
from ._aio import aio
from ._base import Inbox
from ._connection import NatsConnection
from ._streams import StreamInfo, Streams
from .jetstream import PullSubscription, consumer_name

__all__ = ["GroupSubscription"]

logger = logging.getLogger("keyedbus")


def _ranges(partitions: tuple[int, ...]) -> str:
    """'0-3, 7' for (0, 1, 2, 3, 7); 'none' for ()."""
    if not partitions:
        return "none"
    spans: list[list[int]] = []
    for p in partitions:
        if spans and p == spans[-1][1] + 1:
            spans[-1][1] = p
        else:
            spans.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


class GroupSubscription:
    """This process's subscription to (topic, group): reads the partitions membership gives it."""

    def __init__(
        self,
        conn: NatsConnection,
        topic: str,
        config: TopicConfig,
        group: str,
        inbox: Inbox,
        *,
        stream: StreamInfo,
        streams: Streams,
        on_detach: Callable[[GroupSubscription], None],
        explicit: dict[str, Any] | None = None,
    ) -> None:
        """`config.partitions` must be what `stream` has (see `StreamInfo.partitions`)."""
        self.conn = conn
        self.topic = topic
        self.group = group
        self.count = config.partitions
        self._on_detach = on_detach
        self.parts = [
            PullSubscription(
                conn,
                topic,
                config,
                group,
                inbox,
                stream=stream,
                streams=streams,
                on_detach=lambda sub: None,
                explicit=explicit,
                partition=None if self.count == 1 else p,
            )
            for p in range(self.count)
        ]
        self.membership = _scaleout.Membership(conn.js, consumer_name(topic, group))
        #: The partitions this process reads now.
        self.owned: tuple[int, ...] = ()
        #: The group's members as last read (this one included).
        self.members: tuple[str, ...] = ()
        self._next_check: dict[int, float] = {}
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    @property
    def name(self) -> str:
        return f"{self.topic} (group {self.group or 'default'})"

    @property
    def reading(self) -> tuple[int, ...]:
        """The partitions this process may be handed messages of now (`statistics().partitions`): those it
        owns, and those it gave up whose last pull request has not ended yet."""
        return tuple(p for p, sub in enumerate(self.parts) if sub.reading)

    @property
    def lag(self) -> int:
        return sum(sub.lag for sub in self.parts if sub.active)

    @property
    def recovering(self) -> int:
        """Partitions whose consumer vanished and is being recreated now."""
        return sum(sub.recovering for sub in self.parts)

    # -- starting and membership ---------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Create the partitions' consumers, join the group, start reading this process's share."""
        for sub in self.parts:
            await sub.start(nursery, active=False)
        try:
            await self._tick()
        except Exception as exc:
            # Without membership every member reads every partition; the pins still keep them apart.
            logger.warning(
                "%s: could not join the group's membership (%s: %s); reading every partition until it can",
                self.name,
                type(exc).__name__,
                exc,
                extra={"topic": self.topic},
            )
            self._own(tuple(range(self.count)), (self.membership.member,))
        await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with self._scope:
                task_status.started()
                # Members started together (a deployment's replicas) may each have seen only itself when
                # it joined: look again soon, so the first one hands the others their shares at once.
                await _scaleout.sleep_jittered(_scaleout.HEARTBEAT / 4)
                while True:
                    try:
                        await self._tick()
                    except Exception as exc:  # disconnected: keep what we read, the pins keep order
                        logger.debug("%s: membership round failed: %s", self.name, exc)
                    await _scaleout.sleep_jittered(_scaleout.HEARTBEAT)
        finally:
            self._stopped.set()

    async def _tick(self) -> None:
        """One heartbeat: write our record, read the group's, take our share, claim what we now own."""
        members = tuple(await self.membership.beat(self.owned))
        target = tuple(_scaleout.assigned(self.membership.member, members, self.count))
        changed = target != self.owned
        self._own(target, members)
        if changed:
            await self.membership.beat(self.owned)  # the record says at once what this process reads
        await self._claim()

    def _own(self, target: tuple[int, ...], members: tuple[str, ...]) -> None:
        if target == self.owned:
            if members != self.members:
                self.members = members
                # Views differ while membership changes: look again at whom our partitions are pinned to.
                self._next_check = dict.fromkeys(self.owned, 0.0)
            return
        now = trio.current_time()
        for p in set(self.owned) - set(target):
            self.parts[p].set_active(False)
            self._next_check.pop(p, None)
        for p in set(target) - set(self.owned):
            self.parts[p].set_active(True)
            self._next_check[p] = now + _scaleout.TAKEOVER_GRACE
        logger.info(
            "%s: this process (member %s of %d) now reads partition(s) %s of %d",
            self.name,
            self.membership.member,
            len(members),
            _ranges(target),
            self.count,
            extra={"topic": self.topic},
        )
        self.owned, self.members = target, members

    async def _claim(self) -> None:
        """Unpin our partitions still pinned to another reader once it had time to let them go."""
        now = trio.current_time()
        for p in self.owned:
            sub = self.parts[p]
            if sub.puller.pin is not None or now < self._next_check.get(p, now + 1):
                continue
            self._next_check[p] = now + _SETTLED_CHECK
            info = await aio(sub.puller.info)()
            holder = _scaleout.pinned_id(info)
            if holder is None or holder == sub.puller.pin:
                continue
            await aio(sub.puller.unpin)()
            self._next_check[p] = now + _scaleout.TAKEOVER_GRACE
            logger.info(
                "%s: partition %d was still pinned to its previous reader; unpinned it for this process",
                self.name,
                p,
                extra={"topic": self.topic},
            )

    # -- the subscription interface the backend uses ---------------------------------------------------

    async def stop(self) -> None:
        """Stop reading and leave the group: the others take our partitions over at once."""
        self._scope.cancel()
        await self._stopped.wait()
        async with trio.open_nursery() as nursery:
            for sub in self.parts:
                nursery.start_soon(sub.stop)
        with trio.move_on_after(2):
            try:
                await self.membership.leave()
                for sub in self.parts:
                    if sub.puller.pin is not None:
                        await aio(sub.puller.unpin)()
            except Exception as exc:  # the connection may be gone: our record expires, pins time out
                logger.debug("%s: leaving the group failed: %s", self.name, exc)
        self.owned = ()

    async def detach(self) -> None:
        """Hand every unsettled message back to the group, oldest first per partition."""
        self._on_detach(self)
        for sub in self.parts:
            await sub.detach()

    async def caught_up(self) -> bool:
        return all([await sub.caught_up() for sub in self.parts])

    def drain_checked(self) -> None:
        """The drain check is over: every partition's reader reads on."""
        for sub in self.parts:
            sub.drain_checked()

    def idle(self) -> bool:
        return all(sub.idle() for sub in self.parts)

    def unsettled(self) -> list[Any]:
        return [raw for sub in self.parts for raw in sub.unsettled()]


#: Seconds between looks at who holds the pin of a partition we own but have no pin for.
_SETTLED_CHECK = 5.0
