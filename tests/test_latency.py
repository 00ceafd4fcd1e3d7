"""memory:// under a light load: each message of a short burst is handled as it is published, not batched."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import keyedbus

from .conftest import all_tasks

EPHEMERAL = keyedbus.TopicConfig(persistence="ephemeral")


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_short_burst_is_handled_as_it_is_published(config: keyedbus.TopicConfig) -> None:
    handled: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        handled.append(int(msg.data))

    async with keyedbus.open_bus() as bus:
        await bus.configure_topic("burst", config)
        await bus.subscribe("burst", handler)
        behind = []
        for i in range(50):
            await bus.publish("burst", str(i).encode(), key=f"key-{i}")
            behind.append(i + 1 - len(handled))
        # publish -> subscription task -> worker: two hops, each one scheduling round (a task woken in one
        # round runs in the next), one publish per round. A publisher that ran ahead by several publishes
        # before yielding would make every message of the burst wait for later ones.
        assert max(behind) <= 3, behind
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(handled) == list(range(50))


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_publisher_that_keeps_publishing_is_batched_by_two_before_a_flood(
    config: keyedbus.TopicConfig,
) -> None:
    handled: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        handled.append(int(msg.data))

    async with keyedbus.open_bus() as bus:
        await bus.configure_topic("steady", config)
        await bus.subscribe("steady", handler)
        behind = []
        for i in range(3000):
            await bus.publish("steady", str(i).encode(), key=f"key-{i % 1000}")
            behind.append(i + 1 - len(handled))
        # The first 256 publishes of a run go one per round; then two per round (a message waits for one
        # later publish at most) until 1,024: a paced publisher that fell behind its schedule catches up
        # without its messages waiting behind ever bigger batches. Only a longer flood is batched more, for
        # throughput (up to 16 publishes per yield, so up to three batches in flight).
        assert max(behind[:256]) <= 3, behind[:256]
        assert max(behind[256:1024]) <= 6, behind[256:1024]
        assert max(behind[2000:]) >= 16, behind[2000:]
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(handled) == list(range(3000))


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_quiet_subscription_keeps_no_task(config: keyedbus.TopicConfig) -> None:
    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=4)) as bus:
        await bus.configure_topic("quiet", config)
        await bus.subscribe("quiet", noop)
        await trio.testing.wait_all_tasks_blocked()
        idle = all_tasks()
        for i in range(100):
            await bus.publish("quiet", b"x", key=f"key-{i}")
        await trio.testing.wait_all_tasks_blocked()
        # Its subscription task ran while there was something to take, then exited (flat cost).
        assert bus.statistics().handled == 100
        assert all_tasks() == idle


async def noop(msg: keyedbus.Message) -> None:
    pass
