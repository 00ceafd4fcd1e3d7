"""Library conventions a user sees from outside: silent logging until configured, a named error when the
`nats` extra is missing. Each runs a fresh interpreter, as a user's program would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import keyedbus

RETRIED_ONCE = """
import logging, sys
import trio
import keyedbus

async def main() -> None:
    async def flaky(msg: keyedbus.Message) -> None:
        if msg.attempt == 1:
            raise RuntimeError("first attempt fails")

    async with keyedbus.open_bus(retry=keyedbus.RetryPolicy(initial_backoff=0.01)) as bus:
        await bus.subscribe("orders", flaky)
        await bus.publish("orders", b"x", key="order-1")
    print("done")

if sys.argv[1:] == ["configured"]:
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
trio.run(main)
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_the_library_prints_nothing_until_the_application_configures_logging() -> None:
    silent = _python(RETRIED_ONCE)
    assert silent.returncode == 0, silent.stderr
    assert silent.stderr == ""
    configured = _python(RETRIED_ONCE, "configured")
    assert configured.returncode == 0, configured.stderr
    assert "WARNING keyedbus handler failed on orders (key order-1, attempt 1 of 5)" in configured.stderr
    assert "first attempt fails" in configured.stderr


def test_the_keyedbus_logger_has_only_a_null_handler() -> None:
    import logging

    handlers = logging.getLogger("keyedbus").handlers
    assert [type(h) for h in handlers] == [logging.NullHandler]


@pytest.fixture
def without_nats(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import nats` and `import trio_asyncio` fail, as without the extra."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['nats'] = None\nsys.modules['trio_asyncio'] = None\n"
    )
    import os

    return {**os.environ, "PYTHONPATH": str(tmp_path)}


def test_a_nats_url_without_the_extra_raises_a_named_error(without_nats: dict[str, str]) -> None:
    code = """
import trio, keyedbus

async def main() -> None:
    try:
        async with keyedbus.open_bus("nats://127.0.0.1:1"):
            pass
    except keyedbus.MissingExtraError as exc:
        assert isinstance(exc, keyedbus.KeyedBusError) and isinstance(exc, ImportError)
        print(exc)

trio.run(main)
"""
    done = _python(code, env=without_nats)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "nats:// URLs need the nats extra (nats is not installed): pip install 'keyedbus[nats]'\n"
    )


def test_without_the_extra_the_memory_backend_still_works(without_nats: dict[str, str]) -> None:
    done = _python(RETRIED_ONCE, env=without_nats)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "done\n"


def test_the_cli_reports_the_missing_extra_in_one_line(without_nats: dict[str, str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "keyedbus", "check", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=without_nats,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == (
        "keyedbus: error: nats:// URLs need the nats extra (nats is not installed): "
        "pip install 'keyedbus[nats]'\n"
    )


def test_missing_extra_error_is_public() -> None:
    assert issubclass(keyedbus.MissingExtraError, keyedbus.KeyedBusError)
    assert "MissingExtraError" in keyedbus.__all__


def test_statistics_repr_shows_totals_and_the_busiest_shards_not_every_depth() -> None:
    depths = (0,) * 100 + (3,) + (0,) * 50 + (7, 1, 2, 5, 4) + (0,) * 100
    stats = keyedbus.BusStatistics(
        workers=len(depths),
        queued=22,
        in_flight=2,
        handled=10,
        retried=1,
        dead_lettered=0,
        dropped=0,
        parked_keys=1,
        connected=True,
        worker_queue_depths=depths,
        lag=4,
    )
    expected = (
        "BusStatistics(workers=256, queued=22, in_flight=2, handled=10, retried=1, dead_lettered=0, "
        "dropped=0, evicted=0, parked_keys=1, lag=4, connected=True, "
        "busiest_shards={#151: 7, #154: 5, #155: 4, #100: 3, #153: 2} (+1 more non-empty))"
    )
    assert repr(stats) == expected
    assert str(stats) == expected
    assert stats.worker_queue_depths == depths  # the tuple is still there, whole


async def test_a_fresh_bus_statistics_repr_is_one_short_line() -> None:
    async with keyedbus.open_bus() as bus:
        text = str(bus.statistics())
    assert text.endswith("connected=True, busiest_shards={})")
    assert len(text) < 250
