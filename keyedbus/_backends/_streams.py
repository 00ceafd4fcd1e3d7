"""JetStream streams and consumers: create what does not exist, respect what an operator made.

Rules (docs/nats.md, "Streams and consumers that already exist"):
- A persistent topic is stored in keyedbus's own stream `KB_...` if it exists, else in any stream whose
  subjects capture the topic (an operator's `billing.>` stream serves `billing.invoice`), else in a new
  `KB_...` stream keyedbus creates with the topic's TopicConfig.
- On a stream or consumer that exists, keyedbus changes only the settings the caller set explicitly with
  `configure_topic` (those that differ from TopicConfig's defaults), logging each change as old -> new.
  publish and subscribe never change anything that exists.
- A consumer under keyedbus's name that cannot work the way keyedbus needs (ack policy other than explicit,
  a push consumer, deliver policy new/last, another filter subject) is a TopicConfigConflictError naming the
  setting; JetStream's own refusals are reported with the server's reason and code.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import attrs
import nats.errors
import nats.js.api
import nats.js.errors
import trio

from .._config import TopicConfig
from .._errors import KeyedBusError, TopicConfigConflictError
from .._pool import fnv1a_32
from . import _natspy, _scaleout
from ._aio import aio
from ._connection import NatsConnection

__all__ = [
    "DUPLICATE_WINDOW",
    "MAX_ACK_PENDING",
    "StreamInfo",
    "Streams",
    "consumer_config",
    "consumer_name",
    "explicit_settings",
    "group_of",
    "open_consumer",
    "stream_config",
    "stream_name",
]

logger = logging.getLogger("keyedbus")

#: Unacked messages one durable consumer may have outstanding: what bounds memory on the consumer side.
MAX_ACK_PENDING = 20_000
#: Seconds during which a message id seen before is not stored again.
DUPLICATE_WINDOW = 120.0
#: TopicConfig fields that map to stream settings, with the stream field and how the server writes "none".
_STREAM_FIELDS = {
    "max_age": "max_age",
    "max_bytes": "max_bytes",
    "max_msgs": "max_msgs",
    "replicas": "num_replicas",
}
_DEFAULTS = TopicConfig()


def _name(prefix: str, text: str) -> str:
    """A JetStream name (no dots) unique per text: a readable part plus a stable hash."""
    return f"{prefix}_{text.replace('.', '_')[:80]}_{fnv1a_32(text):08x}"


def stream_name(topic: str) -> str:
    """The stream keyedbus creates for `topic` (its only subject is the topic)."""
    return _name("KB", topic)


def consumer_name(topic: str, group: str, partition: int | None = None) -> str:
    """The durable pull consumer of (topic, group), or of one partition of it (``..._p<n>``); the default
    group is called "default"."""
    name = _name("KBC", f"{topic}.{group or 'default'}")
    return name if partition is None else f"{name}_p{partition}"


def group_of(topic: str, consumer: str) -> str | None:
    """The group whose durable consumer on `topic` is named `consumer` ("" for the default group), or None
    when the name is not one keyedbus gives (or too long to read the group back from)."""
    prefix = f"KBC_{topic.replace('.', '_')}_"
    partition = _scaleout.partition_of_consumer(consumer)
    if partition is not None:
        consumer = consumer[: -len(f"_p{partition}")]
    readable = consumer.rpartition("_")[0]
    if not readable.startswith(prefix):
        return None
    group = readable[len(prefix) :]
    for candidate in (group, "") if group == "default" else (group,):
        if consumer_name(topic, candidate) == consumer:
            return candidate
    return None


def stream_config(topic: str, config: TopicConfig) -> Any:
    """The StreamConfig keyedbus creates for `topic`: file storage, limits from `config`, a 120 s duplicate
    window, and discard old (a limit the user set evicts the oldest; the pull reader counts what it never
    saw, see PullSubscription)."""
    return nats.js.api.StreamConfig(
        name=stream_name(topic),
        subjects=_scaleout.stream_subjects(topic, config.partitions),
        max_age=config.max_age,
        max_bytes=config.max_bytes or -1,
        max_msgs=config.max_msgs or -1,
        num_replicas=config.replicas,
        duplicate_window=DUPLICATE_WINDOW,
        storage=nats.js.api.StorageType.FILE,
        discard=nats.js.api.DiscardPolicy.OLD,
    )


def explicit_settings(config: TopicConfig) -> dict[str, Any]:
    """The settings a configure_topic call sets explicitly: those that differ from TopicConfig's defaults."""
    return {
        field: getattr(config, field)
        for field in (*_STREAM_FIELDS, "ack_wait", "partitions")
        if getattr(config, field) != getattr(_DEFAULTS, field)
    }


def _server_value(field: str, value: Any) -> Any:
    """A TopicConfig value as the stream config holds it (None limits are 0 or -1 on the server)."""
    if field == "max_age":
        return float(value or 0)
    if field in ("max_bytes", "max_msgs"):
        return -1 if value is None else int(value)
    return value


