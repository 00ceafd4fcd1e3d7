"""Export bus statistics to Prometheus: a collector reads the latest snapshot, taken by a trio task.

Needs the metrics extra:  pip install 'keyedbus[metrics]'
Run it with:  python examples/prometheus_metrics.py
In a service, call prometheus_client.start_http_server(9100) once and keep the snapshot task running.
"""

from __future__ import annotations

from collections.abc import Iterator

import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

import keyedbus


class BusCollector(Collector):
    """Reads the newest BusStatistics snapshot: a scrape never calls into the bus (another thread)."""

    def __init__(self) -> None:
        self.latest: keyedbus.BusStatistics | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.latest
        if stats is None:
            return
        for name in ("handled", "retried", "dead_lettered", "dropped"):
            yield CounterMetricFamily(
                f"keyedbus_{name}", f"messages {name} since the bus opened", getattr(stats, name)
            )
        for name in ("queued", "in_flight", "parked_keys", "lag", "workers"):
            yield GaugeMetricFamily(f"keyedbus_{name}", f"{name} now", getattr(stats, name))
        yield GaugeMetricFamily("keyedbus_connected", "1 if the broker is reachable", int(stats.connected))


async def keep_snapshot(bus: keyedbus.Bus, collector: BusCollector, every: float) -> None:
    while True:
        collector.latest = bus.statistics()
        await trio.sleep(every)


async def main() -> None:
    registry = CollectorRegistry()
    collector = BusCollector()
    registry.register(collector)

    all_handled = trio.Event()
    handled = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        if msg.data == b"bad" and msg.attempt == 1:
            raise RuntimeError("fails once")
        handled += 1
        if handled == 3:
            all_handled.set()

    retry = keyedbus.RetryPolicy(initial_backoff=0.01)
    async with keyedbus.open_bus(retry=retry) as bus, trio.open_nursery() as nursery:
        nursery.start_soon(keep_snapshot, bus, collector, 0.1)
        await bus.subscribe("orders", handler)
        for data in (b"ok", b"bad", b"ok"):
            await bus.publish("orders", data, key="order-1")
        await all_handled.wait()
        await trio.testing.wait_all_tasks_blocked()  # let the pool count the last one
        collector.latest = bus.statistics()
        nursery.cancel_scope.cancel()
    text = generate_latest(registry).decode()
    print("\n".join(line for line in text.splitlines() if not line.startswith("#")))
    assert "keyedbus_handled_total 3.0" in text


if __name__ == "__main__":
    trio.run(main)
