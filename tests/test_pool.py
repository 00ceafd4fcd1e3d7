"""The pool as the design card draws it: channels, subscription tasks, bounds, lifecycle, failures."""

from __future__ import annotations

import gc
import heapq
import logging
import sys
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.testing

import keyedbus
from keyedbus._groups import to_raise
from keyedbus._messages import AggregateMessage
from keyedbus._pool import DEFER_GRACE, KeyedWorkerPool, fnv1a_32
from keyedbus._statistics import Counters
from keyedbus.testing import wait_until_handled

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

EPHEMERAL = keyedbus.TopicConfig(persistence="ephemeral")
ONCE = keyedbus.RetryPolicy(max_attempts=1)


async def noop(msg: keyedbus.Message) -> None:
    pass


async def _collect_dead(bus: keyedbus.Bus, topic: str = "orders.dead-letter") -> list[keyedbus.Message]:
    dead: list[keyedbus.Message] = []

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    await bus.subscribe(topic, on_dead)
    return dead


# -- worker queues are trio memory channels ------------------------------------------------------------


async def test_worker_queue_depths_are_the_channels_own_statistics(autojump_clock: object) -> None:
    release = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        await release.wait()

    pool = keyedbus.PoolConfig(workers=2, queue_size=5)
    worker = fnv1a_32("k") % 2
    async with keyedbus.open_bus(pool=pool) as bus:
        await bus.subscribe("orders", handler)
        for i in range(20):
            await bus.publish("orders", str(i).encode(), key="k")
        await trio.testing.wait_all_tasks_blocked()
        stats = bus.statistics()
        # The worker holds queue_size messages in k's lane (one running) and stops receiving: its channel
        # fills to queue_size and the subscription task waits with the rest (persistent: backpressure).
        assert stats.worker_queue_depths[worker] == 5
        assert stats.worker_queue_depths[1 - worker] == 0
        assert stats.queued == 5 + 4
        assert stats.in_flight == 1
        assert stats.dropped == 0
        assert stats.lanes == 1
        release.set()
    assert bus.statistics().handled == 20
    assert bus.statistics().worker_queue_depths == (0, 0)


# -- the publisher never runs subscriber code --------------------------------------------------------------


async def test_deep_json_is_dead_lettered_by_the_subscription_task_and_publish_returns(
    autojump_clock: object,
) -> None:
    seen: list[str] = []

    async def on_event(env: keyedbus.Envelope) -> None:
        seen.append(env.event_type)

    start = trio.current_time()
    async with keyedbus.open_bus(drain_timeout=30) as bus:
        await bus.subscribe_envelope("orders", on_event)
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"[" * 100000 + b"]" * 100000, key="k")  # returns: no decoding here
        await bus.publish_envelope(
            "orders", keyedbus.Envelope(aggregate_id="k", event_type="After", event_version=1)
        )
        await wait_until_handled(bus)
        assert seen == ["After"]  # the bus goes on
    assert trio.current_time() - start < 1  # the drain ended at once: nothing was left unfinished
    [letter] = dead
    assert letter.headers["Keyedbus-Error"].startswith("InvalidEnvelopeError: nested too deeply")
    assert letter.key == "k"


@pytest.mark.parametrize("error", [RecursionError("deep"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad")])
async def test_a_key_function_raising_dead_letters_that_message_only(
    error: Exception, autojump_clock: object
) -> None:
    handled: list[bytes] = []

    def key_of(msg: keyedbus.Message) -> str | None:
        if msg.data == b"bad":
            raise error
        return "k"

    async def handler(msg: keyedbus.Message) -> None:
        handled.append(msg.data)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler, key=key_of)
        dead = await _collect_dead(bus)
        for data in (b"1", b"bad", b"2"):
            await bus.publish("orders", data)
        await wait_until_handled(bus)
    assert handled == [b"1", b"2"]
    [letter] = dead
    assert letter.headers["Keyedbus-Error"].startswith(f"key function failed: {type(error).__name__}: ")


class _Odd(BaseException):
    """A BaseException that is neither Cancelled, KeyboardInterrupt nor SystemExit."""


async def test_a_key_function_raising_a_base_exception_dead_letters_it(autojump_clock: object) -> None:
    def key_of(msg: keyedbus.Message) -> str | None:
        raise _Odd("odd")

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", noop, key=key_of)
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"x")
        await wait_until_handled(bus)
    assert [m.headers["Keyedbus-Error"] for m in dead] == ["key function failed: _Odd: odd"]


# -- everything bounded -------------------------------------------------------------------------------------


async def test_a_parked_keys_backlog_beyond_the_bound_is_deferred_to_the_broker_persistent(
    autojump_clock: object,
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=100, max_backoff=100, jitter=0)

    async def handler(msg: keyedbus.Message) -> None:
        raise RuntimeError("poison")

    pool = keyedbus.PoolConfig(workers=1, queue_size=10)
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=1_000_000) as bus:
        dead = await _collect_dead(bus)
        await bus.subscribe("orders", handler)
        for i in range(600):
            await bus.publish("orders", str(i).encode(), key="poison")
        await trio.sleep(1)  # the first attempt failed: the key is parked for 100 s
        stats = bus.statistics()
        assert stats.parked_keys == 1
        # The parked key keeps queue_size // 2 messages (its head included); the rest went back to the
        # broker, due after its retry: its worker's channel stays empty, so nothing waits behind it.
        assert stats.queued == 5
        assert stats.worker_queue_depths == (0,)
        assert stats.dropped == 0
    # Nothing lost, in order, and a deferral is not an attempt: each was tried max_attempts times.
    assert [m.data for m in dead] == [str(i).encode() for i in range(600)]
    assert {m.headers["Keyedbus-Attempts"] for m in dead} == {"2"}
    assert bus.statistics().dead_lettered == 600


