"""DESIGN.md's guarantees, run against every backend in conftest.BACKENDS.

Tests take the `clock` fixture: virtual time on memory://, real time (bounded by fail_after) elsewhere.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict

import attrs
import pytest
import trio
import trio.testing

import keyedbus
import keyedbus._consumer
from keyedbus._pool import fnv1a_32
from keyedbus.testing import wait_until_handled

from .conftest import Backend

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

FAST_RETRY = keyedbus.RetryPolicy(max_attempts=10, initial_backoff=0.01, max_backoff=0.05, jitter=0)


class OrderChecker:
    """Records handler starts and ends per key; fails if a key ever runs two handlers or goes backwards."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.done: dict[str, list[int]] = defaultdict(list)
        self.violations: list[str] = []
        self.max_concurrent = 0

    def start(self, key: str, seq: int) -> None:
        if key in self.running:
            self.violations.append(f"{key}#{seq} started while an earlier message of {key} was running")
        if self.done[key] and seq <= self.done[key][-1]:
            self.violations.append(f"{key}#{seq} started after {key}#{self.done[key][-1]} had finished")
        self.running.add(key)
        self.max_concurrent = max(self.max_concurrent, len(self.running))

    def end(self, key: str, seq: int, ok: bool) -> None:
        self.running.discard(key)
        if ok:
            self.done[key].append(seq)


async def test_order_per_key_through_random_delays_and_failures(backend: Backend, clock: object) -> None:
    rng = random.Random(1234)
    checker = OrderChecker()
    keys = [f"order-{i}" for i in range(20)]
    per_key = 30

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        seq = int(msg.data)
        checker.start(msg.key, seq)
        ok = False
        try:
            await trio.sleep(rng.random() * 0.005)
            if rng.random() < 0.2:
                raise RuntimeError("injected failure")
            ok = True
        finally:
            checker.end(msg.key, seq, ok)

    with trio.fail_after(60):
        async with backend.open(pool=keyedbus.PoolConfig(workers=8), retry=FAST_RETRY) as bus:
            await bus.subscribe("orders", handler)
            for seq in range(per_key):
                for key in keys:
                    await bus.publish("orders", str(seq).encode(), key=key)
    assert checker.violations == []
    assert {k: v for k, v in checker.done.items()} == {k: list(range(per_key)) for k in keys}
    stats = bus.statistics()
    assert stats.handled == len(keys) * per_key
    assert stats.retried > 0
    assert stats.dead_lettered == 0


async def test_different_keys_run_concurrently_same_key_does_not(backend: Backend, clock: object) -> None:
    release = trio.Event()
    eight_running = trio.Event()
    running: list[str] = []

    async def handler(msg: keyedbus.Message) -> None:
        running.append(msg.data.decode())
        if len(running) == 8:
            eight_running.set()
        await release.wait()

    with trio.fail_after(30):
        async with backend.open(pool=keyedbus.PoolConfig(workers=16)) as bus:
            await bus.subscribe("orders", handler)
            for i in range(8):
                await bus.publish("orders", f"k{i}-first".encode(), key=f"k{i}")
                await bus.publish("orders", f"k{i}-second".encode(), key=f"k{i}")
            await eight_running.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(running) == sorted(f"k{i}-first" for i in range(8))
            assert bus.statistics().in_flight == 8
            release.set()
    assert sorted(running) == sorted([f"k{i}-first" for i in range(8)] + [f"k{i}-second" for i in range(8)])


@pytest.mark.memory_only("asserts exact virtual times; on real time the bound is not deterministic")
async def test_a_slow_key_does_not_hold_up_keys_that_share_its_shard(backend: Backend, clock: object) -> None:
    pool = keyedbus.PoolConfig(workers=2)
    finished: dict[str, float] = {}

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        if msg.key == "slow":
            await trio.sleep(10)
        finished[f"{msg.key}#{msg.data.decode()}"] = trio.current_time()

    with trio.fail_after(120):
        async with backend.open(pool=pool, drain_timeout=100) as bus:
            assert fnv1a_32("slow") % 2 == fnv1a_32("k0") % 2  # same worker
            await bus.subscribe("orders", handler)
            start = trio.current_time()
            for i in range(5):
                await bus.publish("orders", str(i).encode(), key="slow")
            for i in range(5):
                await bus.publish("orders", str(i).encode(), key="k0")
    # The slow key's five messages take 50 s one after another; k0 shares its shard but not its wait.
    assert finished["slow#4"] - start == 50
    assert max(finished[f"k0#{i}"] for i in range(5)) - start < 10