def _shown(value: Any) -> str:
    return "unlimited" if value in (None, -1, 0, 0.0) else str(value)


@attrs.frozen
class StreamInfo:
    """The stream a topic is stored in."""

    name: str
    subjects: tuple[str, ...]
    #: True if it has keyedbus's name (keyedbus created it, or would have).
    ours: bool
    #: When the server created it: a stream deleted and created again under the same name differs here.
    created: str = ""

    def filter_for(self, topic: str) -> str | None:
        """The consumer filter subject `topic` needs on this stream (None if the stream holds only it)."""
        return None if self.subjects == (topic,) else topic

    def partitions(self, topic: str) -> int:
        """How many partitions `topic` has here: P for keyedbus's layout of P subjects, else 1."""
        return _scaleout.partitions_of_subjects(topic, self.subjects) or 1


def _refusal(exc: BaseException) -> str:
    """The server's own reason, with its error code."""
    if isinstance(exc, nats.js.errors.APIError):
        return f"{exc.description or type(exc).__name__} (err {exc.err_code}, status {exc.code})"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _hint(exc: BaseException) -> str:
    code = getattr(exc, "err_code", None)
    if code == 10065:
        return (
            "another stream's subjects overlap the topic without capturing it: add the topic to that "
            "stream's subjects, or remove the overlap, then try again"
        )
    if isinstance(exc, (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError)):
        return "check that nats-server runs with JetStream enabled (-js)"
    if isinstance(exc, nats.errors.TimeoutError):
        return "the server did not answer in time: check the connection and the server's load"
    return "check the server's JetStream limits and this account's permissions"


class Streams:
    """The streams persistent topics are stored in, on one connection: looked up or created on first use."""

    def __init__(self, conn: NatsConnection) -> None:
        self._conn = conn
        self._known: dict[str, StreamInfo] = {}
        self._lock = trio.Lock()

    def known(self, topic: str) -> StreamInfo | None:
        """The stream `topic` was found in (None before its first use)."""
        return self._known.get(topic)

    def name_of(self, topic: str) -> str:
        """The name of the stream `topic` is stored in (keyedbus's name before its first use)."""
        info = self._known.get(topic)
        return info.name if info is not None else stream_name(topic)

    def forget(self, topic: str) -> None:
        """Look the stream up again on next use (it was deleted, or the server lost its store)."""
        self._known.pop(topic, None)

    async def ensure(
        self, topic: str, config: TopicConfig, *, explicit: dict[str, Any] | None = None
    ) -> StreamInfo:
        """The stream that stores `topic`: found by name or by subject, else created from `config`.

        `explicit` (from configure_topic) names the settings to change on a stream that exists; publish and
        subscribe pass None and change nothing. Raises KeyedBusError with the server's reason if the stream
        can be neither found nor created.
        """
        info = self._known.get(topic)
        if info is not None and not explicit:
            return info
        async with self._lock:
            info = self._known.get(topic)
            if info is not None and not explicit:
                return info
            try:
                info = await aio(self._aio_ensure)(topic, config, explicit or {})
                assert isinstance(info, StreamInfo)
            except nats.errors.Error as exc:
                raise KeyedBusError(
                    f"no JetStream stream for topic {topic!r}: the server refused ({_refusal(exc)}); "
                    f"{_hint(exc)}"
                ) from exc
            self._known[topic] = info
            return info

    async def _aio_ensure(self, topic: str, config: TopicConfig, explicit: dict[str, Any]) -> StreamInfo:
        js = self._conn.js
        existing = await self.aio_find(topic)
        if existing is None:
            try:
                created = await js.add_stream(stream_config(topic, config))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # 10058: created meanwhile by another process; use that one
                    raise
                existing = await js.stream_info(stream_name(topic))
            else:
                logger.info("created JetStream stream %s for topic %s", created.config.name, topic)
                return StreamInfo(
                    created.config.name, tuple(created.config.subjects or ()), True, str(created.created)
                )
        current = existing.config
        ours = current.name == stream_name(topic)
        if not ours and not explicit:
            logger.info(
                "topic %s is stored in the existing stream %s (subjects %s)",
                topic,
                current.name,
                ", ".join(current.subjects or ()),
                extra={"topic": topic},
            )
        changes = {}
        for field, stream_field in _STREAM_FIELDS.items():
            if field in explicit:
                old, new = getattr(current, stream_field), _server_value(field, explicit[field])
                if old != new:
                    changes[stream_field] = (old, new)
        wanted = explicit.get("partitions", 1)
        found = _scaleout.partitions_of_subjects(topic, current.subjects or ())
        if "partitions" in explicit and ours and found is not None and found != wanted:
            changes["subjects"] = (current.subjects, _scaleout.stream_subjects(topic, wanted))
            logger.warning(
                "topic %s: partitions change from %d to %d; keys move between partitions, so every group "
                "should have drained first (docs/scaling.md)",
                topic,
                found,
                wanted,
                extra={"topic": topic},
            )
        if changes:
            current = dataclasses.replace(current, **{k: new for k, (_, new) in changes.items()})
            await js.update_stream(current)
            for stream_field, (old, new) in changes.items():
                logger.warning(
                    "stream %s of topic %s: %s changed %s -> %s (set with configure_topic)",
                    current.name,
                    topic,
                    stream_field,
                    _shown(old),
                    _shown(new),
                    extra={"topic": topic},
                )
        return StreamInfo(current.name, tuple(current.subjects or ()), ours, str(existing.created))

    async def aio_find(self, topic: str) -> Any:
        """The stream info of keyedbus's stream for `topic`, else of a stream capturing it, else None."""
        js = self._conn.js
        try:
            return await js.stream_info(stream_name(topic))
        except nats.js.errors.NotFoundError:
            pass
        try:
            name = await js.find_stream_name_by_subject(topic)
        except nats.js.errors.NotFoundError:
            return None
        return await js.stream_info(name)


