"""Scale-out on JetStream: the subjects of a partitioned topic, who owns which partition, and the pins.

Every (topic, group) has one durable pull consumer per partition, created with JetStream's priority group
policy `pinned_client`: the server delivers a partition's messages to one pull request id at a time (the
"pin", sent back in the `Nats-Pin-Id` header), whoever else pulls. That, not anything of ours, is what
keeps two processes from reading one partition at once. On top of it, membership decides who *should*
pull which partition, so the partitions spread evenly: each member process writes a heartbeat record in
the JetStream key-value bucket `keyedbus-members` (the bucket's max age expires the record of a member
that died), every member lists the group's records, sorts them (by join time) and takes a contiguous range
of partitions. Members pull only the partitions assigned to them. When the assignment moves a partition,
its new owner asks the server to unpin the old one (`$JS.API.CONSUMER.UNPIN`) once the old owner had a
chance to let go; the old owner stops pulling, hands back what it fetched but never queued, and finishes
what it had queued.

Safety never depends on membership being right: two members that both believe they own a partition both
pull, and the server still delivers to one pin. What a new pin holder must do is what a restarted
consumer does (see `jetstream`): read the consumer's ack floor and delivered sequence and hold every key
still owed an earlier message until that message is settled or redelivered.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

from .._pool import fnv1a_32
from ._aio import aio

__all__ = [
    "HEARTBEAT",
    "MEMBER_BUCKET",
    "MEMBER_TTL",
    "PRIORITY_GROUP",
    "TAKEOVER_GRACE",
    "MemberRecord",
    "Membership",
    "assigned",
    "partition_of_consumer",
    "new_member_id",
    "partition_of",
    "partition_subject",
    "partitions_of_subjects",
    "stream_subjects",
]

logger = logging.getLogger("keyedbus")

#: The priority group every keyedbus partition consumer declares (JetStream needs a name).
PRIORITY_GROUP = "keyedbus"
#: Seconds between a member's heartbeats (and its looks at the group's membership).
HEARTBEAT = 1.0
#: Seconds after its last heartbeat a member counts as gone (the bucket's max age).
MEMBER_TTL = 6.0
#: Seconds a new owner lets the previous one give a partition up before it asks the server to unpin it.
TAKEOVER_GRACE = 2.0
#: Seconds without a pull from the pinned member after which the server itself moves the pin: the backstop
#: when membership cannot be read. A pinned member pulls at least every second while it is not blocked.
PRIORITY_TIMEOUT = 30.0
#: The key-value bucket (stream ``KV_keyedbus-members``) that holds every group's heartbeat records.
MEMBER_BUCKET = "keyedbus-members"

#: Marks a partition token: topic tokens are letters, digits, '_' and '-' only, so no topic's subject can
#: ever be a partition subject.
_MARK = "~"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def partition_of(key: str, partitions: int) -> int:
    """The partition of `key`: FNV-1a 32 of its UTF-8 bytes modulo `partitions`.

    The same function nats-server's `partition(n, ...)` subject mapping uses, and the pool routes by.
    """
    return fnv1a_32(key) % partitions


def partition_subject(topic: str, partition: int) -> str:
    """The subject partition `partition` of `topic` is stored under: ``<topic>.~<partition>``."""
    return f"{topic}.{_MARK}{partition}"


def stream_subjects(topic: str, partitions: int) -> list[str]:
    """The subjects of `topic`'s stream: the topic itself, or one subject per partition."""
    if partitions == 1:
        return [topic]
    return [partition_subject(topic, p) for p in range(partitions)]


def partitions_of_subjects(topic: str, subjects: Sequence[str]) -> int | None:
    """The partition count a stream's subjects say `topic` has, or None if they are not keyedbus's layout."""
    if list(subjects) == [topic]:
        return 1
    count = len(subjects)
    if count > 1 and list(subjects) == stream_subjects(topic, count):
        return count
    return None


def publish_subject(topic: str, partitions: int, key: str | None, message_id: str) -> str:
    """Where a message is published: its key's partition; a keyless one is spread by its message id."""
    if partitions == 1:
        return topic
    return partition_subject(topic, partition_of(key if key is not None else message_id, partitions))