async def test_a_parked_keys_backlog_beyond_the_bound_is_dropped_ephemeral(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=100, max_backoff=100, jitter=0)
    tried: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        tried.append(int(msg.data))
        raise RuntimeError("poison")

    pool = keyedbus.PoolConfig(workers=1, queue_size=10, wait_timeout=0.5)
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=1000) as bus:
        await bus.configure_topic("ticks", EPHEMERAL)
        await bus.subscribe("ticks", handler)
        for i in range(50):
            await bus.publish("ticks", str(i).encode(), key="poison")
            await trio.sleep(1)  # longer than wait_timeout: the subscriber's own buffer never fills
        stats = bus.statistics()
        assert stats.parked_keys == 1
        assert stats.queued == 5  # queue_size // 2 held behind the parked key: no more
        assert stats.worker_queue_depths == (0,)  # nothing waits for room: neighbours would get in
        assert stats.dropped == 45  # the parked key's own later messages, each counted
    # The kept ones were the oldest; each was tried twice and dead-lettered.
    assert sorted(set(tried)) == [0, 1, 2, 3, 4]
    # Logged coalesced: the first drop at once, the rest when the key's retry came (not one per message).
    why = (
        "of ephemeral topic ticks: key poison is parked (failing) and its worker holds 5 message(s) of "
        "parked keys at most (PoolConfig.queue_size // 2)"
    )
    lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert lines == [f"dropped 1 message(s) {why}", f"dropped 44 message(s) {why}"]


async def test_a_deferred_message_a_limit_evicted_is_given_up_when_a_later_one_comes_back(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=5, initial_backoff=100, max_backoff=100, jitter=0)
    healed = False
    handled: list[tuple[int, float]] = []
    others_go = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "poison":
            if not healed:
                raise RuntimeError("poison")
            handled.append((int(msg.data), trio.current_time()))
        else:
            await others_go.wait()  # unsettled: they count against max_msgs (settled ones do not)

    pool = keyedbus.PoolConfig(workers=1, queue_size=4)  # a parked key keeps 2
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=10_000) as bus:
        await bus.configure_topic("orders", keyedbus.TopicConfig(max_msgs=12))
        await bus.subscribe("orders", handler)
        start = trio.current_time()
        for i in range(10):
            await bus.publish("orders", str(i).encode(), key="poison")
        await trio.testing.wait_all_tasks_blocked()  # 0 failed: 0 and 1 kept, 2..9 deferred for 100 s
        healed = True
        for i in range(10):
            await bus.publish("orders", b"x", key=f"other-{i}")  # evicts the 8 oldest: 2..7 are deferred
        others_go.set()
        await wait_until_handled(bus)
        assert bus.statistics().evicted == 6  # only the deferred ones: 0 and 1 are in the pool
    # 8 and 9 came back at 100 s; 2..7 never come, and memory:// says so (a limit evicted them): given up
    # at once, in order, each logged. (Where the broker cannot tell, as on JetStream, the pool waits
    # DEFER_GRACE past their due time.)
    assert [seq for seq, _ in handled] == [0, 1, 8, 9]
    assert handled[2][1] - start == pytest.approx(100, abs=1)
    gave_up = [r.getMessage() for r in caplog.records if "goes on without" in r.getMessage()]
    assert gave_up == [
        f"orders: a deferred message of key poison (sequence {seq}) will not come back: the broker no longer "
        "holds it (settled elsewhere, evicted by a limit, or its stream deleted); the key goes on without it"
        for seq in range(3, 9)
    ]  # at once: not "within 120 s of its due time", as it said before