def consumer_config(
    durable: str, config: TopicConfig, filter_subject: str | None, start_seq: int | None = None
) -> dict[str, Any]:
    """The durable pull consumer keyedbus creates: explicit acks, deliver all (or from `start_seq`, when it
    replaces one that vanished), ack_wait from `config`, and the pinned_client priority group that keeps it
    to one reading process at a time (see `_scaleout`).

    JSON for the raw API: nats-py's ConsumerConfig has no priority groups.
    """
    return _scaleout.consumer_config(
        name=durable,
        filter_subject=filter_subject,
        ack_wait=config.ack_wait,
        max_ack_pending=MAX_ACK_PENDING,
        start_seq=start_seq,
    )


def _incompatibility(current: Any, topic: str, expected: str | None) -> str | None:
    """Why an existing consumer cannot serve keyedbus (None if it can)."""
    ack = current.ack_policy
    if ack != nats.js.api.AckPolicy.EXPLICIT:
        return (
            f"ack_policy is {getattr(ack, 'value', ack)!r}, and keyedbus settles each message itself "
            "(ack_policy 'explicit'), so it could neither retry nor hand back a message"
        )
    if current.deliver_subject:
        return f"it is a push consumer (deliver_subject {current.deliver_subject!r}); keyedbus pulls"
    policy = current.deliver_policy
    if policy in (
        nats.js.api.DeliverPolicy.NEW,
        nats.js.api.DeliverPolicy.LAST,
        nats.js.api.DeliverPolicy.LAST_PER_SUBJECT,
    ):
        return (
            f"deliver_policy is {getattr(policy, 'value', policy)!r}, so messages stored before it was "
            "created are never "
            "delivered; keyedbus needs 'all' (or a start sequence or time an operator chose)"
        )
    filters = [f for f in (current.filter_subject, *(current.filter_subjects or ())) if f]
    if filters and (expected or topic) not in filters:
        return f"its filter subject is {', '.join(filters)!r}, not {expected or topic!r}"
    return None


async def open_consumer(
    js: Any,
    stream: str,
    durable: str,
    topic: str,
    config: TopicConfig,
    explicit: dict[str, Any],
    filter_subject: str | None,
    start_seq: int | None = None,
) -> Any:
    """Create the durable consumer, or check and use the existing one; return its info (asyncio side).

    On an existing consumer only `ack_wait` in `explicit` is changed (logged old -> new). Raises
    TopicConfigConflictError naming the setting if the existing consumer cannot work for keyedbus.
    """
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        info = None
    if info is None:
        nc, prefix = _natspy.client_of(js), _natspy.api_prefix(js)
        # Created meanwhile by another process (with other settings, say): that one is used.
        made = consumer_config(durable, config, filter_subject, start_seq)
        await _scaleout.aio_create_consumer(nc, prefix, stream, made)
        return await js.consumer_info(stream, durable)
    why = _incompatibility(info.config, topic, filter_subject)
    if why is not None:
        raise TopicConfigConflictError(
            f"the existing JetStream consumer {durable} on stream {stream} cannot be used for topic "
            f"{topic!r}: {why}; delete it (nats consumer rm {stream} {durable}) to let keyedbus create "
            "its own, or subscribe with another group"
        )
    wanted = explicit.get("ack_wait")
    if wanted is not None and float(info.config.ack_wait or 0) != float(wanted):
        old = info.config.ack_wait
        # Through the raw API: nats-py's ConsumerConfig would drop the priority group settings.
        await _scaleout.aio_update_consumer(
            _natspy.client_of(js),
            _natspy.api_prefix(js),
            stream,
            durable,
            {"ack_wait": int(float(wanted) * 1e9)},
        )
        logger.warning(
            "consumer %s of topic %s: ack_wait changed %s -> %s (set with configure_topic)",
            durable,
            topic,
            old,
            float(wanted),
            extra={"topic": topic},
        )
        info = await js.consumer_info(stream, durable)
    return info
