"""The command line, through its real entry points (subprocesses), against a nats-server the test starts."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import trio

import keyedbus
from keyedbus.testing import NatsServer


def _script() -> list[str]:
    found = shutil.which("keyedbus", path=sysconfig.get_path("scripts"))
    return [found] if found else [sys.executable, "-m", "keyedbus"]


async def cli(
    *args: str, url: str | None = None, stdin: bytes | None = None, entry: list[str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ}
    env.pop("KEYEDBUS_URL", None)
    if url is not None:
        env["KEYEDBUS_URL"] = url
    command = (entry or [sys.executable, "-m", "keyedbus"]) + list(args)
    return await trio.run_process(
        command, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
    )


def _one_line_error(done: subprocess.CompletedProcess[bytes]) -> str:
    lines = [line for line in done.stderr.decode().splitlines() if line.startswith("keyedbus: error:")]
    assert len(lines) == 1, done.stderr.decode()
    assert "Traceback" not in done.stderr.decode()
    return lines[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tail", "orders"], "memory:// lives inside one process"),
        (["publish", "orders", "x"], "pass --url nats://"),
        (["--url", "nats://127.0.0.1:1", "publish", "bad topic", "x"], "invalid topic"),
        (["--url", "nats://127.0.0.1:1", "publish", "orders", "x", "--header", "nope"], "NAME=VALUE"),
        (["--url", "nats://127.0.0.1:1", "publish", "orders", "{}", "--envelope"], "--event-type"),
        (["--url", "kafka://x", "check"], "unsupported bus URL scheme"),
    ],
)
async def test_user_mistakes_are_one_line_errors_with_status_2(args: list[str], says: str) -> None:
    done = await cli(*args)
    assert done.returncode == 2
    assert says in _one_line_error(done)


async def test_argparse_mistakes_also_exit_2() -> None:
    done = await cli("no-such-command")
    assert done.returncode == 2
    assert b"invalid choice" in done.stderr


async def test_an_unreachable_server_is_a_one_line_error_with_status_1() -> None:
    done = await cli("--connect-timeout", "0.5", "check", "nats://127.0.0.1:1")
    assert done.returncode == 1
    assert "could not connect" in _one_line_error(done) or "no NATS server" in _one_line_error(done)


async def test_check_on_memory_reports_a_round_trip() -> None:
    done = await cli("check", entry=_script())
    assert done.returncode == 0, done.stderr
    assert b"round trip" in done.stdout


@pytest.mark.nats
async def test_check_reports_jetstream(nats_server: NatsServer) -> None:
    done = await cli("check", nats_server.url)
    assert done.returncode == 0, done.stderr
    assert b"JetStream: available" in done.stdout


@pytest.mark.nats
async def test_publish_from_stdin_then_tail_as_a_group_sees_them_in_order(nats_server: NatsServer) -> None:
    with trio.fail_after(60):
        done = await cli("publish", "orders", "--key", "k1", url=nats_server.url, stdin=b"a\nb\nc\n")
        assert done.returncode == 0, done.stderr
        assert b"published 3 message(s)" in done.stderr
        tail = await cli("tail", "orders", "--group", "audit", "--json", "--count", "3", url=nats_server.url)
    assert tail.returncode == 0, tail.stderr
    seen = [json.loads(line) for line in tail.stdout.decode().splitlines()]
    assert [(m["key"], m["data"]) for m in seen] == [("k1", "a"), ("k1", "b"), ("k1", "c")]


@pytest.mark.nats
async def test_tail_without_a_group_watches_new_messages(nats_server: NatsServer) -> None:
    env = {**os.environ, "KEYEDBUS_URL": nats_server.url}
    command = [sys.executable, "-m", "keyedbus", "tail", "orders", "--count", "2"]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            tail = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                    check=False,
                )
            )
            # It says "tailing" on stderr once subscribed: publish only then.
            said = b""
            while b"tailing" not in said:
                said += await tail.stderr.receive_some()
            async with keyedbus.open_bus(nats_server.url) as bus:
                await bus.publish("orders", b"one", key="k")
                await bus.publish("orders", b"two", key="k")
            out = b""
            async for chunk in tail.stdout:
                out += chunk
    assert tail.returncode == 0
    assert out.decode().splitlines() == ["k\tone", "k\ttwo"]


@pytest.mark.nats
async def test_stats_shows_the_stream_and_its_consumers(nats_server: NatsServer) -> None:
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            for i in range(5):
                await bus.publish("orders", str(i).encode(), key="k")
        done = await cli("stats", "orders", "--json", url=nats_server.url)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert (state["topic"], state["messages"]) == ("orders", 5)


@pytest.mark.nats
async def test_dead_letters_are_listed_then_replayed_in_key_order(nats_server: NatsServer) -> None:
    once = keyedbus.RetryPolicy(max_attempts=1)
    got: list[bytes] = []

    async def failing(msg: keyedbus.Message) -> None:
        raise RuntimeError(f"cannot handle {msg.data!r} yet")

    async def working(msg: keyedbus.Message) -> None:
        got.append(msg.data)

    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, retry=once) as bus:
            await bus.subscribe("orders", failing)
            for i in range(3):
                await bus.publish("orders", f"m{i}".encode(), key="k")
        listed = await cli("dead-letters", "orders", "--json", url=nats_server.url)
        assert listed.returncode == 0, listed.stderr
        letters = [json.loads(line) for line in listed.stdout.decode().splitlines()]
        assert [(m["key"], m["data"]) for m in letters] == [("k", "m0"), ("k", "m1"), ("k", "m2")]
        assert all("RuntimeError: cannot handle" in m["headers"]["Keyedbus-Error"] for m in letters)
        replay = await cli("dead-letters", "orders", "--replay", url=nats_server.url)
        assert replay.returncode == 0, replay.stderr
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.subscribe("orders", working, group="after-replay")
        after = await cli("dead-letters", "orders", url=nats_server.url)
    # The new group reads the whole stream: the three originals, then the replayed three, in key order.
    assert got == [b"m0", b"m1", b"m2", b"m0", b"m1", b"m2"]
    assert b"0 dead letter(s)" in after.stderr