async def test_a_flooded_failing_key_keeps_every_keys_order_across_unsubscribe_and_subscribe_again(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # The torture run on memory:// in the small (benchmarks/torture.py: small queues, many keys failing now
    # and then, one failing every attempt, a subscription replaced midway). Deferred messages come back out
    # of order (one deferred again behind a retry comes back after younger ones), and a key keeps those back
    # early until the older one arrives. Those kept ones once filled their worker's bound: the worker
    # stopped receiving, so the older message waited in its channel behind them, the subscription task
    # waited for that channel, and every key of the topic stalled until DEFER_GRACE gave up on the older
    # message, which then ran after younger ones (94 order violations, 246 s instead of 4 s).
    max_attempts = 4
    retry = keyedbus.RetryPolicy(max_attempts=max_attempts, initial_backoff=0.01, max_backoff=0.1, jitter=0)
    keys = ["poison"] + [f"k{i}" for i in range(39)]
    per_key = 40
    finished: dict[str, list[int]] = {key: [] for key in keys}  # handled, or failed its last attempt
    a_third_finished = trio.Event()
    a_key_retries_after_a_third = trio.Event()
    violations: list[str] = []

    def fails(key: str, seq: int, attempt: int) -> bool:
        return key == "poison" or fnv1a_32(f"{key}:{seq}:{attempt}") % 10 == 0

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        seq = int(msg.data)
        done = finished[msg.key]
        if seq != len(done):  # every earlier message of the key finished, this one not yet
            violations.append(f"{msg.key}#{seq} started after {done[-3:]}")
        await trio.sleep(0.001)
        failed = fails(msg.key, seq, msg.attempt)
        if not failed or msg.attempt >= max_attempts:
            done.append(seq)
        if sum(map(len, finished.values())) >= len(keys) * per_key // 3:
            a_third_finished.set()
        if failed:
            if a_third_finished.is_set() and msg.attempt < max_attempts:
                a_key_retries_after_a_third.set()
            raise RuntimeError("injected")

    pool = keyedbus.PoolConfig(workers=8, queue_size=8)  # a worker's parked keys keep 4
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=10_000) as bus:
        await bus.subscribe("orders.dead-letter", noop)
        sub = await bus.subscribe("orders", handler)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def publish_all() -> None:
                for seq in range(per_key):
                    for key in keys:
                        await bus.publish("orders", str(seq).encode(), key=key)

            nursery.start_soon(publish_all)
            # Replace the subscription while a key waits for a retry with messages deferred (at the
            # instant a third has finished, trio's scheduling may have none waiting).
            await a_key_retries_after_a_third.wait()
            await trio.testing.wait_all_tasks_blocked()  # before the clock jumps past its backoff
            assert bus.statistics().parked_keys
            await sub.unsubscribe()
            sub = await bus.subscribe("orders", handler)
        await wait_until_handled(bus)
        took = trio.current_time() - start
    assert violations == []
    assert finished == {key: list(range(per_key)) for key in keys}  # nothing lost, nothing twice
    assert not [r for r in caplog.records if "did not come back" in r.getMessage()]
    assert took < DEFER_GRACE


async def test_a_spill_due_sooner_comes_back_sooner_than_one_memory_already_waits_for(
    autojump_clock: object,
) -> None:
    # memory:// redelivers deferred messages from one task per group, which slept until the due time it had
    # chosen: a key parked for 1 s had its spilled messages back only when another key's, deferred for 100 s,
    # fell due.
    retry = keyedbus.RetryPolicy(
        max_attempts=100, initial_backoff=1, multiplier=10, max_backoff=1000, jitter=0
    )
    handled: list[tuple[bytes, float]] = []

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "a" or (msg.data == b"b0" and msg.attempt == 1):
            raise RuntimeError("poison")
        handled.append((msg.data, trio.current_time()))

    pool = keyedbus.PoolConfig(workers=1, queue_size=8)  # parked keys keep 4: the rest is spilled
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=0) as bus:
        await bus.subscribe("orders", handler)
        for i in range(4):
            await bus.publish("orders", b"a%d" % i, key="a")
        await trio.sleep(12)  # a0 failed at 0, 1 and 11 s: a is parked until 111 s, holding a0..a3
        start = trio.current_time()
        for i in (4, 5):
            await bus.publish("orders", b"a%d" % i, key="a")  # spilled, due at 111 s
        for i in range(4):
            await bus.publish("orders", b"b%d" % i, key="b")  # b0 fails once: b1..b3 spilled, due in 1 s
        await trio.sleep(30)
        assert [data for data, _ in handled] == [b"b0", b"b1", b"b2", b"b3"]
        assert all(at - start < 2 for _, at in handled)


async def test_a_flooded_failing_keys_deferred_messages_come_back_less_often_as_it_keeps_failing(
    autojump_clock: object,
) -> None:
    # A key parked with messages deferred to the broker gets them back when its retry is due; if the retry
    # fails, each is handed back again (a redelivery and a deferral apiece: a JetStream nak). Each retry did
    # that for every deferred message, so a flooded key that kept failing cost work in proportion to its
    # backlog times its retries (poison_isolation: hundreds a run). The extra wait doubles with each
    # failure, up to the policy's max_backoff, which bounds how long a key that recovers waits for them.
    redeliveries: list[tuple[float, int]] = []
    feed = _OneWorkerFeed(on_defer=lambda seq, due: heapq.heappush(redeliveries, (due, seq)))
    feed.consumer.retry = keyedbus.RetryPolicy(
        max_attempts=100_000, initial_backoff=0.1, multiplier=1, max_backoff=8, jitter=0
    )

    async def broker(until: float) -> None:
        """Deliver each deferred message again when it is due, until `until`."""
        while redeliveries and redeliveries[0][0] <= until:
            due, seq = heapq.heappop(redeliveries)
            await trio.sleep_until(due)
            await feed.send(seq)

    async with trio.open_nursery() as nursery:
        feed.pool.start(nursery)
        for seq in range(1, 11):
            await feed.send(seq)
        assert feed.deferred == [3, 4, 5, 6, 7, 8, 9, 10]  # 1 failed: 1 and 2 kept, every 0.1 s retried
        await broker(until=120)  # 1,200 failed retries
        # Once per retry was 1,200 deferrals each; doubling from 0.5 s, capped at 8 s, it is about 20.
        assert len(feed.deferred) <= 8 * 25
        feed.consumer.healed = True
        healed = trio.current_time()
        await broker(until=float("inf"))
        assert feed.consumer.handled == list(range(1, 11))
        assert trio.current_time() - healed <= 0.1 + 8  # its retry, then the longest extra wait
        assert (feed.pool.unfinished, feed.pool.lanes()) == (0, 0)
        feed.pool.close()