@pytest.mark.memory_only("asserts exact virtual times; on real time the bound is not deterministic")
async def test_a_poison_key_does_not_stall_other_keys_on_its_worker(backend: Backend, clock: object) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=1.0, max_backoff=1.0, jitter=0)
    healthy_done: list[float] = []
    poison_attempts: list[float] = []
    dead: list[keyedbus.Message] = []
    all_healthy_done = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "poison":
            poison_attempts.append(trio.current_time())
            raise ValueError("cannot handle this one")
        healthy_done.append(trio.current_time())
        if len(healthy_done) == 50:
            all_healthy_done.set()

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    with trio.fail_after(30):
        # One worker: every key shares the poison key's worker.
        async with backend.open(pool=keyedbus.PoolConfig(workers=1), retry=retry) as bus:
            await bus.subscribe("orders", handler)
            await bus.subscribe("orders.dead-letter", on_dead)
            start = trio.current_time()
            await bus.publish("orders", b"x", key="poison")
            for i in range(50):
                await bus.publish("orders", b"y", key=f"healthy-{i}")
            await all_healthy_done.wait()
            # All healthy keys finished before the poison key's first retry was due.
            assert max(healthy_done) - start < retry.initial_backoff
            assert bus.statistics().parked_keys == 1
    assert len(poison_attempts) == 3
    assert len(dead) == 1
    assert dead[0].headers["Keyedbus-Attempts"] == "3"


async def test_leaving_the_block_drains_everything_published(backend: Backend, clock: object) -> None:
    handled: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        await trio.sleep(0.01)
        handled.append(int(msg.data))

    with trio.fail_after(60):
        async with backend.open(pool=keyedbus.PoolConfig(workers=4)) as bus:
            await bus.subscribe("orders", handler)
            for i in range(200):
                await bus.publish("orders", str(i).encode(), key=f"k{i % 10}")
    assert sorted(handled) == list(range(200))
    assert bus.statistics().queued == 0