def assigned(member: str, members: Sequence[str], partitions: int) -> range:
    """The partitions `member` owns: sorted members take contiguous ranges of ⌊P/N⌋ or ⌈P/N⌉ partitions.

    Every member computes the same answer from the same member list; `member` counts even if absent.
    """
    ordered = sorted({*members, member})
    index, count = ordered.index(member), len(ordered)
    if partitions < count:
        # One partition each for the oldest members: one joining later does not take over a working one.
        return range(index, index + 1) if index < partitions else range(0)
    return range(index * partitions // count, (index + 1) * partitions // count)


def new_member_id() -> str:
    """A member id that sorts by join time: milliseconds since the epoch, host, pid and a random tail."""
    host = _UNSAFE.sub("_", socket.gethostname())[:40] or "host"
    return f"{int(time.time() * 1000):013d}-{host}-{os.getpid()}-{random.getrandbits(32):08x}"


@attrs.frozen(kw_only=True)
class MemberRecord:
    """What a member's heartbeat says: who it is and which partitions it pulls now."""

    member: str
    host: str
    pid: int
    partitions: tuple[int, ...]

    def encode(self) -> bytes:
        return json.dumps(
            {"member": self.member, "host": self.host, "pid": self.pid, "partitions": list(self.partitions)}
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> MemberRecord:
        raw = json.loads(data)
        return cls(
            member=str(raw["member"]),
            host=str(raw.get("host", "")),
            pid=int(raw.get("pid", 0)),
            partitions=tuple(int(p) for p in raw.get("partitions", ())),
        )


class Membership:
    """One member's heartbeat records for one (topic, group) in the `keyedbus-members` bucket."""

    def __init__(self, js: Any, group_key: str) -> None:
        """`group_key` names the (topic, group) in record keys: letters, digits and '_' only."""
        self._js = js
        self._group_key = group_key
        self.member = new_member_id()
        self._kv: Any = None

    @property
    def _stream(self) -> str:
        return f"KV_{MEMBER_BUCKET}"

    def _key(self, member: str) -> str:
        return f"{self._group_key}.{member}"

    async def beat(self, partitions: Sequence[int]) -> list[str]:
        """Write this member's record; return the group's live members (this one included), sorted."""
        return list(await aio(self._aio_beat)(tuple(partitions)))

    async def _aio_bucket(self) -> Any:
        if self._kv is None:
            self._kv = await open_bucket(self._js)
        return self._kv

    async def _aio_beat(self, partitions: tuple[int, ...]) -> list[str]:
        kv = await self._aio_bucket()
        record = MemberRecord(
            member=self.member, host=socket.gethostname(), pid=os.getpid(), partitions=partitions
        )
        await kv.put(self._key(self.member), record.encode())
        return sorted({*await _aio_members(self._js, self._group_key), self.member})

    async def leave(self) -> None:
        """Remove this member's record at once (no delete marker), so the others take over now."""
        await aio(self._aio_leave)()

    async def _aio_leave(self) -> None:
        await self._js.purge_stream(self._stream, subject=f"$KV.{MEMBER_BUCKET}.{self._key(self.member)}")


async def open_bucket(js: Any) -> Any:
    """The members bucket, created on first use (asyncio side)."""
    import nats.js.errors

    try:
        return await js.key_value(MEMBER_BUCKET)
    except nats.js.errors.BucketNotFoundError:
        pass
    # Three replicas where the server is part of a cluster (so membership survives a server), else one.
    for replicas in (3, 1):
        try:
            return await js.create_key_value(
                bucket=MEMBER_BUCKET,
                description="keyedbus: one heartbeat record per member process of each (topic, group)",
                history=1,
                ttl=MEMBER_TTL,
                replicas=replicas,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _STREAM_NAME_IN_USE:  # created by another member meanwhile
                break
            if replicas == 1:
                raise
            # 10074 and the like: not clustered, or fewer than three servers.
    return await js.key_value(MEMBER_BUCKET)


#: JetStream's error code for "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058


async def _aio_members(js: Any, group_key: str) -> list[str]:
    """The members whose record has not expired, from the bucket stream's per-subject counts."""
    prefix = f"$KV.{MEMBER_BUCKET}.{group_key}."
    info = await js.stream_info(f"KV_{MEMBER_BUCKET}", subjects_filter=f"{prefix}*")
    subjects: Mapping[str, int] = info.state.subjects or {}
    return sorted(s[len(prefix) :] for s in subjects)


_PARTITION_SUFFIX = re.compile(r"_p(\d+)$")


def partition_of_consumer(consumer: str) -> int | None:
    """The partition a keyedbus consumer name reads (its ``_p<n>`` suffix), None for a whole topic's."""
    match = _PARTITION_SUFFIX.search(consumer)
    return int(match.group(1)) if match else None


async def aio_group_records(js: Any, group_key: str) -> list[MemberRecord]:
    """Every live member record of a (topic, group), sorted by member id (for `keyedbus stats`)."""
    import nats.js.errors

    try:
        kv = await js.key_value(MEMBER_BUCKET)
        members = await _aio_members(js, group_key)
    except nats.js.errors.NotFoundError:
        return []
    records = []
    for member in members:
        try:
            entry = await kv.get(f"{group_key}.{member}")
        except nats.js.errors.KeyNotFoundError:
            continue
        if entry.value:
            records.append(MemberRecord.decode(entry.value))
    return records


# -- the raw JetStream API (nats-py 2.16 has no priority groups) ------------------------------------------


def consumer_config(
    *,
    name: str,
    filter_subject: str | None,
    ack_wait: float,
    max_ack_pending: int,
    start_seq: int | None = None,
    replicas: int | None = None,
) -> dict[str, Any]:
    """The JSON config of a partition's durable consumer: explicit acks, pinned_client priority group."""
    config: dict[str, Any] = {
        "name": name,
        "durable_name": name,
        "deliver_policy": "all",
        "ack_policy": "explicit",
        "ack_wait": int(ack_wait * 1e9),
        "max_ack_pending": max_ack_pending,
        "priority_groups": [PRIORITY_GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(PRIORITY_TIMEOUT * 1e9),
    }
    if filter_subject is not None:
        config["filter_subject"] = filter_subject
    if start_seq is not None:
        config["deliver_policy"] = "by_start_sequence"
        config["opt_start_seq"] = start_seq
    if replicas is not None:
        config["num_replicas"] = replicas
    return config


class JetStreamApiError(Exception):
    """The JetStream API answered with an error (asyncio side; translated by the caller)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        self.code = code
        self.err_code = err_code
        super().__init__(f"{description} (status {code}, error {err_code})")


async def aio_api(nc: Any, prefix: str, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """One JetStream API request; raises JetStreamApiError for an error answer."""
    payload = json.dumps(body).encode() if body is not None else b""
    reply = await nc.request(f"{prefix}.{subject}", payload, timeout=5)
    answer: dict[str, Any] = json.loads(reply.data)
    error = answer.get("error")
    if error:
        raise JetStreamApiError(
            int(error.get("code", 0)), int(error.get("err_code", 0)), str(error.get("description"))
        )
    return answer


async def aio_create_consumer(nc: Any, prefix: str, stream: str, config: dict[str, Any]) -> dict[str, Any]:
    """Create the consumer, or keep it as it is when it exists (its settings may have been changed by an
    operator, or by a keyedbus with other defaults); returns its info."""
    name = config["name"]
    try:
        body = {"stream_name": stream, "config": config, "action": "create"}
        await aio_api(nc, prefix, f"CONSUMER.CREATE.{stream}.{name}", body)
    except JetStreamApiError as exc:
        if exc.err_code != _CONSUMER_EXISTS:
            raise
    return await aio_api(nc, prefix, f"CONSUMER.INFO.{stream}.{name}", None)


#: JetStream's error code for "consumer already exists" with another configuration.
_CONSUMER_EXISTS = 10148


async def aio_update_consumer(
    nc: Any, prefix: str, stream: str, name: str, changes: dict[str, Any]
) -> dict[str, Any]:
    """Change some settings of an existing consumer, keeping all others (priority groups included)."""
    info = await aio_api(nc, prefix, f"CONSUMER.INFO.{stream}.{name}", None)
    config = {**info["config"], **changes}
    body = {"stream_name": stream, "config": config, "action": "update"}
    return await aio_api(nc, prefix, f"CONSUMER.CREATE.{stream}.{name}", body)


async def aio_unpin(nc: Any, prefix: str, stream: str, consumer: str) -> None:
    """Ask the server to drop the consumer's pin: the next pull request to arrive gets a new one."""
    await aio_api(nc, prefix, f"CONSUMER.UNPIN.{stream}.{consumer}", {"group": PRIORITY_GROUP})


def pinned_id(info: Mapping[str, Any]) -> str | None:
    """The pin id a consumer's info reports for keyedbus's priority group (None: nobody is pinned)."""
    for state in info.get("priority_groups") or ():
        if state.get("group") == PRIORITY_GROUP:
            return state.get("pinned_client_id") or None
    return None


def has_pinned_policy(info: Mapping[str, Any]) -> bool:
    """Whether a consumer's info shows the pinned_client policy on keyedbus's priority group."""
    config = info.get("config") or {}
    return bool(
        config.get("priority_policy") == "pinned_client"
        and PRIORITY_GROUP in (config.get("priority_groups") or ())
    )


async def sleep_jittered(seconds: float) -> None:
    """Sleep about `seconds` (±10%), so members that started together do not beat in lockstep."""
    await trio.sleep(seconds * random.uniform(0.9, 1.1))