@attrs.define(eq=False)
class _FakeDelivery:
    """A persistent delivery as the pool sees it, recording deferrals (a broker's nak with a delay)."""

    sequence: int
    deferred: list[int]
    settled: list[int]
    epoch: int = 0
    withdrawn: bool = False
    spillable: bool = True
    #: What a broker that can tell still holds of what was deferred; None: it cannot tell (the grace decides).
    holds: set[int] | None = None
    message: keyedbus.Message = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.message = keyedbus.Message(topic="orders", data=b"", key="p", headers={}, attempt=1)

    def ack(self) -> None:
        self.settled.append(self.sequence)

    term = ack

    def release(self) -> None:
        pass

    #: Called with (sequence, due time) at each deferral: a broker that redelivers it then.
    on_defer: Callable[[int, float], object] | None = None

    def defer(self, delay: float) -> bool:
        self.deferred.append(self.sequence)
        if self.on_defer is not None:
            self.on_defer(self.sequence, trio.current_time() + delay)
        return True

    def will_redeliver(self, sequence: int) -> bool | None:
        return None if self.holds is None else sequence in self.holds


@attrs.define(eq=False)
class _FakeConsumer:
    """A subscription as the pool sees it: key "p" fails until healed."""

    handled: list[int] = attrs.Factory(list)
    healed: bool = False
    active: bool = True
    topic: str = "orders"
    retry: keyedbus.RetryPolicy = attrs.Factory(
        lambda: keyedbus.RetryPolicy(max_attempts=100, initial_backoff=100, max_backoff=100, jitter=0)
    )

    async def handle(self, item: AggregateMessage) -> None:
        if not self.healed:
            raise RuntimeError("poison")
        self.handled.append(item.delivery.sequence)

    async def dead_letter(self, item: AggregateMessage, reason: str, failure: BaseException | None) -> None:
        raise AssertionError("nothing is dead-lettered here")

    def released(self, item: AggregateMessage) -> None:
        pass


@attrs.define(eq=False)
class _OneWorkerFeed:
    """One worker with room for 4 (a parked key keeps 2), fed messages of key "p" as a broker would."""

    holds: set[int] | None = None  # see _FakeDelivery.holds
    on_defer: Callable[[int, float], object] | None = None  # see _FakeDelivery.on_defer
    deferred: list[int] = attrs.Factory(list)
    settled: list[int] = attrs.Factory(list)
    consumer: _FakeConsumer = attrs.Factory(_FakeConsumer)
    pool: KeyedWorkerPool = attrs.Factory(
        lambda: KeyedWorkerPool(keyedbus.PoolConfig(workers=1, queue_size=4), Counters())
    )

    async def send(self, seq: int, epoch: int = 0) -> None:
        """Hand the pool message `seq` and let it go as far as it can."""
        delivery = _FakeDelivery(
            seq, self.deferred, self.settled, epoch, holds=self.holds, on_defer=self.on_defer
        )
        assert self.pool.send_nowait(0, AggregateMessage("p", delivery, self.consumer, delivery.message))
        await trio.testing.wait_all_tasks_blocked()


async def test_a_partition_changing_hands_lets_go_of_deferred_and_kept_messages(
    autojump_clock: object,
) -> None:
    # JetStream gives a partition to another process (scale-out): what the pool deferred of its keys is
    # redelivered there. Before, messages kept early here stayed kept (the new reader held their keys as
    # owed, since they were unsettled) until DEFER_GRACE gave up on the older ones, 120 s later (torture
    # --scaleout with queue_size=8: 125-132 s instead of ~25 s).
    feed = _OneWorkerFeed()
    pool, consumer, deferred, settled, send = feed.pool, feed.consumer, feed.deferred, feed.settled, feed.send

    async with trio.open_nursery() as nursery:
        pool.start(nursery)
        for seq in range(1, 6):
            await send(seq)
        assert deferred == [3, 4, 5]  # 1 failed: 1 and 2 kept, parked for 100 s; 3..5 handed back
        consumer.healed = True
        await trio.sleep(101)
        assert consumer.handled == [1, 2]  # the key now waits for 3..5 to come back, in order
        await send(4)  # back before 3: kept
        assert (pool.unfinished, consumer.handled) == (1, [1, 2])
        pool.forget_deferred(consumer, lambda key: key == "p")
        assert deferred == [3, 4, 5, 4]  # the kept one handed back at once, for the new reader
        assert pool.unfinished == 0
        await send(6)  # still on its way here when the partition went: it follows the deferred ones
        assert deferred == [3, 4, 5, 4, 6]
        await send(7, epoch=1)  # the partition came back later: the broker orders the key (owed keys)
        assert consumer.handled == [1, 2, 7]
        assert (pool.unfinished, pool.lanes()) == (0, 0)
        pool.close()
    assert settled == [1, 2, 7]