@pytest.mark.not_on("nats-core", reason="core NATS is at-most-once: nothing is redelivered")
async def test_unsettled_messages_go_to_the_groups_next_subscriber_in_key_order(
    backend: Backend, clock: object
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=5, initial_backoff=30.0, max_backoff=30.0, jitter=0)
    first_seen: list[tuple[str, int]] = []
    second_seen: list[tuple[str, int, int]] = []
    k2_running = trio.Event()
    k2_release = trio.Event()

    async def first(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        first_seen.append((msg.key, int(msg.data)))
        if msg.key == "k1" and msg.data == b"0":
            raise RuntimeError("fail so the key parks for 30 s")
        if msg.key == "k2" and msg.data == b"0":
            k2_running.set()
            await k2_release.wait()

    async def second(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        second_seen.append((msg.key, int(msg.data), msg.attempt))

    with trio.fail_after(60):
        async with backend.open(pool=keyedbus.PoolConfig(workers=4), retry=retry) as bus:
            sub = await bus.subscribe("orders", first, group="billing")
            for i in range(5):
                await bus.publish("orders", str(i).encode(), key="k1")
                await bus.publish("orders", str(i).encode(), key="k2")
            await k2_running.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sub.unsubscribe)
                await trio.testing.wait_all_tasks_blocked()
                k2_release.set()  # the running handler is allowed to finish
            assert ("k1", 0) in first_seen
            await bus.subscribe("orders", second, group="billing")
    by_key: dict[str, list[int]] = defaultdict(list)
    for key, seq, _ in second_seen:
        by_key[key].append(seq)
    assert by_key["k1"] == [0, 1, 2, 3, 4]  # k1#0 first, though it failed and was parked
    assert by_key["k2"] == [1, 2, 3, 4]  # k2#0 finished under the first subscriber and was acked
    assert next(a for k, s, a in second_seen if (k, s) == ("k1", 0)) > 1


async def test_dead_letter_carries_key_headers_and_reason_then_the_key_moves_on(
    backend: Backend, clock: object
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=0.5, jitter=0)
    dead: list[keyedbus.Message] = []
    handled: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        if msg.data == b"bad":
            raise KeyError("no such sku")
        handled.append(msg.data)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    with trio.fail_after(30):
        async with backend.open(retry=retry) as bus:
            await bus.subscribe("orders", handler)
            await bus.subscribe("orders.dead-letter", on_dead)
            await bus.publish("orders", b"bad", key="k", headers={"Trace": "t-1"})
            await bus.publish("orders", b"good", key="k")
    assert handled == [b"good"]
    [letter] = dead
    assert letter.data == b"bad"
    assert letter.key == "k"
    assert letter.headers["Trace"] == "t-1"
    assert letter.headers["Keyedbus-Error"] == "KeyError: 'no such sku'"
    assert letter.headers["Keyedbus-Attempts"] == "2"
    assert letter.headers["Keyedbus-Original-Topic"] == "orders"
    assert bus.statistics().dead_lettered == 1


async def test_malformed_envelope_is_dead_lettered_and_the_bus_keeps_running(
    backend: Backend, clock: object
) -> None:
    got: list[keyedbus.Envelope] = []
    dead: list[keyedbus.Message] = []

    async def on_event(env: keyedbus.Envelope) -> None:
        got.append(env)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    with trio.fail_after(30):
        async with backend.open() as bus:
            await bus.subscribe_envelope("orders", on_event, dead_letter="orders.bad")
            await bus.subscribe("orders.bad", on_dead)
            bad = (
                b'{"aggregate_id":"order 1","event_type":"Placed","event_version":1,'
                b'"timestamp":"2025-10-13T00:00:00Z","payload":{}}'
            )
            await bus.publish("orders", bad, key="order-1")
            await bus.publish_envelope(
                "orders", keyedbus.Envelope(aggregate_id="order-1", event_type="Placed", event_version=1)
            )
    assert [e.event_type for e in got] == ["Placed"]
    [letter] = dead
    assert "aggregate_id has a space" in letter.headers["Keyedbus-Error"]
    assert letter.headers["Keyedbus-Attempts"] == "1"


async def test_each_group_gets_every_message(backend: Backend, clock: object) -> None:
    seen: dict[str, list[bytes]] = defaultdict(list)

    def make(group: str) -> keyedbus._consumer.Handler[keyedbus.Message]:
        async def handler(msg: keyedbus.Message) -> None:
            seen[group].append(msg.data)

        return handler

    with trio.fail_after(30):
        async with backend.open() as bus:
            await bus.subscribe("orders", make("a"), group="a")
            await bus.subscribe("orders", make("b"), group="b")
            for i in range(10):
                await bus.publish("orders", str(i).encode(), key="k")
    expected = [str(i).encode() for i in range(10)]
    assert seen == {"a": expected, "b": expected}


async def test_keyless_messages_run_concurrently_up_to_the_worker_count(
    backend: Backend, clock: object
) -> None:
    release = trio.Event()
    four_running = trio.Event()
    running = 0
    peak = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 4:
            four_running.set()
        await release.wait()
        running -= 1

    with trio.fail_after(30):
        async with backend.open(pool=keyedbus.PoolConfig(workers=4)) as bus:
            await bus.subscribe("audit", handler)
            for i in range(10):
                await bus.publish("audit", str(i).encode())
            await four_running.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert running == 4
            release.set()
    assert peak == 4
    assert bus.statistics().handled == 10


@pytest.mark.not_on("nats-core", reason="core NATS stores nothing: there is no backlog to measure")
async def test_lag_counts_stored_messages_not_yet_delivered(backend: Backend, clock: object) -> None:
    release = trio.Event()
    pool = keyedbus.PoolConfig(workers=1, queue_size=1)

    async def handler(msg: keyedbus.Message) -> None:
        await release.wait()

    with trio.fail_after(60):
        async with backend.open(pool=pool) as bus:
            for i in range(600):
                await bus.publish("orders", str(i).encode(), key="k")
            assert bus.statistics().lag == 0  # nobody subscribes: nothing is owed to this bus yet
            await bus.subscribe("orders", handler)
            # One message runs, one waits in the worker queue, a batch waits in the subscription task; the
            # rest is lag. Wait until delivery has begun (0: not known yet; 600: the task has not run yet).
            while bus.statistics().lag in (0, 600):  # noqa: ASYNC110 - lag is a counter: nothing to wait on
                await trio.sleep(0.01)
            assert 0 < bus.statistics().lag < 600
            release.set()
            await wait_until_handled(bus)
            assert bus.statistics().lag == 0


# --- limits, retention and message rules (DESIGN.md "Limits and retention", "The wire") -----------------


@pytest.mark.not_on("nats-core", reason="core NATS stores nothing: there is nothing to evict")
async def test_a_user_limit_evicts_only_the_oldest_messages(backend: Backend, clock: object) -> None:
    seen: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg.data)

    with trio.fail_after(60):
        async with backend.open() as bus:
            await bus.configure_topic("orders", attrs.evolve(backend.default_topic, max_msgs=5))
            sub = await bus.subscribe("orders", handler, group="billing")
            await sub.unsubscribe()
            for i in range(10):  # every publish returns: a user limit never makes publish wait
                await bus.publish("orders", str(i).encode(), key="k")
            await bus.subscribe("orders", handler, group="billing")
            await wait_until_handled(bus)
    assert seen == [str(i).encode() for i in range(5, 10)]


