"""The command line: `keyedbus COMMAND ...` or `python -m keyedbus COMMAND ...`.

Commands: publish, tail, stats, dead-letters, check; `keyedbus COMMAND --help` for each. The bus URL comes
from --url or the KEYEDBUS_URL environment variable. A user mistake prints one line and exits with status 2;
a failure to connect or publish prints one line and exits with status 1. argparse (the standard library) is
enough for five subcommands and keeps the package free of extra dependencies.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

import trio

from ._bus import Bus, open_bus
from ._config import TopicConfig
from ._errors import ArgumentTypeError, KeyedBusError
from ._messages import (
    ATTEMPTS_HEADER,
    ERROR_HEADER,
    ORIGINAL_TOPIC_HEADER,
    Envelope,
    Message,
    check_headers,
    check_key,
    check_topic,
    replay_headers,
)

__all__ = ["main"]

_ACROSS_PROCESSES = (
    "memory:// lives inside one process, so '{command}' cannot see another program's messages there: "
    "pass --url nats://HOST:PORT (or set KEYEDBUS_URL)"
)


class _UsageError(Exception):
    """A mistake in the command line: one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyedbus", description="Publish, tail and inspect a keyedbus event bus (memory:// or NATS)."
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("KEYEDBUS_URL", "memory://"),
        help="bus URL, e.g. nats://127.0.0.1:4222 (default: $KEYEDBUS_URL, else memory://)",
    )
    parser.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    publish = commands.add_parser("publish", help="publish messages: DATA, --file, or one per line on stdin")
    publish.add_argument("topic")
    publish.add_argument("data", nargs="?", help="the message (omit to read --file or stdin, one per line)")
    publish.add_argument("--file", type=argparse.FileType("r"), help="read messages from FILE, one per line")
    publish.add_argument("--key", help="the aggregate id: messages with one key are handled in order")
    publish.add_argument("--header", action="append", default=[], metavar="NAME=VALUE")
    publish.add_argument("--envelope", action="store_true", help="wrap each line (JSON) in an Envelope")
    publish.add_argument("--event-type", help="the envelope's event_type (with --envelope)")
    publish.add_argument("--event-version", type=int, default=1)
    publish.add_argument("--ephemeral", action="store_true", help="core NATS (at-most-once) topic")

    tail = commands.add_parser("tail", help="print messages of a topic as they arrive")
    tail.add_argument("topic")
    tail.add_argument("--group", help="consume as this group (acks!); default: watch without consuming")
    tail.add_argument("--json", action="store_true", help="one JSON object per message")
    tail.add_argument("--envelope", action="store_true", help="decode each message as an Envelope")
    tail.add_argument("--count", type=int, help="stop after COUNT messages")
    tail.add_argument("--timeout", type=float, help="stop after SECONDS")

    stats = commands.add_parser("stats", help="a persistent topic's stream and consumers: lag, unacked")
    stats.add_argument("topic")
    stats.add_argument("--json", action="store_true")

    dead = commands.add_parser("dead-letters", help="list a topic's dead letters, or --replay them")
    dead.add_argument("topic", help="the original topic (its dead letters are on TOPIC.dead-letter)")
    dead.add_argument("--dead-letter-topic", help="where they are, if not TOPIC.dead-letter")
    dead.add_argument("--replay", action="store_true", help="publish them back, oldest first, then remove")
    dead.add_argument("--json", action="store_true")

    check = commands.add_parser("check", help="connect, send one message round trip, report JetStream")
    check.add_argument("check_url", nargs="?", metavar="URL", help="default: --url")
    return parser


def _fail(message: str) -> NoReturn:
    raise _UsageError(message)


def _needs_nats(url: str, command: str) -> None:
    if url.startswith("memory"):
        _fail(_ACROSS_PROCESSES.format(command=command))