async def test_deferred_messages_lost_with_their_stream_let_the_kept_ones_and_later_ones_run_in_order(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # An operator deletes a JetStream stream and makes it again (or the broker restarts with an empty store)
    # while a key has messages handed back: they never come back. The backend says so at once; the key runs
    # what it kept early, in order, then the new stream's messages, instead of waiting DEFER_GRACE.
    feed = _OneWorkerFeed()
    pool, consumer, deferred, settled, send = feed.pool, feed.consumer, feed.deferred, feed.settled, feed.send
    caplog.set_level(logging.WARNING, logger="keyedbus")

    async with trio.open_nursery() as nursery:
        pool.start(nursery)
        for seq in range(1, 7):
            await send(seq)
        assert deferred == [3, 4, 5, 6]  # 1 failed: 1 and 2 kept, parked for 100 s; 3..6 handed back
        consumer.healed = True
        await trio.sleep(101)
        assert consumer.handled == [1, 2]
        await send(5)  # back before 3 and 4: kept
        await send(6)
        assert (pool.unfinished, consumer.handled) == (2, [1, 2])
        start = trio.current_time()
        pool.forget_deferred(consumer, lambda key: key == "p", lost=True)  # 3 and 4 went with the stream
        await trio.testing.wait_all_tasks_blocked()
        assert consumer.handled == [1, 2, 5, 6]
        assert trio.current_time() == start  # at once, not after DEFER_GRACE
        await send(1, epoch=1)  # the new stream numbers from 1 again
        assert consumer.handled == [1, 2, 5, 6, 1]
        assert (pool.unfinished, pool.lanes()) == (0, 0)
        pool.close()
    assert settled == [1, 2, 5, 6, 1]
    assert deferred == [3, 4, 5, 6]  # nothing handed back again
    [lost] = [r.getMessage() for r in caplog.records if "went with their stream" in r.getMessage()]
    assert lost.startswith("orders: 2 deferred message(s) of key p went with their stream")


async def test_a_give_up_timer_firing_while_the_key_is_parked_fires_again_when_it_resumes(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A deferred message kept early waits for an older one; if that one never comes back, a timer gives
    # up on it DEFER_GRACE after its due time. When the timer fired while the key was parked for a retry,
    # it was not armed again: the kept message stayed kept for good (nothing else of the key arriving).
    feed = _OneWorkerFeed()  # the consumer fails until healed; every retry 100 s later
    pool, consumer, deferred, settled, send = feed.pool, feed.consumer, feed.deferred, feed.settled, feed.send

    async with trio.open_nursery() as nursery:
        pool.start(nursery)
        start = trio.current_time()
        for seq in range(1, 6):
            await send(seq)
        assert deferred == [3, 4, 5]  # 1 failed: parked 100 s with 2; 3..5 handed back, due then
        consumer.healed = True
        await trio.sleep_until(start + 101)
        assert consumer.handled == [1, 2]  # the key waits for 3..5
        await send(5)  # back before 3 and 4: kept; given up on 4 at its due time + DEFER_GRACE at most
        await trio.sleep_until(start + 150)
        consumer.healed = False
        await send(3)  # back: it runs, fails, and parks the key until start + 250, past that give-up time
        await trio.sleep_until(start + 100 + DEFER_GRACE + 10)
        assert pool.unfinished == 2  # 3 parked, 5 kept: nothing given up while the key is parked
        consumer.healed = True
        with trio.fail_after(DEFER_GRACE):
            await pool.wait_idle()
        pool.close()
    assert consumer.handled == [1, 2, 3, 5]  # 4 never came back: given up once the key ran again
    assert settled == [1, 2, 3, 5]
    assert [r for r in caplog.records if "sequence 4) did not come back" in r.getMessage()]


async def test_a_kept_message_waits_while_the_broker_holds_the_older_one_and_goes_on_once_it_settled_it(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker that can tell (JetStream by its ack floor, memory:// by its log) is asked again every second
    # while a message of the key waits, kept early: the key waits as long as the older message is held
    # (however late), and goes on within a second once the broker settled it elsewhere, not DEFER_GRACE
    # after its due time.
    holds = {3, 4, 5}
    feed = _OneWorkerFeed(holds)
    pool, consumer, deferred, send = feed.pool, feed.consumer, feed.deferred, feed.send

    async with trio.open_nursery() as nursery:
        pool.start(nursery)
        start = trio.current_time()
        for seq in range(1, 6):
            await send(seq)
        assert deferred == [3, 4, 5]  # 1 failed: parked 100 s with 2; 3..5 handed back, due then
        consumer.healed = True
        await trio.sleep_until(start + 101)
        await send(5)  # back before 3 and 4: kept (on its way here, it is still the broker's to settle)
        await trio.sleep_until(start + 160)
        assert (consumer.handled, pool.unfinished) == ([1, 2], 1)  # 3 and 4 are held: late, not lost
        holds.discard(3)  # the broker settled 3 (another delivery of it was acked)
        await trio.sleep_until(start + 162)
        assert [r for r in caplog.records if "sequence 3) will not come back" in r.getMessage()]
        assert (consumer.handled, pool.unfinished) == ([1, 2], 1)  # 4 is still held: 5 waits for it
        await send(4)
        assert consumer.handled == [1, 2, 4, 5]
        assert (pool.unfinished, pool.lanes()) == (0, 0)
        pool.close()


async def test_a_message_deferred_after_younger_ones_of_its_key_still_comes_first(
    autojump_clock: object,
) -> None:
    # A key re-parked while another key's parked message takes the worker's parked room spills its own
    # held message, older than those it deferred before: the key's deferred sequences are no longer handed
    # back in order (a heap keeps the oldest first), and they come back in any order.
    feed = _OneWorkerFeed()  # the consumer fails until healed; every retry 100 s later
    pool, consumer, deferred, settled, send = feed.pool, feed.consumer, feed.deferred, feed.settled, feed.send

    async with trio.open_nursery() as nursery:
        pool.start(nursery)
        start = trio.current_time()
        for seq in range(1, 6):
            await send(seq)
        assert deferred == [3, 4, 5]  # 1 failed: parked until 100 s with 2; 3..5 handed back
        await trio.sleep_until(start + 50)
        other = _FakeDelivery(10, deferred, settled)
        assert pool.send_nowait(0, AggregateMessage("q", other, consumer, other.message))
        await trio.testing.wait_all_tasks_blocked()  # key q fails: parked until 150 s, 1 of the 2 parked
        await trio.sleep_until(start + 100.5)
        assert deferred == [3, 4, 5, 2]  # 1 failed again: room for 1 parked message of p, so 2 went back
        consumer.healed = True
        await trio.sleep_until(start + 200.5)
        assert consumer.handled == [10, 1]  # p waits for 2..5 to come back
        for seq in (4, 5, 2, 3):  # back out of order: 4 and 5 kept until 2 and 3 are back
            await send(seq)
        assert consumer.handled == [10, 1, 2, 3, 4, 5]
        assert (pool.unfinished, pool.lanes()) == (0, 0)
        pool.close()
    assert settled == [10, 1, 2, 3, 4, 5]


# -- cancellation never loses silently -----------------------------------------------------------------


async def test_a_subscription_task_stopped_mid_batch_counts_ephemeral_messages_as_dropped(
    autojump_clock: object,
) -> None:
    release = trio.Event()
    handled = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        await release.wait()
        handled += 1

    pool = keyedbus.PoolConfig(workers=1, queue_size=2, wait_timeout=1000)
    async with keyedbus.open_bus(pool=pool) as bus:
        await bus.configure_topic("ticks", EPHEMERAL)
        sub = await bus.subscribe("ticks", handler)
        for i in range(10):
            await bus.publish("ticks", str(i).encode(), key="k")
        await trio.testing.wait_all_tasks_blocked()  # the task waits for room, mid-batch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.unsubscribe)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
    stats = bus.statistics()
    # Nothing vanished: each message was handled, or counted as dropped (released from the lane or the
    # channel after the unsubscribe, or handed back unsent by the cancelled subscription task).
    assert handled + stats.dropped == 10
    assert handled >= 1
    assert stats.dropped >= 7


async def test_a_subscription_task_stopped_mid_batch_hands_persistent_messages_back(
    autojump_clock: object,
) -> None:
    release = trio.Event()
    first: list[bytes] = []
    second: list[tuple[bytes, int]] = []

    async def slow(msg: keyedbus.Message) -> None:
        await release.wait()
        first.append(msg.data)

    async def fast(msg: keyedbus.Message) -> None:
        second.append((msg.data, msg.attempt))

    pool = keyedbus.PoolConfig(workers=1, queue_size=2)
    async with keyedbus.open_bus(pool=pool) as bus:
        sub = await bus.subscribe("orders", slow, group="g")
        for i in range(10):
            await bus.publish("orders", str(i).encode(), key="k")
        await trio.testing.wait_all_tasks_blocked()  # the task waits for room, mid-batch
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sub.unsubscribe)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        await bus.subscribe("orders", fast, group="g")
        await wait_until_handled(bus)
    assert first == [b"0"]
    # Everything else comes back to the next subscriber of the group, in key order.
    assert [data for data, _ in second] == [str(i).encode() for i in range(1, 10)]
    assert bus.statistics().dropped == 0


# -- lifecycle -----------------------------------------------------------------------------------------------


async def test_bus_and_subscription_states(autojump_clock: object) -> None:
    states: list[str] = []

    async def handler(msg: keyedbus.Message) -> None:
        states.append(bus.state)

    async with keyedbus.open_bus() as bus:
        assert bus.state == "open"
        sub = await bus.subscribe("orders", handler)
        assert sub.state == "open"
        await bus.publish("orders", b"x")
    assert states == ["draining"]  # it was handled by the drain, after the block ended
    assert str(bus.state) == "closed"
    assert str(sub.state) == "closed"


async def test_unsubscribe_after_the_bus_closed_returns_at_once(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        sub = await bus.subscribe("orders", noop)
    start = trio.current_time()
    with trio.fail_after(1):
        await sub.unsubscribe()
    assert trio.current_time() == start


async def test_a_cancelled_unsubscribe_still_frees_the_slot_and_hands_back(autojump_clock: object) -> None:
    release = trio.Event()
    second: list[bytes] = []

    async def slow(msg: keyedbus.Message) -> None:
        await release.wait()

    async def fast(msg: keyedbus.Message) -> None:
        second.append(msg.data)

    async def release_later() -> None:
        await trio.sleep(2)
        release.set()

    async with keyedbus.open_bus() as bus:
        sub = await bus.subscribe("orders", slow)
        for i in range(3):
            await bus.publish("orders", str(i).encode(), key="k")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_later)
            with trio.move_on_after(1) as scope:
                await sub.unsubscribe()  # waits for the running handler: cancelled after 1 s
        assert scope.cancelled_caught
        # Shielded, it still waited for the running handler (2 s, within its bound) and handed back.
        assert trio.current_time() - start == 2
        assert sub.state == "closed"
        await bus.subscribe("orders", fast)  # the slot is free
        await wait_until_handled(bus)
    assert second == [b"1", b"2"]


# -- exception groups ---------------------------------------------------------------------------------------


async def test_a_users_error_comes_out_bare_and_a_users_group_unchanged(autojump_clock: object) -> None:
    with pytest.raises(ValueError, match=r"^mine$") as bare:
        async with keyedbus.open_bus():
            raise ValueError("mine")
    assert not isinstance(bare.value, BaseExceptionGroup)
    group = ExceptionGroup("both", [ValueError("a"), KeyError("b")])
    with pytest.raises(ExceptionGroup) as caught:
        async with keyedbus.open_bus():
            raise group
    assert caught.value is group


def test_the_users_error_wins_and_internal_ones_become_its_context() -> None:
    user = ValueError("mine")
    internal = RuntimeError("keyedbus broke")
    chosen = to_raise(BaseExceptionGroup("nursery", [internal, user]), user)
    assert chosen is user
    assert user.__context__ is internal
    lone = RuntimeError("alone")
    assert to_raise(BaseExceptionGroup("nursery", [lone]), None) is lone
    deep = ExceptionGroup("inner", [KeyError("x")])
    assert to_raise(BaseExceptionGroup("nursery", [deep]), None) is deep  # one level only


# -- workers survive any handler ----------------------------------------------------------------------------


async def test_a_stray_cancelled_fails_one_attempt_and_other_keys_keep_flowing(
    autojump_clock: object,
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=1, max_backoff=1, jitter=0)
    attempts: list[int] = []
    others: list[str] = []

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "stray":
            attempts.append(msg.attempt)
            if msg.attempt == 1:
                with trio.CancelScope() as scope:
                    scope.cancel()
                    try:
                        await trio.sleep(1)
                    except trio.Cancelled as exc:
                        stray = exc  # caught in its own scope...
                raise stray  # ...and raised outside it
            return
        others.append(msg.key or "")

    pool = keyedbus.PoolConfig(workers=4)
    async with keyedbus.open_bus(pool=pool, retry=retry) as bus:
        await bus.subscribe("orders", handler)
        await bus.publish("orders", b"x", key="stray")
        for i in range(20):
            await bus.publish("orders", b"y", key=f"k{i}")
        await wait_until_handled(bus)
        assert bus.statistics().workers == 4
    assert attempts == [1, 2]
    assert sorted(others) == sorted(f"k{i}" for i in range(20))
    assert bus.statistics().retried == 1


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_keyboard_interrupt_and_system_exit_from_a_handler_leave_open_bus_as_themselves(
    exc_type: type[BaseException], autojump_clock: object
) -> None:
    async def handler(msg: keyedbus.Message) -> None:
        raise exc_type

    with pytest.raises(exc_type):  # noqa: PT012 - the block is the subject
        async with keyedbus.open_bus() as bus:
            await bus.subscribe("orders", handler)
            await bus.publish("orders", b"x", key="k")
            await trio.sleep(10)
    assert bus.statistics().handled == 0


async def test_any_other_base_exception_fails_the_attempt_only(autojump_clock: object) -> None:
    async def handler(msg: keyedbus.Message) -> None:
        raise _Odd("odd")

    async with keyedbus.open_bus(retry=ONCE) as bus:
        await bus.subscribe("orders", handler)
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"x", key="k")
        await wait_until_handled(bus)
    assert [m.headers["Keyedbus-Error"] for m in dead] == ["_Odd: odd"]


# -- handlers ----------------------------------------------------------------------------------------------


async def test_a_lambda_around_an_async_function_is_a_handler(autojump_clock: object) -> None:
    seen: list[bytes] = []

    async def record(msg: keyedbus.Message, tag: str) -> None:
        seen.append(tag.encode() + msg.data)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", lambda msg: record(msg, "t:"))
        await bus.publish("orders", b"x")
    assert seen == [b"t:x"]


async def test_a_callable_returning_no_awaitable_fails_its_messages_naming_it(
    autojump_clock: object,
) -> None:
    class Sync:
        def __call__(self, msg: keyedbus.Message) -> None:
            pass

    async with keyedbus.open_bus(retry=ONCE) as bus:
        await bus.subscribe("orders", Sync())  # type: ignore[arg-type]
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"x", key="k")
        await wait_until_handled(bus)
    [letter] = dead
    assert letter.headers["Keyedbus-Error"].startswith("InvalidHandlerError: handler ")
    assert "Sync" in letter.headers["Keyedbus-Error"]
    assert "returned NoneType, not an awaitable" in letter.headers["Keyedbus-Error"]


# -- failures are objects ------------------------------------------------------------------------------------


async def test_retries_log_one_warning_line_and_the_dead_letter_logs_the_traceback(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=1, max_backoff=1, jitter=0)

    async def handler(msg: keyedbus.Message) -> None:
        raise ValueError("broken\nacross lines")

    async with keyedbus.open_bus(retry=retry) as bus:
        await bus.subscribe("orders", handler)
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"x", key="k")
        await wait_until_handled(bus)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
    assert warning.exc_info is None
    [final] = [r for r in caplog.records if r.levelno == logging.ERROR and "dead-lettered" in r.getMessage()]
    assert final.exc_info is not None
    assert isinstance(final.exc_info[1], ValueError)
    assert "Traceback" in caplog.text
    # The header keeps the old "Type: message" text, on one line.
    assert dead[0].headers["Keyedbus-Error"] == "ValueError: broken across lines"