@pytest.mark.not_on("nats-core", reason="core NATS stores nothing: there is nothing to evict")
@pytest.mark.not_on(
    "nats-core",
    "jetstream",
    reason="JetStream counts an eviction when the group reads again, not at publish (docs/nats.md; "
    "test_wire.py::test_messages_a_user_limit_evicted_before_the_group_got_them_are_counted_and_logged)",
)
async def test_evictions_by_a_user_limit_are_counted_and_logged(
    backend: Backend, clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(60):
        async with backend.open() as bus:
            await bus.configure_topic("orders", attrs.evolve(backend.default_topic, max_msgs=5))
            sub = await bus.subscribe("orders", _ignore, group="billing")
            await sub.unsubscribe()
            for i in range(10):
                await bus.publish("orders", str(i).encode(), key="k")
            assert bus.statistics().evicted == 5
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evicted ")]
    assert logged
    assert all(" of topic orders " in line for line in logged)
    assert sum(int(line.split()[1]) for line in logged) == 5


async def _ignore(msg: keyedbus.Message) -> None:
    await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("name", ["X(odd)", "a/b", "a b", "é"])
async def test_header_names_nats_refuses_are_refused_on_every_backend(
    backend: Backend, clock: object, name: str
) -> None:
    with trio.fail_after(30):
        async with backend.open() as bus:
            with pytest.raises(keyedbus.InvalidHeaderError, match=r"is not allowed"):
                await bus.publish("orders", b"x", headers={name: "v"})
            await bus.publish("orders", b"x", headers={"X-Fine": "v"})  # the connection is unharmed


async def test_dead_letters_carry_server_headers_only_under_the_original_prefix(
    backend: Backend, clock: object
) -> None:
    from keyedbus._backends.jetstream import stream_name  # the stream keyedbus makes for a topic

    dead: list[keyedbus.Message] = []
    got_two = trio.Event()
    retry = keyedbus.RetryPolicy(max_attempts=1)

    async def failing(msg: keyedbus.Message) -> None:
        raise RuntimeError("boom")

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)
        if len(dead) == 2:
            got_two.set()

    # Valid for the original publish (the stream of "orders"), wrong for any dead-letter topic: copied
    # as they were, they would make every dead-letter publish fail (JetStream err 10060) and park the key.
    expect = {"Nats-Expected-Stream": stream_name("orders")}
    with trio.fail_after(60):
        async with backend.open(retry=retry) as bus:
            await bus.subscribe("orders", failing)
            await bus.subscribe("orders.dead-letter", on_dead)
            await bus.publish("orders", b"1", key="k", headers=expect)
            await bus.publish("orders", b"2", key="k", headers={"Trace": "t2"})
            await got_two.wait()
    assert [m.data for m in dead] == [b"1", b"2"]
    first = dead[0].headers
    assert first["Keyedbus-Original-Nats-Expected-Stream"] == stream_name("orders")
    assert "Nats-Expected-Stream" not in first
    assert dead[0].key == "k"
    assert dead[1].headers["Trace"] == "t2"
    assert bus.statistics().dead_lettered == 2


