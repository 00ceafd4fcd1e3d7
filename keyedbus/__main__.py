"""The command line: `keyedbus COMMAND ...` or `python -m keyedbus ...`.

Commands: publish, tail, stats, groups, dead-letters, check; `keyedbus COMMAND --help` for each. The bus URL
comes from --url (before or after the command) or the KEYEDBUS_URL environment variable. A user mistake
prints one line and exits with status 2; a failure to connect or publish prints one line and exits with
status 1. argparse (the standard library) is enough for six subcommands; progress bars come from tqdm.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TextIO

import trio
from tqdm import tqdm

from . import __version__
from ._bus import Bus, open_bus
from ._config import TopicConfig
from ._errors import ArgumentTypeError, InvalidEnvelopeError, KeyedBusError
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

log = logging.getLogger("keyedbus.cli")

_ACROSS_PROCESSES = (
    "memory:// lives inside one process, so '{command}' cannot see another program's messages there: "
    "pass --url nats://HOST:PORT (or set KEYEDBUS_URL)"
)


class _UsageError(Exception):
    """A mistake in the command line: one line, exit status 2."""


class _PastCount(Exception):
    """Raised by tail's handler for a message past --count, once unsubscribed: it goes back unacked."""


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the command: the top level holds the defaults, a command's own
    copies default to "not given" (SUPPRESS) so they override only when used there."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--url",
        default=default(os.environ.get("KEYEDBUS_URL", "memory://")),
        help="bus URL, e.g. nats://127.0.0.1:4222 (default: $KEYEDBUS_URL, else memory://)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=default(10.0),
        metavar="SECONDS",
        help="give up connecting after SECONDS (default: 10)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log more: -v for INFO (connections, each replayed message), -vv for DEBUG",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default(False),
        help="log only errors (no retries, reconnections or warnings)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyedbus", description="Publish, tail and inspect a keyedbus event bus (memory:// or NATS)."
    )
    parser.add_argument("--version", action="version", version=f"keyedbus {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _connection_options(sub, top=False)
        return sub

    publish = command("publish", "publish messages: DATA, --file, or one per line on stdin")
    publish.add_argument("topic", help="the topic to publish to")
    publish.add_argument("data", nargs="?", help="the message (omit to read --file or stdin, one per line)")
    publish.add_argument("--file", type=argparse.FileType("r"), help="read messages from FILE, one per line")
    publish.add_argument("--key", help="the aggregate id: messages with one key are handled in order")
    publish.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="add a header (repeatable)"
    )
    publish.add_argument("--envelope", action="store_true", help="wrap each line (JSON) in an Envelope")
    publish.add_argument("--event-type", help="the envelope's event_type (needs --envelope)")
    publish.add_argument(
        "--event-version",
        type=int,
        metavar="N",
        help="the envelope's event_version (needs --envelope; default 1)",
    )
    publish.add_argument("--ephemeral", action="store_true", help="publish with core NATS (at-most-once)")

    tail = command("tail", "print messages of a topic as they arrive, without changing the topic")
    tail.add_argument("topic", help="the topic to watch")
    tail.add_argument(
        "--group",
        help="consume as this group: acks each message, so the group will not get it again "
        "(default: only watch, nothing acked or created on the server)",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per message")
    tail.add_argument(
        "--envelope", action="store_true", help="decode each message as an Envelope (failures are printed)"
    )
    tail.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    tail.add_argument("--timeout", type=float, metavar="SECONDS", help="stop after SECONDS (> 0)")

    stats = command("stats", "a persistent topic's stream and its groups: lag, unacked, busiest first")
    stats.add_argument("topic", help="the persistent topic to inspect")
    stats.add_argument("--json", action="store_true", help="one JSON object, for a machine")

    groups = command("groups", "list a persistent topic's groups (durable consumers), or --delete one")
    groups.add_argument("topic", help="the persistent topic")
    groups.add_argument("--delete", metavar="GROUP", help="remove GROUP's consumer and its position")
    groups.add_argument("--json", action="store_true", help="one JSON object per group")

    dead = command("dead-letters", "list a topic's dead letters, or --replay them")
    dead.add_argument("topic", help="the original topic (its dead letters are on TOPIC.dead-letter)")
    dead.add_argument("--dead-letter-topic", help="where they are, if not TOPIC.dead-letter")
    dead.add_argument("--replay", action="store_true", help="publish them back, oldest first, then remove")
    dead.add_argument("--json", action="store_true", help="one JSON object per dead letter")

    check = command("check", "connect, send one message round trip, report JetStream")
    check.add_argument("check_url", nargs="?", metavar="URL", help="the bus to check (default: --url)")
    return parser


def _progress(total: int | None, what: str) -> Any:
    """A progress bar on stderr (count, rate, ETA when the total is known), silent unless on a terminal."""
    return tqdm(total=total, desc=what, unit="msg", file=sys.stderr, disable=None, leave=False)


def _configure_logging(args: argparse.Namespace) -> None:
    """The command line is an application: it shows keyedbus's log records (the library alone prints none)."""
    level = (
        logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    )
    logging.basicConfig(level=level, format="%(name)s: %(levelname)s: %(message)s", stream=sys.stderr)


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


def _total(args: argparse.Namespace) -> int | None:
    """How many messages a --file holds (for the ETA), when it can be read twice; else None."""
    if args.data is not None:
        return 1
    if args.file is None or not args.file.seekable():
        return None
    total = sum(1 for line in args.file if line.rstrip("\n"))
    args.file.seek(0)
    return total


async def _publish(bus: Bus, args: argparse.Namespace) -> int:
    if args.ephemeral:
        await bus.configure_topic(args.topic, TopicConfig(persistence="ephemeral"))
    headers = _headers(args.header)
    count = 0
    with _progress(_total(args), f"publishing to {args.topic}") as progress:
        for line in _lines(args):
            await _publish_line(bus, args, line, count + 1, headers)
            count += 1
            progress.update()
    print(f"published {count} message(s) to {args.topic}", file=sys.stderr)
    return 0


async def _publish_line(
    bus: Bus, args: argparse.Namespace, line: str, number: int, headers: dict[str, str]
) -> None:
    if args.envelope:
        try:
            payload = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(f"line {number} is not JSON ({exc}); --envelope takes one JSON payload per line")
        envelope = Envelope(
            aggregate_id=args.key,
            event_type=args.event_type,
            event_version=args.event_version or 1,
            payload=payload,
        )
        await bus.publish_envelope(args.topic, envelope, headers=headers)
    else:
        await bus.publish(args.topic, line.encode(), key=args.key, headers=headers)


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
    seen = 0
    done = trio.Event()
    handing_back = trio.Event()

    def emit(text: str, *, to: TextIO = sys.stdout) -> None:
        nonlocal seen
        print(text, file=to, flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            done.set()

    def show(msg: Message) -> None:
        if not args.envelope:
            emit(json.dumps(_message_json(msg)) if args.json else f"{msg.key or '-'}\t{_text(msg.data)}")
            return
        # Decoded here, not by subscribe_envelope: a message that is not an envelope is printed, never
        # dead-lettered (tail must not change the topic).
        try:
            env = Envelope.decode(msg.data)
        except InvalidEnvelopeError as exc:
            emit(
                f"keyedbus: not an envelope (key {msg.key or '-'}, message id {msg.message_id or '-'}): "
                f"{exc.reason}",
                to=sys.stderr,
            )
            return
        emit(env.encode().decode() if args.json else f"{env.aggregate_id}\t{env.event_type}\t{env.payload}")

    deadline = trio.current_time() + (args.timeout if args.timeout is not None else math.inf)
    if args.group is None:
        # Watch without consuming: a plain subscription to the topic's subjects (partitions included)
        # sees what is published, persistent or not; it creates nothing on the server and acks nothing.
        async with bus.admin.watch(args.topic) as messages:
            print(f"tailing {args.topic} on {bus.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            with trio.move_on_at(deadline):
                async for msg in messages:
                    show(msg)
                    if done.is_set():
                        break
        return 0

    async def on_message(msg: Message) -> None:
        if done.is_set():
            # Past --count: do not ack it. A handler that fails once its subscription is unsubscribed
            # hands its message back to the group.
            await handing_back.wait()
            raise _PastCount
        show(msg)

    subscription = await bus.subscribe(args.topic, on_message, group=args.group)
    print(
        f"tailing {args.topic} on {bus.url} as group {args.group}: consuming, each message is acked and "
        f"group {args.group} will not get it again (Ctrl-C to stop)",
        file=sys.stderr,
        flush=True,
    )
    with trio.move_on_at(deadline):
        await done.wait()
    # No checkpoint between these two lines: unsubscribe() marks the subscription stopped before the woken
    # handlers run, so their failure hands the messages back instead of retrying them.
    handing_back.set()
    await subscription.unsubscribe()
    return 0


#: Groups named one per line by `stats`, busiest first; the rest are summed up in one line.
_SHOWN_GROUPS = 10


async def _stats(bus: Bus, args: argparse.Namespace) -> int:
    backend = bus.admin
    state = await backend.topic_state(args.topic)
    if args.json:
        print(json.dumps(state))
        return 0
    consumers = state["consumers"]
    print(
        f"{state['topic']}: {state['messages']} message(s), {state['bytes']} bytes, sequences "
        f"{state['first_seq']}..{state['last_seq']} (stream {state['stream']}); {len(consumers)} group(s), "
        f"lag {sum(c['lag'] for c in consumers)}, unacked {sum(c['unacked'] for c in consumers)}"
    )
    # Busiest first, as BusStatistics shows its shards: a topic with many groups stays readable.
    busiest = sorted(consumers, key=lambda c: (-(c["lag"] + c["unacked"]), c["consumer"]))
    for c in busiest[:_SHOWN_GROUPS]:
        name = c["group"] if c["group"] is not None else f"(consumer {c['consumer']})"
        if c.get("partition") is not None:
            name += f" partition {c['partition']}"
        print(
            f"  {name}: lag {c['lag']}, unacked {c['unacked']}, redelivered {c['redelivered']}, "
            f"ack floor {c['ack_floor']}"
        )
    rest = busiest[_SHOWN_GROUPS:]
    if rest:
        print(f"  ... and {len(rest)} more group(s): lag {sum(c['lag'] for c in rest)} (--json lists all)")
    partitions = state.get("partitions", 1)
    for g in state.get("groups", ()):
        if not g["members"]:
            continue  # no process reads the group now
        print(f"  group {g['group'] or 'default'}: {len(g['members'])} member(s), {partitions} partition(s)")
        for m in g["members"]:
            reads = ", ".join(map(str, m["partitions"])) or "none (standing by)"
            print(f"    member {m['member']} (host {m['host']}, pid {m['pid']}) reads {reads}")
    return 0


async def _groups(bus: Bus, args: argparse.Namespace) -> int:
    backend = bus.admin
    if args.delete is not None:
        if not await backend.delete_group(args.topic, args.delete):
            print(f"keyedbus: error: topic {args.topic} has no group {args.delete}", file=sys.stderr)
            return 1
        print(f"deleted group {args.delete} of {args.topic}", file=sys.stderr)
        return 0
    state = await backend.topic_state(args.topic)
    for c in state["consumers"]:
        if args.json:
            print(json.dumps(c))
        else:
            print(f"{c['group'] if c['group'] is not None else '?'}\t{c['consumer']}\tlag {c['lag']}")
    print(f"{len(state['consumers'])} group(s) on {args.topic}", file=sys.stderr)
    return 0


async def _dead_letters(bus: Bus, args: argparse.Namespace) -> int:
    source = args.dead_letter_topic or f"{args.topic}.dead-letter"
    backend = bus.admin
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
    with _progress(len(letters), f"replaying {source}") as progress:
        for seq, msg in letters:  # oldest first: a key's dead letters go back in their order
            target = msg.headers.get(ORIGINAL_TOPIC_HEADER, args.topic)
            headers = replay_headers(msg.headers)  # the server's headers stay under Keyedbus-Original-*
            # The same id if this replay is run again after a failure: stored once (deduplicated).
            await bus.publish(
                target, msg.data, key=msg.key, headers=headers, message_id=f"{msg.message_id or seq}.replay"
            )
            await backend.delete_stored(source, seq)
            replayed += 1
            progress.update()
            log.info("replayed #%d (key %s) to %s", seq, msg.key or "-", target)
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
            print(f"keyedbus: error: connected to {bus.url} but the test message did not come back in 10 s")
            return 1
        round_trip = time.perf_counter() - sent
        backend = bus.admin
        jetstream = await backend.jetstream_info()
        print(f"connected to {bus.url} in {connected * 1000:.1f} ms")
        print(f"round trip (publish -> handler): {round_trip * 1000:.2f} ms")
        print(f"JetStream: {jetstream}")
    return 0


def _validate(args: argparse.Namespace) -> None:
    """Refuse bad arguments before connecting: a typo should not wait for connect_timeout."""
    if args.connect_timeout < 0:
        _fail(f"--connect-timeout must be >= 0 seconds, got {args.connect_timeout:g}")
    if args.command == "check":
        return
    check_topic(args.topic)
    if getattr(args, "key", None) is not None:
        check_key(args.key)
    for option in ("group", "delete"):
        group = getattr(args, option, None)
        if group is not None and (check_topic(group, what="group") and "." in group):
            _fail(f"invalid group {group!r}: use one token of letters, digits, '_' and '-' (no dots)")
    if getattr(args, "dead_letter_topic", None) is not None:
        check_topic(args.dead_letter_topic, what="dead-letter topic")
    if args.command == "publish":
        check_headers(_headers(args.header))
        if not args.envelope:
            for option in ("event_type", "event_version"):
                if getattr(args, option) is not None:
                    _fail(f"--{option.replace('_', '-')} describes an envelope: add --envelope, or drop it")
        if args.envelope and not (args.key and args.event_type):
            _fail("--envelope needs --key (the aggregate_id) and --event-type")
    if args.command == "tail":
        if args.count is not None and args.count < 1:
            _fail(f"--count must be at least 1, got {args.count}")
        if args.timeout is not None and not args.timeout > 0:
            _fail(f"--timeout must be a number of seconds > 0, got {args.timeout:g}")


async def _run(args: argparse.Namespace) -> int:
    _validate(args)
    if args.command == "check":
        return await _check(args)
    _needs_nats(args.url, args.command)
    async with open_bus(args.url, connect_timeout=args.connect_timeout) as bus:
        if args.command == "publish":
            return await _publish(bus, args)
        if args.command == "tail":
            return await _tail(bus, args)
        if args.command == "stats":
            return await _stats(bus, args)
        if args.command == "groups":
            return await _groups(bus, args)
        return await _dead_letters(bus, args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
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