# -- flat cost ----------------------------------------------------------------------------------------------


async def test_nothing_of_a_message_stays_alive_once_it_is_handled(autojump_clock: object) -> None:
    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=8)) as bus:
        await bus.subscribe("freed", noop)
        for i in range(2000):
            await bus.publish("freed", b"x", key=f"key-{i}")
        await wait_until_handled(bus)
        gc.collect()
        assert bus.statistics().lanes == 0
        # No lane, parked state or message is kept (an idle worker once held its last message).
        left = [o for o in gc.get_objects() if isinstance(o, AggregateMessage)]
        assert not [o for o in left if o.delivery.message.topic == "freed"]


async def test_a_key_parked_then_handed_back_leaves_no_timer_that_resumes_another_key_early(
    autojump_clock: object,
) -> None:
    # Lanes are reused for new keys (a lane per message cost ~2k instructions). A parked key handed back by
    # unsubscribe leaves its retry timer behind; the keys that come next must each be retried after their
    # own backoff, in order, once: never resumed by that timer (due 1 s before theirs), whatever lane they
    # got.
    retry = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=5, max_backoff=5, jitter=0)
    seen: list[tuple[str, int, int, float]] = []  # key, value, attempt, when

    async def always_fails(msg: keyedbus.Message) -> None:
        raise RuntimeError("parked")

    async def handler(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        seen.append((msg.key, int(msg.data), msg.attempt, trio.current_time()))
        if msg.key.startswith("q") and msg.attempt == 1:
            raise RuntimeError("fails once")

    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=4), retry=retry) as bus:
        sub = await bus.subscribe("orders", always_fails)
        await bus.publish("orders", b"0", key="p")
        await trio.testing.wait_all_tasks_blocked()
        assert bus.statistics().parked_keys == 1
        parked_at = trio.current_time()
        await sub.unsubscribe()  # hands "p" back at once; its timer (due parked_at + 5) stays behind
        await trio.sleep(1)
        await bus.subscribe("orders", handler)
        keys = [f"k{i}" for i in range(30)] + ["q0", "q1"]
        for value in range(3):
            for key in keys:
                await bus.publish("orders", str(value).encode(), key=key)
        with trio.fail_after(100):
            await wait_until_handled(bus)
    assert [w for k, v, a, w in seen if k.startswith("q") and v == 0 and a == 1] == [parked_at + 1] * 2
    done: dict[str, list[int]] = {}
    for key, value, attempt, when in seen:
        if key.startswith("q") and attempt == 1:
            (retried,) = [w for k, v, a, w in seen if k == key and v == value and a == 2]
            assert retried >= when + 5  # its own backoff, not an earlier timer's
            continue
        done.setdefault(key, []).append(value)
    assert done == {"p": [0], **{key: [0, 1, 2] for key in keys}}  # once each, in order