async def test_a_message_over_max_payload_is_refused_at_the_call_naming_both_sizes(
    backend: Backend, clock: object
) -> None:
    seen: list[int] = []
    got = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(len(msg.data))
        got.set()

    data = b"x" * (1024 * 1024 - 16)  # fits alone (1 MiB, the default max_payload); not with its headers
    with trio.fail_after(60):
        async with backend.open() as bus:
            await bus.subscribe("orders", handler)
            with pytest.raises(keyedbus.MessageTooLargeError) as info:
                await bus.publish("orders", data, key="order-1")
            assert info.value.limit == 1024 * 1024
            assert info.value.size > info.value.limit
            assert str(info.value.size) in str(info.value)
            assert str(info.value.limit) in str(info.value)
            assert info.value.topic == "orders"
            await bus.publish("orders", b"small", key="order-1")  # the connection is unharmed
            await got.wait()
            assert bus.statistics().connected
    assert seen == [5]


@pytest.mark.not_on("nats-core", reason="core NATS stores nothing: a group away gets nothing later")
async def test_default_settings_evict_nothing_a_group_has_not_settled(
    backend: Backend, clock: object
) -> None:
    seen: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg.data)

    with trio.fail_after(60):
        async with backend.open() as bus:
            sub = await bus.subscribe("orders", handler, group="billing")
            await sub.unsubscribe()
            for i in range(200):
                await bus.publish("orders", str(i).encode(), key=f"k{i % 7}")
            # A topic nobody has subscribed to keeps what was published, for whoever comes first.
            for i in range(50):
                await bus.publish("audit", str(i).encode())
            await bus.subscribe("orders", handler, group="billing")
            await bus.subscribe("audit", handler)
            await wait_until_handled(bus)
            assert bus.statistics().evicted == 0
    assert sorted(seen) == sorted(
        [str(i).encode() for i in range(200)] + [str(i).encode() for i in range(50)]
    )


async def test_an_exception_raised_in_the_block_leaves_as_raised(backend: Backend, clock: object) -> None:
    # On NATS, trio-asyncio's loop wraps the bus's nursery in groups of its own and trio derives copies of
    # the user's group when splitting it: what leaves must still be the user's own object.
    async def handler(msg: keyedbus.Message) -> None:
        await trio.sleep(0.1)

    async def block_raising(raised: BaseException) -> None:
        async with backend.open() as bus:
            await bus.subscribe("orders", handler)
            await bus.publish("orders", b"x", key="k")
            raise raised

    for raised in (
        ExceptionGroup("mine", [ValueError("a"), KeyError("b")]),
        ExceptionGroup("one of mine", [ValueError("c")]),
        ValueError("bare"),
    ):
        left: BaseException | None = None
        with trio.fail_after(30):
            try:
                await block_raising(raised)
            except BaseException as exc:
                left = exc
        assert left is raised


