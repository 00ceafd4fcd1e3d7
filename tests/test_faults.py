"""Crashes against a real nats-server: the broker SIGKILLed mid-stream, a consumer process SIGKILLed.

Both use the torture run's handler (injected failures, timeouts, a poison key) and its independent checker,
which reads what the handlers recorded and trusts nothing the bus reports.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import trio

import keyedbus
from benchmarks import torture
from keyedbus.testing import NatsServer

pytestmark = pytest.mark.nats


async def _wait_finished(workdir: Path, count: int) -> None:
    # The records are files another process appends to: there is nothing to wait on but the files.
    while torture._finished_count(workdir) < count:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_every_message_is_handled_in_key_order_across_a_broker_kill(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    write = torture._open_record(tmp_path / "consumer-0.log")
    published = torture._open_record(tmp_path / "published.log")
    keys = torture._keys(30)
    total = 30 * 60
    pool = keyedbus.PoolConfig(workers=16, handler_timeout=torture.HANDLER_TIMEOUT)
    try:
        with trio.fail_after(120):
            async with keyedbus.open_bus(
                server.url,
                pool=pool,
                retry=torture.RETRY,
                default_topic=keyedbus.TopicConfig(ack_wait=2),
            ) as bus:
                await bus.subscribe(torture.TOPIC, torture.make_handler(torture.Faults(seed=3), write))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(torture.publish_all, bus, keys, 60, 4, published)
                    await _wait_finished(tmp_path, total // 3)
                    server.kill()
                    assert not server.running
                    while bus.statistics().connected:  # noqa: ASYNC110 - nats-py notices by itself
                        await trio.sleep(0.01)
                    await trio.sleep(0.5)  # down for a moment: publishes fail and are retried meanwhile
                    server.start()
                    while not bus.statistics().connected:  # noqa: ASYNC110 - and reconnects by itself
                        await trio.sleep(0.01)
                await _wait_finished(tmp_path, total)
    finally:
        server.stop()
    report = torture.check_workdir(tmp_path)
    assert report.published == total
    assert (report.lost, report.order_violations) == (0, 0), report.lines()
    assert report.handled + report.dead_lettered == total


def _spawn(url: str, workdir: Path, index: int) -> subprocess.Popen[bytes]:
    return torture._spawn_consumer(url, workdir, index, seed=5, ack_wait=2.0)


async def test_a_killed_consumer_process_loses_nothing_and_keeps_key_order(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    keys = torture._keys(30)
    total = 30 * 100
    published = torture._open_record(tmp_path / "published.log")
    first = await trio.to_thread.run_sync(_spawn, nats_server.url, tmp_path, 0)
    second: subprocess.Popen[bytes] | None = None
    try:
        with trio.fail_after(120):
            async with keyedbus.open_bus(nats_server.url) as bus:
                await torture.publish_all(bus, keys, 100, 4, published)
            await _wait_finished(tmp_path, total // 3)
            first.kill()  # SIGKILL, mid-stream
            await trio.to_thread.run_sync(first.wait)
            second = await trio.to_thread.run_sync(_spawn, nats_server.url, tmp_path, 1)
            await _wait_finished(tmp_path, total)
            second.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(second.wait) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
    report = torture.check_workdir(tmp_path)
    assert report.published == total
    assert (report.lost, report.order_violations) == (0, 0), report.lines()
    # What the killed consumer had not settled came back to the new one (attempt > 1).
    assert report.redelivered > 0
    assert report.dead_letters_received == report.dead_lettered
