"""The command line, through its real entry points (subprocesses), against a nats-server the test starts."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import termios
from pathlib import Path

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
        (["--url", "nats://127.0.0.1:1", "publish", "orders", "x", "--event-type", "T"], "add --envelope"),
        (["--url", "nats://127.0.0.1:1", "publish", "orders", "x", "--event-version", "2"], "add --envelope"),
        (["--url", "nats://127.0.0.1:1", "tail", "orders", "--timeout", "-1"], "--timeout must be a number"),
        (["--url", "nats://127.0.0.1:1", "tail", "orders", "--timeout", "0"], "--timeout must be a number"),
        (["--url", "nats://127.0.0.1:1", "tail", "orders", "--count", "0"], "--count must be at least 1"),
        (["--url", "nats://127.0.0.1:1", "groups", "orders", "--delete", "a.b"], "invalid group"),
    ],
)
async def test_user_mistakes_are_one_line_errors_with_status_2(args: list[str], says: str) -> None:
    done = await cli(*args)
    assert done.returncode == 2
    assert says in _one_line_error(done)


async def test_tail_timeout_is_refused_in_our_words_before_connecting() -> None:
    # A connect attempt would take up to --connect-timeout and exit 1; the refusal is immediate, status 2.
    with trio.fail_after(30):
        done = await cli(
            "--connect-timeout", "60", "tail", "orders", "--timeout", "-1", url="nats://127.0.0.1:1"
        )
    assert done.returncode == 2
    assert _one_line_error(done) == "keyedbus: error: --timeout must be a number of seconds > 0, got -1"


async def test_version() -> None:
    done = await cli("--version", entry=_script())
    assert done.returncode == 0
    assert done.stdout.decode() == f"keyedbus {keyedbus.__version__}\n"


@pytest.mark.parametrize("command", ["publish", "tail", "stats", "groups", "dead-letters", "check"])
async def test_every_argument_has_help_text(command: str) -> None:
    done = await cli(command, "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    sections = [i for i, line in enumerate(lines) if line in ("positional arguments:", "options:")]
    assert sections, lines
    described = 0
    for i in range(sections[0], len(lines)):
        line = lines[i]
        if not line.startswith("  ") or line.startswith("   "):
            continue  # a heading, or the continuation of a description
        # "  --name VALUE   text", or "  --long-name VALUE" with the text on the next, indented line.
        following = lines[i + 1] if i + 1 < len(lines) else ""
        has_text = "  " in line.strip() or (following.startswith(" " * 8) and following.strip() != "")
        assert has_text, f"{command}: no help for {line.strip()!r}"
        described += 1
    assert described >= 6  # -h, --url, --connect-timeout, -v, -q and the command's own


async def test_url_and_env_are_taken_before_or_after_the_command() -> None:
    before = await cli("--url", "nats://127.0.0.1:1", "--connect-timeout", "0.2", "publish", "orders", "x")
    after = await cli("publish", "orders", "x", "--url", "nats://127.0.0.1:1", "--connect-timeout", "0.2")
    for done in (before, after):
        assert done.returncode == 1
        assert "127.0.0.1:1" in _one_line_error(done)
    # An option after the command overrides KEYEDBUS_URL (here back to memory://, refused by publish).
    overridden = await cli("publish", "orders", "x", "--url", "memory://", url="nats://127.0.0.1:1")
    assert overridden.returncode == 2
    assert "memory:// lives inside one process" in _one_line_error(overridden)


async def test_quiet_shows_only_the_error() -> None:
    done = await cli("-q", "--connect-timeout", "0.5", "check", "nats://127.0.0.1:1")
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [_one_line_error(done)]


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
        replay = await cli("dead-letters", "orders", "--replay", "-v", url=nats_server.url)
        assert replay.returncode == 0, replay.stderr
        # Piped: no progress bar; -v logs each replayed message.
        replayed = [line for line in replay.stderr.decode().splitlines() if line.startswith("keyedbus.cli:")]
        assert [line.split(" (key")[0] for line in replayed] == [
            f"keyedbus.cli: INFO: replayed #{seq}" for seq in (1, 2, 3)
        ]
        assert replay.stderr.decode().splitlines()[-1] == "replayed 3 dead letter(s) from orders.dead-letter"
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.subscribe("orders", working, group="after-replay")
        after = await cli("dead-letters", "orders", url=nats_server.url)
    # The new group reads the whole stream: the three originals, then the replayed three, in key order.
    assert got == [b"m0", b"m1", b"m2", b"m0", b"m1", b"m2"]
    assert b"0 dead letter(s)" in after.stderr


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "KEYEDBUS_URL": url}


async def _on_terminal(*args: str, url: str) -> tuple[int, bytes]:
    """Run the CLI with stderr on a pseudo-terminal (as in an interactive shell); return what it showed."""
    master, slave = os.openpty()
    # A fresh pty is 0x0; a terminal window has a size (tqdm draws nothing on a screen with no rows).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    shown = b""

    def read_all() -> None:
        nonlocal shown
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child exited and everything it wrote has been read
                return
            if not chunk:
                return
            shown += chunk

    command = [sys.executable, "-m", "keyedbus", *args]
    try:
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=slave,
                    env=_env(url),
                    check=False,
                )
            )
            os.close(slave)
            slave = -1
            await trio.to_thread.run_sync(read_all)
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
    return process.returncode, shown


@pytest.mark.nats
async def test_publish_file_shows_progress_on_a_terminal_and_nothing_when_piped(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    messages = tmp_path / "messages.txt"
    messages.write_text("".join(f"m{i}\n" for i in range(300)))
    with trio.fail_after(60):
        status, shown = await _on_terminal("publish", "orders", "--file", str(messages), url=nats_server.url)
        assert status == 0, shown
        # tqdm's line: the description, count of total, rate (and ETA once there is a rate).
        assert b"publishing to orders" in shown
        assert b"/300" in shown
        assert b"msg/s" in shown
        piped = await cli("publish", "orders", "--file", str(messages), url=nats_server.url)
    assert piped.returncode == 0
    assert piped.stderr == b"published 300 message(s) to orders\n"


async def _start_tail(nursery: trio.Nursery, url: str, *args: str) -> trio.Process:
    command = [sys.executable, "-m", "keyedbus", "tail", *args]
    process: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(url),
            check=False,
        )
    )
    return process


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    said = b""
    while marker not in said:
        chunk = await stream.receive_some()
        assert chunk, f"ended before {marker!r}: {said!r}"
        said += chunk
    return said


@pytest.mark.nats
async def test_tail_envelope_without_a_group_prints_bad_messages_and_changes_nothing(
    nats_server: NatsServer,
) -> None:
    good = keyedbus.Envelope(aggregate_id="order-1", event_type="OrderPlaced", event_version=1, payload={})
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.publish("orders", b"before", key="k")  # the stream exists, with no consumer
        async with trio.open_nursery() as nursery:
            tail = await _start_tail(nursery, nats_server.url, "orders", "--envelope", "--count", "2")
            assert tail.stderr is not None
            assert tail.stdout is not None
            said = await _read_until(tail.stderr, b"tailing")
            async with keyedbus.open_bus(nats_server.url) as bus:
                await bus.publish("orders", b"not json", key="k")
                await bus.publish_envelope("orders", good)
            out = b""
            async for chunk in tail.stdout:
                out += chunk
            async for chunk in tail.stderr:
                said += chunk
        assert tail.returncode == 0, said
        state = await cli("stats", "orders", "--json", url=nats_server.url)
        dead = await cli("stats", "orders.dead-letter", url=nats_server.url)
    assert out.decode().splitlines() == ["order-1\tOrderPlaced\t{}"]
    assert b"keyedbus: not an envelope (key k, message id " in said
    # Watching created no consumer on the topic and dead-lettered nothing.
    assert json.loads(state.stdout)["consumers"] == []
    assert json.loads(state.stdout)["messages"] == 3
    assert dead.returncode == 1
    assert "has no JetStream stream" in _one_line_error(dead)


@pytest.mark.nats
async def test_tail_as_a_group_says_it_consumes_then_groups_lists_and_deletes_it(
    nats_server: NatsServer,
) -> None:
    good = keyedbus.Envelope(aggregate_id="order-1", event_type="OrderPlaced", event_version=1, payload={})
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            # One key for all three: which --count messages are consumed must not depend on how the
            # pool schedules different keys (those run concurrently, in no set order).
            await bus.publish("orders", b"not json", key="order-1")
            await bus.publish_envelope("orders", good)
            await bus.publish("orders", b"left for later", key="order-1")
        tail = await cli(
            "-q", "tail", "orders", "--envelope", "--group", "audit", "--count", "2", url=nats_server.url
        )
        listed = await cli("groups", "orders", url=nats_server.url)
        stats = await cli("stats", "orders", url=nats_server.url)
        dead = await cli("stats", "orders.dead-letter", url=nats_server.url)
        deleted = await cli("groups", "orders", "--delete", "audit", url=nats_server.url)
        again = await cli("groups", "orders", "--delete", "audit", url=nats_server.url)
        after = await cli("groups", "orders", url=nats_server.url)
    assert tail.returncode == 0, tail.stderr
    assert b"as group audit: consuming, each message is acked" in tail.stderr
    # Exactly --count messages consumed: the third, fetched with them, is handed back to the group.
    assert tail.stderr.count(b"keyedbus: not an envelope (key order-1") == 1, tail.stderr.decode()
    assert tail.stdout.decode().splitlines() == ["order-1\tOrderPlaced\t{}"]
    assert dead.returncode == 1  # the bad message was printed, not dead-lettered
    assert listed.returncode == 0, listed.stderr
    group, consumer, _ = listed.stdout.decode().strip().split("\t")
    assert group == "audit"
    assert consumer.startswith("KBC_orders_audit_")
    summary, line = stats.stdout.decode().splitlines()
    assert "; 1 group(s), lag 0, unacked " in summary
    # Exactly --count messages were acked: the group's ack floor is the second message.
    assert line.startswith("  audit: lag 0, unacked ")
    assert line.endswith("ack floor 2")
    assert deleted.returncode == 0, deleted.stderr
    assert again.returncode == 1
    assert _one_line_error(again) == "keyedbus: error: topic orders has no group audit"
    assert after.stdout == b""
    assert after.stderr == b"0 group(s) on orders\n"


@pytest.mark.nats
async def test_tail_without_a_group_sees_every_partition_and_no_other_topic(nats_server: NatsServer) -> None:
    keys = [f"order-{n}" for n in range(6)]
    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url) as bus:
            await bus.configure_topic("orders", keyedbus.TopicConfig(partitions=3))
            await bus.publish("orders", b"before", key="order-0")  # the stream exists before tail starts
        async with trio.open_nursery() as nursery:
            tail = await _start_tail(nursery, nats_server.url, "orders", "--count", str(len(keys)))
            assert tail.stderr is not None
            assert tail.stdout is not None
            said = await _read_until(tail.stderr, b"tailing")
            async with keyedbus.open_bus(nats_server.url) as bus:
                await bus.publish("orders.other", b"not this topic", key="x")  # one token below: filtered
                for key in keys:
                    await bus.publish("orders", key.encode(), key=key)
            out = b""
            async for chunk in tail.stdout:
                out += chunk
        state = await cli("stats", "orders", "--json", url=nats_server.url)
    assert tail.returncode == 0, said
    assert sorted(out.decode().splitlines()) == sorted(f"{key}\t{key}" for key in keys)
    assert json.loads(state.stdout)["consumers"] == []  # watching created nothing


@pytest.mark.nats
async def test_dead_letter_replay_shows_progress_on_a_terminal(nats_server: NatsServer) -> None:
    async def failing(msg: keyedbus.Message) -> None:
        raise RuntimeError("not yet")

    with trio.fail_after(60):
        async with keyedbus.open_bus(nats_server.url, retry=keyedbus.RetryPolicy(max_attempts=1)) as bus:
            await bus.subscribe("orders", failing)
            for i in range(3):
                await bus.publish("orders", f"m{i}".encode(), key="k")
        status, shown = await _on_terminal("dead-letters", "orders", "--replay", url=nats_server.url)
    assert status == 0, shown
    assert b"replaying orders.dead-letter" in shown
    assert b"/3" in shown
    assert b"msg/s" in shown
    assert b"replayed 3 dead letter(s) from orders.dead-letter" in shown
