"""keyedbus from sync code (a script, a notebook cell, a WSGI view) through keyedbus.blocking.

Run it with:  python examples/blocking_script.py
"""

from __future__ import annotations

import threading

import keyedbus
import keyedbus.blocking


def main() -> None:
    totals: dict[str, int] = {}
    lock = threading.Lock()  # sync handlers run in worker threads: guard what they share

    def on_payment(msg: keyedbus.Message) -> None:  # a plain function; one message of a key at a time
        assert msg.key is not None
        with lock:
            totals[msg.key] = totals.get(msg.key, 0) + int(msg.data)

    with keyedbus.blocking.open_bus() as bus:  # "memory://" by default; nats://host:port works the same
        bus.subscribe("payments", on_payment)
        for n in range(30):
            bus.publish("payments", str(n).encode(), key=f"customer-{n % 3}")
        print(bus.statistics())
    # Leaving the block drained the bus: every payment was handled.
    for customer, total in sorted(totals.items()):
        print(customer, total)


if __name__ == "__main__":
    main()
