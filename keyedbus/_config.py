"""Validated, immutable configuration records: PoolConfig, RetryPolicy, TopicConfig."""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import attrs

from ._errors import ArgumentTypeError, InvalidConfigError

__all__ = ["PoolConfig", "RetryPolicy", "TopicConfig"]


def _number(*, minimum: float, inclusive: bool = True, optional: bool = False) -> Any:
    """Validator for a finite real number (never a bool) above `minimum`."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        owner = type(inst).__name__
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ArgumentTypeError(
                f"{owner}.{attribute.name} must be a number of seconds, got {type(value).__name__} {value!r}"
            )
        ok = value >= minimum if inclusive else value > minimum
        if not ok or not math.isfinite(value):
            bound = f">= {minimum}" if inclusive else f"> {minimum}"
            none = " (or None for no limit)" if optional else ""
            raise InvalidConfigError(
                f"{owner}.{attribute.name} must be finite and {bound}{none}, got {value!r}"
            )

    return check


def _integer(*, minimum: int, optional: bool = False) -> Any:
    """Validator for an int (never a bool) >= `minimum`."""

    def check(inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        owner = type(inst).__name__
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentTypeError(
                f"{owner}.{attribute.name} must be an int, got {type(value).__name__} {value!r}"
            )
        if value < minimum:
            none = " (or None for no limit)" if optional else ""
            raise InvalidConfigError(f"{owner}.{attribute.name} must be >= {minimum}{none}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class PoolConfig:
    """Size and timing of the one keyed worker pool every topic shares.

    Each key's messages run one at a time, in order; at most `workers` handlers run at once. A key belongs to
    worker ``fnv1a_32(key) % workers`` (the same in every process), whose queue is a trio memory channel of
    `queue_size` messages; the worker holds at most `queue_size` more in its per-key lanes (parked keys'
    backlog included), then stops receiving and delivery waits for room (docs/semantics.md).
    """

    #: Worker tasks, each with its memory-channel queue: the cap on handlers running at once.
    workers: int = attrs.field(default=256, validator=_integer(minimum=1))
    #: Capacity of each worker's queue, and the most a worker holds in its lanes (parked backlog included).
    queue_size: int = attrs.field(default=1000, validator=_integer(minimum=1))
    #: Seconds an ephemeral message may wait for room in a full queue before it is dropped (and counted).
    wait_timeout: float = attrs.field(default=0.5, validator=_number(minimum=0))
    #: Seconds one handler attempt may run before it is cancelled and counted as failed; None: no limit.
    handler_timeout: float | None = attrs.field(
        default=None, validator=_number(minimum=0, inclusive=False, optional=True)
    )


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How often a failing handler is retried, and how long the key waits (parked) between attempts.

    Attempt n+1 starts ``min(initial_backoff * multiplier**(n-1), max_backoff)`` seconds, varied by ±`jitter`
    (a fraction), after attempt n ended. After `max_attempts` the message is dead-lettered.
    """

    #: Total attempts including the first; 1 means no retry.
    max_attempts: int = attrs.field(default=5, validator=_integer(minimum=1))
    #: Seconds before the second attempt.
    initial_backoff: float = attrs.field(default=0.1, validator=_number(minimum=0))
    #: Upper bound on any one wait between attempts, in seconds.
    max_backoff: float = attrs.field(default=10.0, validator=_number(minimum=0))
    #: Growth factor of the wait from one attempt to the next.
    multiplier: float = attrs.field(default=2.0, validator=_number(minimum=1))
    #: Random variation of each wait, as a fraction of it (0.1 = ±10%); 0 makes waits exact.
    jitter: float = attrs.field(default=0.1, validator=_number(minimum=0))

    @max_backoff.validator
    def _check_max_backoff(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value < self.initial_backoff:
            raise InvalidConfigError(
                f"RetryPolicy.max_backoff ({value!r}) must be >= initial_backoff ({self.initial_backoff!r})"
            )

    @jitter.validator
    def _check_jitter(self, attribute: attrs.Attribute[float], value: float) -> None:
        if value > 1:
            raise InvalidConfigError(f"RetryPolicy.jitter is a fraction between 0 and 1, got {value!r}")

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based) before the next one."""
        base = min(self.initial_backoff * self.multiplier ** (attempt - 1), self.max_backoff)
        if self.jitter == 0 or base == 0:
            return base
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1 + spread))


_PERSISTENCE = ("persistent", "ephemeral")
#: The most partitions one topic may have.
MAX_PARTITIONS = 1024


@attrs.frozen(kw_only=True)
class TopicConfig:
    """How one topic is stored: persistent (JetStream stream, at-least-once) or ephemeral (core NATS).

    Limits left as None take the backend's documented default.
    """

    #: "persistent": stored, acked, redelivered; "ephemeral": fan-out with no log, at-most-once.
    persistence: Literal["persistent", "ephemeral"] = attrs.field(default="persistent")
    #: Seconds a stored message is kept at most; None: no age limit.
    max_age: float | None = attrs.field(
        default=None, validator=_number(minimum=0, inclusive=False, optional=True)
    )
    #: Bytes of message data the topic keeps at most; None: backend default.
    max_bytes: int | None = attrs.field(default=None, validator=_integer(minimum=1, optional=True))
    #: Messages the topic keeps at most; None: backend default.
    max_msgs: int | None = attrs.field(default=None, validator=_integer(minimum=1, optional=True))
    #: Stream replicas on a NATS cluster (1 on a single server).
    replicas: int = attrs.field(default=1, validator=_integer(minimum=1))
    #: Seconds JetStream waits for a settle before it redelivers a message to the group (a consumer that
    #: died); live consumers keep slow messages alive with heartbeats. memory:// has no separate consumer
    #: process to die, so it ignores this.
    ack_wait: float = attrs.field(default=30.0, validator=_number(minimum=1, inclusive=True))
    #: Partitions of a persistent topic: a keyed message goes to partition ``fnv1a_32(key) % partitions``,
    #: and the processes subscribed in one group share the partitions, each owned by one process at a time
    #: (docs/scaling.md). 1 (the default): one process of a group is active, the others stand by.
    partitions: int = attrs.field(default=1, validator=_integer(minimum=1))

    @persistence.validator
    def _check_persistence(self, attribute: attrs.Attribute[str], value: object) -> None:
        if value not in _PERSISTENCE:
            raise InvalidConfigError(
                f"TopicConfig.persistence must be 'persistent' or 'ephemeral', got {value!r}"
            )

    @partitions.validator
    def _check_partitions(self, attribute: attrs.Attribute[int], value: int) -> None:
        if value > MAX_PARTITIONS:
            raise InvalidConfigError(
                f"TopicConfig.partitions must be <= {MAX_PARTITIONS} (each is a JetStream consumer per "
                f"group), got {value!r}"
            )
        if value > 1 and self.persistence != "persistent":
            raise InvalidConfigError(
                f"TopicConfig.partitions={value} needs persistence='persistent': ephemeral topics have no "
                "stored partitions to share"
            )

    @property
    def persistent(self) -> bool:
        """True for a stored (at-least-once) topic."""
        return self.persistence == "persistent"