def _lines(args: argparse.Namespace) -> Iterator[str]:
    if args.data is not None:
        if args.file is not None:
            _fail("give DATA or --file, not both")
        yield args.data
        return
    source: TextIO = args.file if args.file is not None else sys.stdin
    if source is sys.stdin and sys.stdin.isatty():
        _fail("no DATA given: pass DATA, --file FILE, or pipe messages in, one per line")
    for line in source:
        line = line.rstrip("\n")
        if line:
            yield line


def _headers(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            _fail(f"--header takes NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


async def _publish(bus: Bus, args: argparse.Namespace) -> int:
    if args.ephemeral:
        await bus.configure_topic(args.topic, TopicConfig(persistence="ephemeral"))
    headers = _headers(args.header)
    count = 0
    last = time.monotonic()
    for line in _lines(args):
        if args.envelope:
            try:
                payload = json.loads(line)
            except json.JSONDecodeError as exc:
                _fail(f"line {count + 1} is not JSON ({exc}); --envelope takes one JSON payload per line")
            envelope = Envelope(
                aggregate_id=args.key,
                event_type=args.event_type,
                event_version=args.event_version,
                payload=payload,
            )
            await bus.publish_envelope(args.topic, envelope, headers=headers)
        else:
            await bus.publish(args.topic, line.encode(), key=args.key, headers=headers)
        count += 1
        if time.monotonic() - last >= 2:
            last = time.monotonic()
            print(f"published {count} message(s)...", file=sys.stderr, flush=True)
    print(f"published {count} message(s) to {args.topic}", file=sys.stderr)
    return 0


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(data).decode()


def _message_json(msg: Message) -> dict[str, Any]:
    return {
        "topic": msg.topic,
        "key": msg.key,
        "attempt": msg.attempt,
        "message_id": msg.message_id,
        "headers": dict(msg.headers),
        "data": _text(msg.data),
    }


async def _tail(bus: Bus, args: argparse.Namespace) -> int:
    if args.count is not None and args.count < 1:
        _fail("--count must be at least 1")
    if args.group is None:
        # Watch without consuming: a core-NATS subscription sees persistent topics' messages too.
        await bus.configure_topic(args.topic, TopicConfig(persistence="ephemeral"))
    seen = 0
    done = trio.Event()

    def emit(text: str) -> None:
        nonlocal seen
        print(text, flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            done.set()

    async def on_message(msg: Message) -> None:
        emit(json.dumps(_message_json(msg)) if args.json else f"{msg.key or '-'}\t{_text(msg.data)}")

    async def on_envelope(env: Envelope) -> None:
        emit(env.encode().decode() if args.json else f"{env.aggregate_id}\t{env.event_type}\t{env.payload}")

    if args.envelope:
        await bus.subscribe_envelope(args.topic, on_envelope, group=args.group)
    else:
        await bus.subscribe(args.topic, on_message, group=args.group)
    print(f"tailing {args.topic} on {bus._url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    with trio.move_on_after(args.timeout if args.timeout is not None else math.inf):
        await done.wait()
    return 0


async def _stats(bus: Bus, args: argparse.Namespace) -> int:
    backend: Any = bus._backend
    state = await backend.topic_state(args.topic)
    if args.json:
        print(json.dumps(state))
        return 0
    print(
        f"{state['topic']}: stream {state['stream']}, {state['messages']} message(s), "
        f"{state['bytes']} bytes, sequences {state['first_seq']}..{state['last_seq']}"
    )
    if not state["consumers"]:
        print("  no consumers")
    for c in state["consumers"]:
        print(
            f"  consumer {c['consumer']}: lag {c['lag']}, unacked {c['unacked']}, "
            f"redelivered {c['redelivered']}, ack floor {c['ack_floor']}"
        )
    return 0


async def _dead_letters(bus: Bus, args: argparse.Namespace) -> int:
    source = args.dead_letter_topic or f"{args.topic}.dead-letter"
    backend: Any = bus._backend
    try:
        letters = await backend.stored(source)
    except KeyedBusError:
        print(f"no dead letters for {args.topic} (nothing stored on {source})", file=sys.stderr)
        return 0
    if not args.replay:
        for seq, msg in letters:
            if args.json:
                print(json.dumps({"seq": seq, **_message_json(msg)}))
            else:
                print(
                    f"#{seq}\tkey {msg.key or '-'}\tattempts {msg.headers.get(ATTEMPTS_HEADER, '?')}\t"
                    f"{msg.headers.get(ERROR_HEADER, '')}\t{_text(msg.data)[:80]}"
                )
        print(f"{len(letters)} dead letter(s) on {source}", file=sys.stderr)
        return 0
    replayed = 0
    for seq, msg in letters:  # oldest first: a key's dead letters go back in their order
        target = msg.headers.get(ORIGINAL_TOPIC_HEADER, args.topic)
        headers = replay_headers(msg.headers)  # the server's headers stay under Keyedbus-Original-*
        # The same id if this replay is run again after a failure: stored once (deduplicated).
        await bus.publish(
            target, msg.data, key=msg.key, headers=headers, message_id=f"{msg.message_id or seq}.replay"
        )
        await backend.delete_stored(source, seq)
        replayed += 1
        print(f"replayed #{seq} (key {msg.key or '-'}) to {target}", file=sys.stderr, flush=True)
    print(f"replayed {replayed} dead letter(s) from {source}", file=sys.stderr)
    return 0


async def _check(args: argparse.Namespace) -> int:
    url = args.check_url or args.url
    topic = f"keyedbus.check.{os.getpid()}"
    got = trio.Event()

    async def handler(_: Message) -> None:
        got.set()

    start = time.perf_counter()
    async with open_bus(url, connect_timeout=args.connect_timeout, drain_timeout=5) as bus:
        connected = time.perf_counter() - start
        await bus.configure_topic(topic, TopicConfig(persistence="ephemeral"))
        await bus.subscribe(topic, handler)
        sent = time.perf_counter()
        await bus.publish(topic, b"ping")
        with trio.move_on_after(10):
            await got.wait()
        if not got.is_set():
            print(f"keyedbus: error: connected to {bus._url} but the test message did not come back in 10 s")
            return 1
        round_trip = time.perf_counter() - sent
        backend: Any = bus._backend
        jetstream = "built in (memory://)" if url.startswith("memory") else await backend.jetstream_info()
        print(f"connected to {bus._url} in {connected * 1000:.1f} ms")
        print(f"round trip (publish -> handler): {round_trip * 1000:.2f} ms")
        print(f"JetStream: {jetstream}")
    return 0


def _validate(args: argparse.Namespace) -> None:
    """Refuse bad arguments before connecting: a typo should not wait for connect_timeout."""
    check_topic(args.topic)
    if getattr(args, "key", None) is not None:
        check_key(args.key)
    if getattr(args, "group", None) is not None:
        check_topic(args.group, what="group")
    if getattr(args, "dead_letter_topic", None) is not None:
        check_topic(args.dead_letter_topic, what="dead-letter topic")
    if args.command == "publish":
        check_headers(_headers(args.header))
        if args.envelope and not (args.key and args.event_type):
            _fail("--envelope needs --key (the aggregate_id) and --event-type")


async def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        return await _check(args)
    _needs_nats(args.url, args.command)
    _validate(args)
    async with open_bus(args.url, connect_timeout=args.connect_timeout) as bus:
        if args.command == "publish":
            return await _publish(bus, args)
        if args.command == "tail":
            return await _tail(bus, args)
        if args.command == "stats":
            return await _stats(bus, args)
        return await _dead_letters(bus, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return trio.run(_run, args)
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"keyedbus: error: {exc}", file=sys.stderr)
        return 2
    except (ArgumentTypeError, ValueError) as exc:  # bad topic, key, header, URL...: the user's to fix
        print(f"keyedbus: error: {exc}", file=sys.stderr)
        return 2
    except KeyedBusError as exc:
        print(f"keyedbus: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
