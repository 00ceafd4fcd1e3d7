"""A poison key flooded past its bound on JetStream: its backlog is handed back with delayed naks (spilled).

Each test starts its own nats-server (killed by pid and restarted on the same store where it says so); a
foreign client is plain nats-py on plain asyncio in a subprocess (tests/foreign_nats.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

import keyedbus
from keyedbus._backends.jetstream import consumer_name, stream_name
from keyedbus._pool import DEFER_GRACE, fnv1a_32
from keyedbus.testing import NatsServer, wait_until_handled

from .test_conformance import OrderChecker, flood_a_parked_key
from .test_wire import foreign

pytestmark = pytest.mark.nats


async def test_a_deferred_message_the_broker_settled_meanwhile_does_not_hold_its_key(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The pool hands a parked key's backlog back (a nak with a delay) and then waits for it, oldest first.
    # If the broker settles one of them meanwhile (another delivery of it was acked: after a broker restart
    # JetStream sent a message again before the ack of its first delivery reached it, and the copy was
    # deferred), it never comes back. The key waited DEFER_GRACE (120 s) for it, its later messages handed
    # back again and again. The broker knows: its ack floor passed the message.
    backoff = 3.0
    retry = keyedbus.RetryPolicy(max_attempts=100, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=1, queue_size=4)  # a parked key keeps 2: the rest is handed back
    handled: list[int] = []
    healed = False
    first_failure = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        if not healed:
            first_failure.set()
            raise RuntimeError("poison")
        handled.append(int(msg.data))

    caplog.set_level(logging.WARNING, logger="keyedbus")
    with trio.fail_after(DEFER_GRACE - 30):
        async with keyedbus.open_bus(nats_server.url, pool=pool, retry=retry, drain_timeout=30) as bus:
            await bus.subscribe("orders", handler)
            await flood_a_parked_key(bus, first_failure)  # 0 and 1 kept, 2..9 handed back
            # Another reader acks message 5 (stream sequence 6) while it is handed back here.
            ack = f"$JS.ACK.{stream_name('orders')}.{consumer_name('orders', '')}.1.6.6.0.0"
            assert await foreign(nats_server.url, {"op": "core_publish", "subject": ack}) == [{"ok": True}]
            healed = True
            await wait_until_handled(bus)
    assert handled == [0, 1, 2, 3, 4, 6, 7, 8, 9]  # in order; 5 was the other reader's
    assert [r for r in caplog.records if "(sequence 6) will not come back" in r.getMessage()]


async def test_a_flooded_poison_key_keeps_every_keys_order_across_a_broker_kill_while_handed_back(
    tmp_path: Path,
) -> None:
    # Guarantee 3 on JetStream: a poison key flooded past its worker's bound hands its backlog back to the
    # broker, so its neighbours run. The broker is SIGKILLed and restarted on the same store while that
    # backlog is nak'd with a delay: every message still comes back, in order, nothing lost, and nothing
    # waits DEFER_GRACE for a message the broker will not send again.
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    backoff = 1.0
    retry = keyedbus.RetryPolicy(max_attempts=1000, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=2, queue_size=8, wait_timeout=0.5)
    poison_worker = fnv1a_32("poison") % 2
    neighbours = [k for k in (f"k{i}" for i in range(100)) if fnv1a_32(k) % 2 == poison_worker][:4]
    elsewhere = [k for k in (f"k{i}" for i in range(100)) if fnv1a_32(k) % 2 != poison_worker][:4]
    keys = neighbours + elsewhere
    flood = 40
    checker = OrderChecker()
    healed = False
    first_failure = trio.Event()
    before_kill = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        key, seq = msg.key, int(msg.data)
        assert key is not None
        if key != "poison" and checker.done[key] and seq <= checker.done[key][-1]:
            return  # sent again after the kill, its ack lost with the broker (at-least-once): handled
        checker.start(key, seq)
        ok = False
        try:
            if key == "poison" and not healed:
                first_failure.set()
                raise RuntimeError("poison")
            ok = True
        finally:
            checker.end(key, seq, ok)
        if all(len(checker.done[k]) >= 5 for k in keys):
            before_kill.set()

    try:
        with trio.fail_after(DEFER_GRACE - 20):
            async with keyedbus.open_bus(
                server.url, pool=pool, retry=retry, default_topic=keyedbus.TopicConfig(ack_wait=2)
            ) as bus:
                await bus.subscribe("orders", handler)
                await bus.publish("orders", b"0", key="poison")
                await first_failure.wait()
                for i in range(1, flood + 1):
                    await bus.publish("orders", str(i).encode(), key="poison")
                for n in range(5):
                    for key in keys:
                        await bus.publish("orders", str(n).encode(), key=key)
                # The neighbours ran while the poison key's backlog is handed back, again at each retry.
                await before_kill.wait()
                server.kill()
                while bus.statistics().connected:  # noqa: ASYNC110 - nats-py notices by itself
                    await trio.sleep(0.01)
                await trio.sleep(0.5)
                server.start()
                while not bus.statistics().connected:  # noqa: ASYNC110 - and reconnects by itself
                    await trio.sleep(0.01)
                for n in range(5, 10):
                    for key in keys:
                        await bus.publish("orders", str(n).encode(), key=key)
                await bus.publish("orders", str(flood + 1).encode(), key="poison")
                healed = True
                await wait_until_handled(bus)
    finally:
        server.stop()
    assert checker.violations == []
    assert checker.done["poison"] == list(range(flood + 2))  # in order, nothing lost, nothing twice
    assert {key: checker.done[key] for key in keys} == {key: list(range(10)) for key in keys}


@pytest.mark.parametrize("remade_by", ["operator", "empty-restart"])
async def test_a_parked_keys_messages_in_a_stream_made_again_by_an_operator_run_promptly_and_in_order(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture, remade_by: str
) -> None:
    # A parked key's backlog beyond its bound is handed back to the broker (delayed naks), and the key then
    # waits for those messages, oldest first. An operator deletes the stream and makes it again meanwhile
    # (or the broker restarts with an empty store, and keyedbus makes it again): what was handed back went
    # with the old stream and never comes back. The key waited DEFER_GRACE (120 s) for it, though the new
    # stream's messages of the key were there (and taken for the old ones where their stream sequences
    # matched). The backend knows: the stream's creation time changed.
    backoff = 4.0
    retry = keyedbus.RetryPolicy(max_attempts=100, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=2, queue_size=4)  # a parked key keeps 2: the rest is handed back
    handled: dict[str | None, list[int]] = {"poison": [], "other": []}
    healed = False
    first_failure = trio.Event()
    poison_done = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        if msg.key == "poison" and not healed:
            first_failure.set()
            raise RuntimeError("poison")
        if msg.key == "other":
            # Unsettled until the parked key is through: the new stream's ack floor stays below the
            # sequences handed back in the old one, so the floor cannot speak for them.
            await poison_done.wait()
        handled[msg.key].append(int(msg.data))
        if handled["poison"][-1:] == [15]:
            poison_done.set()

    name = stream_name("orders")
    caplog.set_level(logging.WARNING, logger="keyedbus")
    async with keyedbus.open_bus(nats_server.url, pool=pool, retry=retry, drain_timeout=30) as bus:
        with trio.fail_after(60):
            await bus.subscribe("orders", handler)
            await flood_a_parked_key(bus, first_failure)  # 0 and 1 kept, 2..9 (sequences 3..10) handed back
            if remade_by == "operator":
                done = await foreign(
                    nats_server.url,
                    {"op": "delete_stream", "name": name},
                    {"op": "add_stream", "config": {"name": name, "subjects": ["orders"]}},
                )
                assert done[0] == {"ok": True}
            else:
                nats_server.kill()
                await trio.to_thread.run_sync(shutil.rmtree, nats_server.store)
                await trio.to_thread.run_sync(nats_server.start)
                while not bus.statistics().connected:  # noqa: ASYNC110 - nats-py reconnects by itself
                    await trio.sleep(0.01)
            # In the new stream, sequences 1..3 go to another key; 4..9 are the parked key's, where the old
            # stream had messages handed back.
            for i in range(3):
                await bus.publish("orders", str(i).encode(), key="other")
            for i in range(10, 16):
                await bus.publish("orders", str(i).encode(), key="poison")
            while not [r for r in caplog.records if "recreated the consumer" in r.getMessage()]:  # noqa: ASYNC110
                await trio.sleep(0.05)
            healed = True
        # Far below DEFER_GRACE, generous for a loaded machine: the key's retry comes 4 s after it failed.
        with trio.fail_after(DEFER_GRACE / 4):
            await wait_until_handled(bus)
        evicted = bus.statistics().evicted
    # What the pool held of the old stream is handled; what it had handed back and did not have again went
    # with the old stream, counted and logged as evicted by a deletion. (Normally that is 2..9; on a slow
    # machine the key's retry may come before the deletion, and some come back first: those are handled.)
    poison = handled["poison"]
    assert poison == sorted(poison)
    assert poison[:2] == [0, 1]
    assert poison[-6:] == [10, 11, 12, 13, 14, 15]
    assert set(poison[2:-6]) <= set(range(2, 10))
    assert evicted == 8 - len(poison[2:-6])
    assert handled["other"] == [0, 1, 2]
    assert [r for r in caplog.records if f"evicted {evicted} message(s) of topic orders" in r.getMessage()]


async def test_a_copy_of_a_message_handled_here_never_holds_its_key_behind_the_ack_floor(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Around a broker restart JetStream may send a message again while the ack of its first delivery is on
    # its way. If its key has messages handed back (a parked key's spill), the copy was handed back too, the
    # nak ignored once the ack arrived, and the key waited for it until the consumer's ack floor passed it:
    # seconds, or as long as any other key's older message stays unsettled. Here another key's message
    # (sequence 1) runs until the parked key is through, so the floor stays below the copy: the key waited
    # for good. The process knows it acked that message: it settles the copy at once.
    from keyedbus._backends._connection import NatsConnection

    backoff = 1.5
    retry = keyedbus.RetryPolicy(max_attempts=100, initial_backoff=backoff, max_backoff=backoff, jitter=0)
    pool = keyedbus.PoolConfig(workers=2, queue_size=4)  # a parked key keeps 2: the rest is handed back
    handled: dict[str | None, list[int]] = {"poison": [], "other": []}
    first_failure = trio.Event()
    copy_came = trio.Event()
    poison_done = trio.Event()
    first = 2  # the stream sequence of "poison" 0

    # The ack of "poison" 0 is held back (on its way, as around a broker restart) until a copy of it comes,
    # and then reaches the server first: the copy's settle (a nak, or an ack) finds it settled.
    send = NatsConnection.queue_settles
    held: list[tuple[Any, str]] = []

    def queue_settles(conn: NatsConnection, settles: Any) -> None:
        out: list[tuple[Any, str]] = []
        for raw, how in settles:
            if raw.metadata.sequence.stream == first:
                if how == "ack" and not held and not copy_came.is_set():
                    held.append((raw, how))
                    continue
                if held:
                    copy_came.set()
                    out.extend(held)
                    held.clear()
            out.append((raw, how))
        send(conn, out)

    monkeypatch.setattr(NatsConnection, "queue_settles", queue_settles)

    async def handler(msg: keyedbus.Message) -> None:
        seq = int(msg.data)
        if msg.key == "other":
            await poison_done.wait()  # unsettled: the ack floor stays at 0
        elif (seq == 0 and msg.attempt == 1) or (seq == 1 and not copy_came.is_set()):
            first_failure.set()
            raise RuntimeError("poison")  # parked, its backlog handed back, until the copy of 0 came
        handled[msg.key].append(seq)
        if msg.key == "poison" and seq == 9:
            poison_done.set()

    async with keyedbus.open_bus(
        nats_server.url, pool=pool, retry=retry, default_topic=keyedbus.TopicConfig(ack_wait=2)
    ) as bus:
        with trio.fail_after(60):  # the copy comes ~ack_wait after the first delivery's last heartbeat
            await bus.subscribe("orders", handler)
            await bus.publish("orders", b"0", key="other")
            await flood_a_parked_key(bus, first_failure)  # "poison" 0 at sequence 2; 2..9 handed back
            await copy_came.wait()
            await wait_until_handled(bus)
    assert handled == {"poison": list(range(10)), "other": [0]}  # in order; the copy did not run again