def test_bus_and_subscription_have_no_public_constructor() -> None:
    with pytest.raises(
        TypeError, match=r"^keyedbus\.Bus has no public constructor: use keyedbus\.open_bus\(\)$"
    ):
        keyedbus.Bus()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^keyedbus\.Subscription has no public constructor"):
        keyedbus.Subscription()  # type: ignore[call-arg]


async def test_a_decoder_raising_any_exception_type_dead_letters_the_message(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: object
) -> None:
    def broken(data: bytes) -> keyedbus.Envelope:
        raise OverflowError("int too large to convert")

    monkeypatch.setattr(keyedbus.Envelope, "decode", staticmethod(broken))
    async with keyedbus.open_bus() as bus:
        await bus.subscribe_envelope("orders", noop)  # type: ignore[arg-type]
        dead = await _collect_dead(bus)
        await bus.publish("orders", b"{}", key="k")  # returns: the subscription task decodes, not publish
        await wait_until_handled(bus)
    assert [m.headers["Keyedbus-Error"] for m in dead] == ["OverflowError: int too large to convert"]


async def test_a_cancelled_subscribe_leaves_nothing_subscribed(autojump_clock: object) -> None:
    ghost: list[bytes] = []
    seen: list[bytes] = []

    async def cancelled_handler(msg: keyedbus.Message) -> None:
        ghost.append(msg.data)

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg.data)

    async with keyedbus.open_bus() as bus:
        with trio.CancelScope() as scope:
            scope.cancel()
            await bus.subscribe("orders", cancelled_handler)
        await bus.publish("orders", b"after")
        await trio.testing.wait_all_tasks_blocked()  # nothing may take it meanwhile
        await bus.subscribe("orders", handler)  # the (topic, group) is free, and only this one delivers
        await wait_until_handled(bus)
    assert ghost == []
    assert seen == [b"after"]


async def test_a_deferred_message_back_long_after_its_due_time_keeps_its_keys_order(
    autojump_clock: object,
) -> None:
    """memory://, no limits: a parked key's spilled messages come back only once the subscription gets room
    in the worker queue (backpressure), far past DEFER_GRACE; nothing is lost, so the key waits for them."""
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=10, max_backoff=10, jitter=0)
    dead: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "p":
            if msg.attempt == 2:
                dead.append(int(msg.data))
            raise RuntimeError("poison")
        await trio.sleep(20)  # one worker, 25 of these: the subscription waits for room for 500 s

    pool = keyedbus.PoolConfig(workers=1, queue_size=2)  # a parked key keeps 1: p2 and p3 are deferred
    async with keyedbus.open_bus(pool=pool, retry=retry, drain_timeout=10_000) as bus:
        await bus.subscribe("orders", handler)
        for i in range(30):
            await bus.publish("orders", b"%d" % i, key="p" if i < 4 or i == 29 else f"s{i}")
        await wait_until_handled(bus)
        assert bus.statistics().dead_lettered == 5
    # Before: p29 arrived ~500 s after p2 and p3 were due, the pool gave them up as lost, and ran p29 first.
    assert dead == [0, 1, 2, 3, 29]