@pytest.mark.parametrize("persistence", ["persistent", "ephemeral"])
async def test_a_poison_key_flooded_past_the_bound_does_not_stall_other_keys(
    backend: Backend, clock: object, persistence: str
) -> None:
    # A key failing every attempt that keeps receiving messages (a poison aggregate): its backlog must not
    # fill its worker's bound, or other keys' messages would be dropped (ephemeral) or the subscription task
    # would wait on that worker's channel and stall every key of the topic (persistent). Guarantee 3.
    if backend.name != "memory" and (persistence == "persistent") != backend.default_topic.persistent:
        pytest.skip(f"{backend.name} topics are {backend.default_topic.persistence} here")
    queue_size = 8
    flood = 3 * queue_size
    backoff = 5.0 if backend.virtual_time else 8.0
    retry = keyedbus.RetryPolicy(max_attempts=1000, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=2, queue_size=queue_size, wait_timeout=0.5)
    poison_worker = fnv1a_32("poison") % 2
    neighbours = [k for k in (f"k{i}" for i in range(100)) if fnv1a_32(k) % 2 == poison_worker][:5]
    elsewhere = [k for k in (f"k{i}" for i in range(100)) if fnv1a_32(k) % 2 != poison_worker][:5]
    healthy = [(key, n) for n in range(2) for key in neighbours + elsewhere]
    healed = False
    poison_handled: list[int] = []
    poison_attempts: list[int] = []
    healthy_handled: list[tuple[str, int]] = []
    all_healthy = trio.Event()
    first_failure = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        if msg.key == "poison":
            if not healed:
                first_failure.set()
                raise RuntimeError("poison")
            poison_handled.append(int(msg.data))
            poison_attempts.append(msg.attempt)
            return
        healthy_handled.append((msg.key, int(msg.data)))
        if len(healthy_handled) == len(healthy):
            all_healthy.set()

    with trio.fail_after(120):
        async with backend.open(pool=pool, retry=retry, drain_timeout=100) as bus:
            await bus.configure_topic("orders", keyedbus.TopicConfig(persistence=persistence))  # type: ignore[arg-type]
            await bus.subscribe("orders", handler)
            await bus.publish("orders", b"0", key="poison")
            await first_failure.wait()
            start = trio.current_time()  # the poison key is parked until start + backoff (at most)
            for i in range(1, flood + 1):
                await bus.publish("orders", str(i).encode(), key="poison")
                await trio.sleep(0.001)  # a steady flow: no subscriber buffer overflows
            for key, n in healthy:
                await bus.publish("orders", str(n).encode(), key=key)
            await all_healthy.wait()
            # Every other key, on the poison key's worker or not, ran before its first retry was due.
            assert trio.current_time() - start < backoff
            assert bus.statistics().parked_keys == 1
            healed = True
            await wait_until_handled(bus)
    assert sorted(healthy_handled) == sorted(healthy)
    stats = bus.statistics()
    assert poison_handled == sorted(poison_handled)  # in order, whatever was dropped or handed back
    if persistence == "persistent":
        assert poison_handled == list(range(flood + 1))  # nothing lost, nothing twice
        # Only the first was ever tried before: handing the others back to the broker was not an attempt.
        assert poison_attempts[0] > 1
        assert set(poison_attempts[1:]) == {1}
        assert stats.dropped == 0
    else:
        # Only the poison key's own messages were dropped, each counted.
        assert len(poison_handled) + stats.dropped == flood + 1
        assert stats.dropped > 0


@pytest.mark.not_on("nats-core", reason="core NATS is at-most-once: a parked key's backlog is dropped")
async def test_a_key_with_messages_deferred_to_the_broker_keeps_its_order_when_its_subscription_is_replaced(
    backend: Backend, clock: object
) -> None:
    # A parked key's backlog beyond its bound is handed back to the broker, due after the key's retry. If
    # the subscription is replaced meanwhile, the next one knows nothing of those deferred messages: the
    # broker must give them back to it before any later message of the key runs (memory://: the hand-back
    # redelivers them at once, in log order; JetStream: they are unsettled, so the new subscription holds
    # the key as owed until their delayed redelivery arrives).
    backoff = 5.0 if backend.virtual_time else 2.0
    retry = keyedbus.RetryPolicy(max_attempts=100, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=1, queue_size=4)  # a parked key keeps 2: the rest is deferred
    checker = OrderChecker()
    healed = False
    first_failure = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        seq = int(msg.data)
        checker.start("poison", seq)
        ok = False
        try:
            if not healed:
                first_failure.set()
                raise RuntimeError("poison")
            ok = True
        finally:
            checker.end("poison", seq, ok)

    with trio.fail_after(60):
        async with backend.open(pool=pool, retry=retry, drain_timeout=30) as bus:
            sub = await bus.subscribe("orders", handler, group="g")
            await flood_a_parked_key(bus, first_failure)  # 2 kept, 7 deferred
            await sub.unsubscribe()
            healed = True
            await bus.subscribe("orders", handler, group="g")
            await bus.publish("orders", b"10", key="poison")
            await wait_until_handled(bus)
    assert checker.violations == []
    assert checker.done["poison"] == list(range(11))


async def flood_a_parked_key(bus: keyedbus.Bus, first_failure: trio.Event) -> None:
    """Publish "0" of key "poison" to topic "orders", wait until its handler failed, publish "1".."9", and
    wait until the pool holds 2 of them and the rest went back to the broker (on a pool of one worker with
    `queue_size=4`: a parked key keeps 2).

    Polls: statistics are counters, with nothing to wait on.
    """
    await bus.publish("orders", b"0", key="poison")
    await first_failure.wait()
    for i in range(1, 10):
        await bus.publish("orders", str(i).encode(), key="poison")
    while (stats := bus.statistics()).queued != 2 or stats.lag:  # noqa: ASYNC110
        await trio.sleep(0.05)
