"""BusStatistics, the frozen snapshot `Bus.statistics()` returns, and the mutable counters behind it."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

__all__ = ["BusStatistics", "Counters"]


@attrs.frozen(kw_only=True, repr=False)
class BusStatistics:
    """A snapshot of the bus's pool and counters; counters are totals since the bus opened.

    Its repr (and str) is a one-line summary: the totals and the busiest shards, not every shard's depth.
    """

    #: Worker tasks in the pool (and worker queues: one memory channel each).
    workers: int
    #: Messages waiting: in the worker queues, or received by a worker and not running (ready, parked
    #: behind a failing key, or between retries).
    queued: int
    #: Handlers running now.
    in_flight: int
    #: Messages whose handler succeeded (each counted once, before its ack).
    handled: int
    #: Failed attempts that will be retried.
    retried: int
    #: Messages sent to a dead-letter topic.
    dead_lettered: int
    #: Ephemeral messages dropped: no room in a worker queue within `wait_timeout`, a full subscriber buffer,
    #: or taken from the broker by a subscription that stopped before queueing them.
    dropped: int
    #: Keys parked now, waiting for a retry.
    parked_keys: int
    #: Whether the backend can reach its broker now.
    connected: bool
    #: Messages in each worker's queue (its memory channel's buffer, from the channel's own statistics()),
    #: by worker index (`fnv1a_32(key) % workers`).
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
    #: Per-key lanes alive now (keys with a message received by a worker and not yet settled).
    lanes: int = 0
    #: The partitions this process reads now, per persistent (topic, group) subscription on JetStream
    #: (group None: the default group); () while another process of the group reads them (docs/scaling.md).
    partitions: Mapping[tuple[str, str | None], tuple[int, ...]] = attrs.field(factory=dict)

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


@attrs.define
class Counters:
    """Mutable totals behind `Bus.statistics()`, shared by the pool and the subscriptions."""

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    dropped: int = 0
    in_flight: int = 0
    parked_keys: int = 0
