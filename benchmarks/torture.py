"""The torture run: publish N messages over K keys while faults are injected, then check every guarantee.

On JetStream (the default) it starts its own nats-server, publishes from several tasks, consumes in a
separate consumer process, and at seeded random moments SIGKILLs the consumer (then starts a new one) and
the nats-server (then restarts it on the same store). Handlers fail (10%), overrun `handler_timeout`, run
slowly, and one poison key fails every attempt. On memory:// the same faults run in one process, with
unsubscribe/subscribe in place of consumer kills and small queues so backpressure is exercised.

The checker trusts nothing the bus reports: each consumer process appends what its handlers saw to its own
record file (`B key seq attempt` when a handler starts, `E key seq outcome attempt` when it ends), written
with unbuffered appends so a SIGKILL loses nothing already written. It prints published (acknowledged by the
broker), handled, redelivered, dead-lettered, lost, duplicates beyond redelivery, per-key order violations
and crashes, and exits 1 if anything is lost, out of order or crashed.

With --scaleout it runs several consumer processes as members of one group on a partitioned topic
(docs/scaling.md): the member reading the most partitions is SIGKILLed mid-stream and replaced, one joins
late, one leaves cleanly (SIGTERM). Their records are merged in the order things happened (each line ends
with the machine's monotonic clock), so a key handled by two members at once counts as an order
violation too; it also reports how long the group took to rebalance after the last membership change.

    python benchmarks/torture.py [--backend jetstream|memory] [--quick] [--messages 100000] [--keys 1000]
    python benchmarks/torture.py --scaleout [--quick] [--members 3] [--partitions 12] [--messages 20000]
    python benchmarks/torture.py check WORKDIR      # re-check the records of an earlier run
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import attrs
import trio

import keyedbus
from keyedbus.testing import NatsServer

TOPIC = "torture"
DEAD_LETTERS = "torture.dead-letter"
POISON = "poison"
MAX_ATTEMPTS = 4
HANDLER_TIMEOUT = 0.2
RETRY = keyedbus.RetryPolicy(max_attempts=MAX_ATTEMPTS, initial_backoff=0.01, max_backoff=0.1, jitter=0.1)


@attrs.frozen(kw_only=True)
class Faults:
    """What handlers do wrong, decided per (key, seq, attempt) from the seed so every process agrees."""

    seed: int
    failure_rate: float = 0.10
    timeout_rate: float = 0.005
    slow_rate: float = 0.02

    def outcome(self, key: str, seq: int, attempt: int) -> str:
        if key == POISON:
            return "fail"
        r = random.Random(f"{self.seed}:{key}:{seq}:{attempt}").random()
        if r < self.failure_rate:
            return "fail"
        if r < self.failure_rate + self.timeout_rate:
            return "timeout"
        if r < self.failure_rate + self.timeout_rate + self.slow_rate:
            return "slow"
        return "ok"


class _InjectedFailure(Exception):
    pass


def make_handler(
    faults: Faults, write: Callable[[str], None]
) -> Callable[[keyedbus.Message], Awaitable[None]]:
    """The handler every consumer runs: records what it saw, then does what the fault plan says."""

    async def handler(msg: keyedbus.Message) -> None:
        key, seq_text = msg.data.decode().split()
        write(f"B {key} {seq_text} {msg.attempt} {time.monotonic_ns()}\n")
        plan = faults.outcome(key, int(seq_text), msg.attempt)
        outcome = "timeout"  # what the record says if the handler is cancelled (handler_timeout)
        try:
            if plan == "fail":
                outcome = "fail"
                raise _InjectedFailure(f"injected failure for {key}#{seq_text}")
            if plan == "timeout":
                await trio.sleep(HANDLER_TIMEOUT * 5)
            elif plan == "slow":
                await trio.sleep(HANDLER_TIMEOUT / 4)
            else:
                await trio.lowlevel.checkpoint()
            outcome = "ok"
        finally:
            write(f"E {key} {seq_text} {outcome} {msg.attempt} {time.monotonic_ns()}\n")

    return handler


def _open_record(path: Path) -> Callable[[str], None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(line: str) -> None:
        os.write(fd, line.encode())  # one unbuffered append: survives a SIGKILL once it returns

    # Every line ends with CLOCK_MONOTONIC in ns: one clock for every process of the machine, so the
    # records of members running at the same time can be merged in the order things happened.

    return write


# -- the checker --------------------------------------------------------------------------------------------


@attrs.define
class Report:
    published: int = 0
    handled: int = 0
    retries: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    dead_letters_received: int = 0
    lost: int = 0
    duplicates: int = 0
    order_violations: int = 0
    crashes: int = 0
    examples: list[str] = attrs.Factory(list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.order_violations or self.crashes)

    def lines(self) -> list[str]:
        out = [
            f"published (acknowledged by the broker): {self.published}",
            f"handled (handler succeeded):            {self.handled}",
            f"retried attempts (same process):        {self.retries}",
            f"redelivered (by the broker, attempt > 1): {self.redelivered}",
            f"dead-lettered (failed the last attempt): {self.dead_lettered}",
            f"dead letters received on {DEAD_LETTERS}: {self.dead_letters_received}",
            f"lost:                                   {self.lost}",
            f"duplicates beyond redelivery:           {self.duplicates}",
            f"per-key order violations:               {self.order_violations}",
            f"crashes:                                {self.crashes}",
        ]
        return out + [f"  e.g. {e}" for e in self.examples[:10]]


def check(
    published: Iterable[tuple[str, int]],
    records: Iterable[Iterable[str]],
    crashes: int,
    *,
    concurrent: bool = False,
) -> Report:
    """Check handler records (one iterable of lines per consumer) against what was published.

    A message is finished when a handler succeeded on it or failed its last attempt. Consumers that ran one
    after another are read file by file; `concurrent` ones (members of one group running at once) are
    merged by the clock reading that ends each line. A message of a key starting while an earlier one is
    unfinished, or while another process runs one of the key, is an order violation. ``X`` (written by the
    driver after it killed a process) ends what that process had running.
    """
    report = Report(crashes=crashes)
    expected: dict[str, set[int]] = defaultdict(set)
    for key, seq in published:
        expected[key].add(seq)
        report.published += 1
    events: list[tuple[tuple[int, int, int], int, list[str]]] = []
    for process, lines in enumerate(records):
        for index, line in enumerate(lines):
            parts = line.split()
            if len(parts) < 2 or (parts[0] != "X" and len(parts) < 3):
                continue  # one os.write per line, so a SIGKILL cannot cut one short; be safe anyway
            if concurrent and parts[0] in "BEX":
                when = int(parts[-1])
                events.append(((when, process, index), process, parts))
            else:
                events.append(((0, process, index), process, parts))
    events.sort(key=lambda e: e[0])
    finished: dict[str, set[int]] = defaultdict(set)
    next_needed: dict[str, int] = defaultdict(int)  # smallest published seq of the key not finished yet
    running: dict[str, tuple[int, int]] = {}  # key -> (process, seq) of the handler running now
    ok: set[tuple[str, int]] = set()
    gave_up: set[tuple[str, int]] = set()
    dead_received: set[tuple[str, int]] = set()
    seen_by: dict[tuple[str, int], set[int]] = defaultdict(set)
    for _, process, parts in events:
        kind = parts[0]
        if kind == "O":
            continue
        if kind == "X":
            for key in [k for k, (p, _) in running.items() if p == process]:
                del running[key]
            continue
        key, seq = parts[1], int(parts[2])
        item = (key, seq)
        if kind == "D":
            dead_received.add(item)
        elif kind == "B":
            attempt = int(parts[3])
            if process in seen_by[item]:
                report.retries += 1
            elif seen_by[item] or attempt > 1:
                report.redelivered += 1  # delivered again by the broker (attempt > 1)
            seen_by[item].add(process)
            if seq > next_needed[key]:
                report.order_violations += 1
                report.examples.append(
                    f"consumer {process}: {key}#{seq} started before {key}#{next_needed[key]} finished"
                )
            elif concurrent and key in running and running[key][0] != process:
                report.order_violations += 1
                report.examples.append(
                    f"consumer {process}: {key}#{seq} started while consumer {running[key][0]} ran "
                    f"{key}#{running[key][1]}"
                )
            running[key] = (process, seq)
            if item in ok and attempt == 1:
                report.duplicates += 1
        elif kind == "E":
            if running.get(key) == (process, seq):
                del running[key]
            outcome, attempt = parts[3], int(parts[4])
            if outcome == "ok":
                ok.add(item)
            elif attempt >= MAX_ATTEMPTS:
                gave_up.add(item)
            else:
                continue
            finished[key].add(seq)
            while next_needed[key] in finished[key]:
                next_needed[key] += 1
    report.handled = len(ok)
    report.dead_lettered = len(gave_up - ok)
    report.dead_letters_received = len(dead_received)
    done = ok | gave_up
    missing = [(k, s) for k, seqs in expected.items() for s in seqs if (k, s) not in done]
    report.lost = len(missing)
    report.examples += [f"lost {k}#{s}" for k, s in sorted(missing)[:5]]
    unaccounted = (gave_up - ok) - dead_received
    if unaccounted:
        report.examples.append(
            f"{len(unaccounted)} dead letter(s) never arrived, e.g. {sorted(unaccounted)[:3]}"
        )
    return report


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def check_workdir(workdir: Path, crashes: int = 0) -> Report:
    published = [(p[1], int(p[2])) for p in (line.split() for line in _read_lines(workdir / "published.log"))]
    files = sorted(workdir.glob("consumer-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    members = sorted(workdir.glob("member-*.log"), key=lambda p: int(p.stem.split("-")[1]))
    if members:  # members of one group, running at once
        return check(published, [_read_lines(f) for f in members], crashes, concurrent=True)
    return check(published, [_read_lines(f) for f in files], crashes)


def _finished_count(workdir: Path) -> int:
    done = set()
    for f in [*workdir.glob("consumer-*.log"), *workdir.glob("member-*.log")]:
        for line in _read_lines(f):
            p = line.split()
            if p and p[0] == "E" and len(p) >= 5 and (p[3] == "ok" or int(p[4]) >= MAX_ATTEMPTS):
                done.add((p[1], p[2]))
    return len(done)


# -- publishing ---------------------------------------------------------------------------------------------


def _keys(count: int) -> list[str]:
    return [POISON] + [f"order-{i}" for i in range(count - 1)]


async def publish_all(
    bus: keyedbus.Bus, keys: list[str], per_key: int, publishers: int, write: Callable[[str], None]
) -> None:
    """Each key belongs to one publisher task, which publishes its keys' messages in order; a failed publish
    (broker down) is retried with the same message id, so it is stored once."""

    async def publisher(mine: list[str]) -> None:
        for seq in range(per_key):
            for key in mine:
                while True:
                    try:
                        await bus.publish(TOPIC, f"{key} {seq}".encode(), key=key, message_id=f"{key}-{seq}")
                        break
                    except (keyedbus.PublishError, keyedbus.ConnectionFailedError):
                        await trio.sleep(0.2)
                    except keyedbus.KeyedBusError as exc:
                        # A cluster electing a new stream leader: the stream lookup times out for a moment.
                        if "did not answer in time" not in str(exc):
                            raise
                        await trio.sleep(0.2)
                write(f"P {key} {seq}\n")

    async with trio.open_nursery() as nursery:
        for p in range(publishers):
            nursery.start_soon(publisher, keys[p::publishers])


# -- JetStream: driver and consumer processes ---------------------------------------------------------------


def _spawn_consumer(
    url: str,
    workdir: Path,
    index: int,
    seed: int,
    ack_wait: float,
    *,
    partitions: int | None = None,
    replicas: int = 1,
) -> subprocess.Popen[bytes]:
    """Start a consumer process and wait until it has subscribed. With `partitions` it is one member of a
    group sharing a topic of that many partitions (record ``member-<index>.log``)."""
    name = "consumer" if partitions is None else "member"
    command = [
        sys.executable,
        __file__,
        "consume",
        url,
        str(workdir / f"{name}-{index}.log"),
        "--seed",
        str(seed),
        "--ack-wait",
        str(ack_wait),
    ]
    if partitions is not None:
        command += ["--partitions", str(partitions), "--replicas", str(replicas)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline()  # "ready" once subscribed
    process.stdout.close()  # it prints nothing more
    if line.strip() != b"ready":
        raise RuntimeError(f"consumer {index} did not start (said {line!r})")
    return process


async def consume(
    url: str, record: Path, seed: int, ack_wait: float, partitions: int | None = None, replicas: int = 1
) -> None:
    """One consumer process: subscribe, print "ready", run until SIGTERM, then drain and exit.

    With `partitions`, TOPIC is configured with that many partitions, and each change of the partitions
    this process reads (`statistics().partitions`) is recorded as ``O <partitions or -> <clock>``.
    """
    write = _open_record(record)

    async def record_ownership(bus: keyedbus.Bus) -> None:
        last: tuple[int, ...] | None = None
        while True:
            owned = bus.statistics().partitions.get((TOPIC, "torture"), ())
            if owned != last:
                write(f"O {','.join(map(str, owned)) or '-'} {time.monotonic_ns()}\n")
                last = owned
            await trio.sleep(0.05)

    async def on_dead(msg: keyedbus.Message) -> None:
        key, seq = msg.data.decode().split()
        write(f"D {key} {seq}\n")

    pool = keyedbus.PoolConfig(workers=64, queue_size=100, handler_timeout=HANDLER_TIMEOUT)
    topic = keyedbus.TopicConfig(ack_wait=ack_wait, replicas=replicas)
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with keyedbus.open_bus(
            url, pool=pool, retry=RETRY, default_topic=topic, drain_timeout=60
        ) as bus:
            if partitions is not None:
                await bus.configure_topic(
                    TOPIC, keyedbus.TopicConfig(ack_wait=ack_wait, partitions=partitions, replicas=replicas)
                )
            await bus.subscribe(TOPIC, make_handler(Faults(seed=seed), write), group="torture")
            await bus.subscribe(DEAD_LETTERS, on_dead, group="torture")
            async with trio.open_nursery() as nursery:
                if partitions is not None:
                    nursery.start_soon(record_ownership, bus)
                print("ready", flush=True)
                async for _ in signals:
                    break
                nursery.cancel_scope.cancel()


async def run_jetstream(args: argparse.Namespace, workdir: Path) -> Report:
    rng = random.Random(args.seed)
    keys = _keys(args.keys)
    per_key = args.messages // len(keys)
    total = per_key * len(keys)
    # Faults happen at random points of progress (share of messages finished).
    plan = sorted(
        [(rng.uniform(0.1, 0.9), "consumer") for _ in range(args.consumer_kills)]
        + [(rng.uniform(0.1, 0.9), "broker") for _ in range(args.broker_kills)]
    )
    server = NatsServer(workdir / "jetstream")
    server.start()
    consumers = 0
    crashes = 0
    consumer = _spawn_consumer(server.url, workdir, consumers, args.seed, args.ack_wait)
    write = _open_record(workdir / "published.log")
    deadline = trio.current_time() + args.time_limit
    log = _progress(total)
    try:
        async with keyedbus.open_bus(server.url, connect_timeout=30) as bus, trio.open_nursery() as nursery:
            nursery.start_soon(publish_all, bus, keys, per_key, args.publishers, write)
            while trio.current_time() < deadline:
                await trio.sleep(0.5)
                done = _finished_count(workdir)
                log(done)
                if consumer.poll() is not None:
                    crashes += 1
                    print(f"  consumer {consumers} exited by itself with status {consumer.returncode}")
                    consumers += 1
                    consumer = _spawn_consumer(server.url, workdir, consumers, args.seed, args.ack_wait)
                while plan and done >= plan[0][0] * total:
                    _, what = plan.pop(0)
                    if what == "consumer":
                        print(f"  SIGKILL consumer {consumers} at {done}/{total} finished")
                        consumer.kill()
                        consumer.wait()
                        consumers += 1
                        consumer = _spawn_consumer(server.url, workdir, consumers, args.seed, args.ack_wait)
                    else:
                        print(f"  SIGKILL nats-server at {done}/{total} finished")
                        server.kill()
                        await trio.sleep(rng.uniform(0.5, 2.0))
                        server.start()
                        print("  nats-server restarted on the same store")
                if done >= total and not plan:
                    break
            nursery.cancel_scope.cancel()
        consumer.send_signal(signal.SIGTERM)
        if consumer.wait(timeout=90) != 0:
            crashes += 1
            print(f"  consumer {consumers} exited with status {consumer.returncode} after SIGTERM")
    finally:
        if consumer.poll() is None:
            consumer.kill()
        server.stop()
    return check_workdir(workdir, crashes)


# -- scale-out: members of one group, running at once ------------------------------------------------------


@attrs.frozen(kw_only=True)
class ScaleOut:
    """A scale-out run: members of one group share a partitioned topic while they are killed, join, leave."""

    members: int = 3
    partitions: int = 12
    messages: int = 20_000
    keys: int = 500
    publishers: int = 8
    #: SIGKILL the member reading the most partitions mid-stream (and start a new one if `restart`).
    kill: bool = True
    restart: bool = True
    #: One member joins late; one leaves cleanly (SIGTERM, drain).
    join: bool = True
    leave: bool = True
    ack_wait: float = 3.0
    #: Stream replicas (3 on a 3-node cluster).
    replicas: int = 1
    seed: int = 1
    #: Seconds the run may take before it gives up (the caller's own bound may be shorter).
    time_limit: float = 600.0


@attrs.frozen(kw_only=True)
class ScaleOutResult:
    report: Report
    #: Seconds from the last membership change until the live members read balanced shares (None: never).
    balance_seconds: float | None
    live_members: int
    elapsed: float

    def lines(self) -> list[str]:
        balance = "never" if self.balance_seconds is None else f"{self.balance_seconds:.1f} s"
        return [
            *self.report.lines(),
            f"members at the end: {self.live_members}; balanced {balance} after the last membership change",
        ]


def _ownership(path: Path) -> list[tuple[int, frozenset[int]]]:
    """The ``O`` records of a member: (clock, partitions read from then on)."""
    found = []
    for line in _read_lines(path):
        parts = line.split()
        if parts and parts[0] == "O" and len(parts) == 3:
            owned = frozenset(int(p) for p in parts[1].split(",")) if parts[1] != "-" else frozenset()
            found.append((int(parts[2]), owned))
    return found


def balanced_since(records: list[list[tuple[int, frozenset[int]]]], partitions: int) -> int | None:
    """The clock reading from which the members' latest ownership records have stayed balanced: every
    partition read by exactly one member, each reading ⌊P/N⌋ or ⌈P/N⌉ (None: not balanced at the end)."""
    count = len(records)
    fair = {partitions // count, -(-partitions // count)} if partitions >= count else {0, 1}
    events = sorted((t, m, owned) for m, rec in enumerate(records) for t, owned in rec)
    state: list[frozenset[int]] = [frozenset()] * count
    since: int | None = None
    for t, m, owned in events:
        state[m] = owned
        together = [p for owned_now in state for p in owned_now]
        ok = sorted(together) == list(range(partitions)) and all(len(o) in fair for o in state)
        if ok and since is None:
            since = t
        elif not ok:
            since = None
    return since


async def run_scaleout(
    plan: ScaleOut,
    url: str,
    workdir: Path,
    *,
    log: Callable[[str], None] = print,
    faults: Iterable[tuple[float, Callable[[], Awaitable[None]]]] = (),
) -> ScaleOutResult:
    """Members of group "torture" read TOPIC (`plan.partitions` partitions) while it is published; one is
    SIGKILLed mid-stream, one joins late, one leaves cleanly; then the records are checked.

    `faults` are more events: (share of messages finished, what to do then), e.g. killing a server.
    """
    rng = random.Random(plan.seed)
    keys = _keys(plan.keys)
    per_key = plan.messages // len(keys)
    total = per_key * len(keys)
    actions = dict(enumerate(f for _, f in faults))
    events = sorted(
        [(0.25, "kill")] * plan.kill
        + [(0.45, "join")] * plan.join
        + [(0.65, "leave")] * plan.leave
        + [(share, f"fault {i}") for i, (share, _) in enumerate(faults)]
    )
    started = time.monotonic()
    live: dict[int, subprocess.Popen[bytes]] = {}
    crashes = 0
    last_change = time.monotonic_ns()

    def spawn() -> None:
        index = len(list(workdir.glob("member-*.log")))
        live[index] = _spawn_consumer(
            url, workdir, index, plan.seed, plan.ack_wait, partitions=plan.partitions, replicas=plan.replicas
        )

    def reader_of_most() -> int:
        def owned(index: int) -> int:
            records = _ownership(workdir / f"member-{index}.log")
            return len(records[-1][1]) if records else 0

        return max(sorted(live), key=owned)

    for _ in range(plan.members):
        await trio.to_thread.run_sync(spawn)
    last_change = time.monotonic_ns()
    write = _open_record(workdir / "published.log")
    deadline = trio.current_time() + plan.time_limit
    progress = _progress(total)
    try:
        async with keyedbus.open_bus(url, connect_timeout=30) as bus, trio.open_nursery() as nursery:
            nursery.start_soon(publish_all, bus, keys, per_key, plan.publishers, write)
            while trio.current_time() < deadline:
                await trio.sleep(0.2)
                done = _finished_count(workdir)
                progress(done)
                for index, process in list(live.items()):
                    if process.poll() is not None:
                        crashes += 1
                        log(f"  member {index} exited by itself with status {process.returncode}")
                        del live[index]
                while events and done >= events[0][0] * total:
                    _, what = events.pop(0)
                    if what == "kill":
                        victim = reader_of_most()
                        log(f"  SIGKILL member {victim} at {done}/{total} finished")
                        live[victim].kill()
                        await trio.to_thread.run_sync(live.pop(victim).wait)
                        # Written once it is dead: ends what it had running, for the checker.
                        _open_record(workdir / f"member-{victim}.log")(f"X {time.monotonic_ns()}\n")
                        if plan.restart:
                            await trio.to_thread.run_sync(spawn)
                            log(f"  member {max(live)} started in its place")
                    elif what.startswith("fault"):
                        log(f"  {what} at {done}/{total} finished")
                        await actions[int(what.split()[1])]()
                        continue  # not a membership change
                    elif what == "join":
                        await trio.to_thread.run_sync(spawn)
                        log(f"  member {max(live)} joins at {done}/{total} finished")
                    else:
                        leaver = rng.choice(sorted(live)[:-1] or sorted(live))
                        log(f"  member {leaver} leaves (SIGTERM) at {done}/{total} finished")
                        live[leaver].send_signal(signal.SIGTERM)
                        status = await trio.to_thread.run_sync(live.pop(leaver).wait)
                        if status != 0:
                            crashes += 1
                            log(f"  member {leaver} exited with status {status} after SIGTERM")
                    last_change = time.monotonic_ns()
                if done >= total and not events:
                    break
            nursery.cancel_scope.cancel()
        # Balance: the live members' records must show balanced shares, for a while, before we stop them.
        balanced: int | None = None
        give_up = min(deadline, trio.current_time() + 30)
        while trio.current_time() < give_up:
            records = [_ownership(workdir / f"member-{i}.log") for i in sorted(live)]
            balanced = balanced_since(records, plan.partitions)
            if balanced is not None and time.monotonic_ns() - balanced > 2e9:
                break
            await trio.sleep(0.2)
    finally:
        for process in live.values():
            process.send_signal(signal.SIGTERM)
        for index, process in live.items():
            try:
                status = await trio.to_thread.run_sync(functools.partial(process.wait, timeout=90))
            except subprocess.TimeoutExpired:
                process.kill()
                status = -1
            if status != 0:
                crashes += 1
                log(f"  member {index} exited with status {status} after SIGTERM")
    seconds = None if balanced is None else max(0.0, (balanced - last_change) / 1e9)
    return ScaleOutResult(
        report=check_workdir(workdir, crashes),
        balance_seconds=seconds,
        live_members=len(live),
        elapsed=time.monotonic() - started,
    )


# -- memory: one process ------------------------------------------------------------------------------------


async def run_memory(args: argparse.Namespace, workdir: Path) -> Report:
    rng = random.Random(args.seed)
    keys = _keys(args.keys)
    per_key = args.messages // len(keys)
    total = per_key * len(keys)
    write_published = _open_record(workdir / "published.log")
    faults = Faults(seed=args.seed)
    plan = sorted(rng.uniform(0.1, 0.9) for _ in range(args.consumer_kills))
    log = _progress(total)
    # Small queues: publishers outrun the pool, so backpressure and full queues are part of the run.
    pool = keyedbus.PoolConfig(workers=64, queue_size=8, handler_timeout=HANDLER_TIMEOUT)
    async with keyedbus.open_bus(pool=pool, retry=RETRY, drain_timeout=600) as bus:
        index = 0
        write = _open_record(workdir / f"consumer-{index}.log")

        async def on_dead(msg: keyedbus.Message) -> None:
            key, seq = msg.data.decode().split()
            write(f"D {key} {seq}\n")

        def handler_for(w: Callable[[str], None]) -> Callable[[keyedbus.Message], Awaitable[None]]:
            return make_handler(faults, w)

        await bus.subscribe(DEAD_LETTERS, on_dead)
        sub = await bus.subscribe(TOPIC, handler_for(write), group="torture")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_all, bus, keys, per_key, args.publishers, write_published)
            while plan:
                await trio.sleep(0.2)
                done = _finished_count(workdir)
                log(done)
                if done >= plan[0] * total:
                    plan.pop(0)
                    print(f"  unsubscribe (hand back) and subscribe again at {done}/{total} finished")
                    await sub.unsubscribe()
                    index += 1
                    write = _open_record(workdir / f"consumer-{index}.log")
                    sub = await bus.subscribe(TOPIC, handler_for(write), group="torture")
    return check_workdir(workdir)


def _progress(total: int) -> Callable[[int], None]:
    last = [0.0]

    def log(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 5:
            last[0] = now
            print(f"  {done}/{total} finished", flush=True)

    return log


def _main_scaleout(args: argparse.Namespace) -> int:
    messages, keys = (5_000, 100) if args.quick else (args.messages, args.keys)
    plan = ScaleOut(
        members=args.members,
        partitions=args.partitions,
        messages=messages,
        keys=keys,
        publishers=args.publishers,
        ack_wait=10.0 if args.ack_wait is None else args.ack_wait,
        seed=args.seed,
        time_limit=min(args.time_limit, 240.0) if args.quick else args.time_limit,
    )
    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="keyedbus-torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"scale-out torture run: {plan.messages} messages over {plan.keys} keys (one poison key), "
        f"{plan.members} members of one group, {plan.partitions} partitions, a member SIGKILLed and "
        f"replaced, one joining, one leaving; seed {plan.seed}; records in {workdir}",
        flush=True,
    )
    server = NatsServer(workdir / "jetstream")
    server.start()
    try:
        result = trio.run(run_scaleout, plan, server.url, workdir)
    finally:
        server.stop()
    print(f"finished in {result.elapsed:.1f} s")
    print("\n".join(result.lines()))
    return 0 if result.report.ok and result.balance_seconds is not None else 1


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "consume":
        parser = argparse.ArgumentParser(prog="torture.py consume")
        parser.add_argument("url")
        parser.add_argument("record", type=Path)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--ack-wait", type=float, default=3.0)
        parser.add_argument("--partitions", type=int, default=None)
        parser.add_argument("--replicas", type=int, default=1)
        args = parser.parse_args(sys.argv[2:])
        logging.getLogger("keyedbus").setLevel(logging.CRITICAL)
        if os.environ.get("KEYEDBUS_TORTURE_LOG"):  # debugging a run: each consumer's log next to its record
            logging.getLogger("keyedbus").setLevel(logging.INFO)
            logging.basicConfig(
                filename=f"{args.record}.txt", level=logging.INFO, format="%(asctime)s %(message)s"
            )
        trio.run(consume, args.url, args.record, args.seed, args.ack_wait, args.partitions, args.replicas)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "check":
        report = check_workdir(Path(sys.argv[2]))
        print("\n".join(report.lines()))
        sys.exit(0 if report.ok else 1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["jetstream", "memory"], default="jetstream")
    parser.add_argument("--quick", action="store_true", help="CI size: 5,000 messages over 100 keys")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=8)
    parser.add_argument("--consumer-kills", type=int, default=3)
    parser.add_argument("--broker-kills", type=int, default=3)
    parser.add_argument(
        "--ack-wait",
        type=float,
        default=None,
        help="TopicConfig.ack_wait for the run (3 s; 10 s with --scaleout, see docs/scaling.md)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds before the run gives up")
    parser.add_argument("--workdir", type=Path, help="keep the records here (default: a temporary dir)")
    parser.add_argument(
        "--scaleout",
        action="store_true",
        help="JetStream with several members of one group: a member killed, one joining, one leaving",
    )
    parser.add_argument("--members", type=int, default=3, help="members at the start (--scaleout)")
    parser.add_argument("--partitions", type=int, default=12, help="partitions of the topic (--scaleout)")
    args = parser.parse_args()
    if args.scaleout:
        sys.exit(_main_scaleout(args))
    if args.ack_wait is None:
        args.ack_wait = 3.0
    if args.quick:
        args.messages, args.keys = 5_000, 100
        args.consumer_kills = args.broker_kills = 1
        args.time_limit = min(args.time_limit, 240.0)
    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)  # thousands of retry warnings are not news here
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="keyedbus-torture-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"torture run on {args.backend}: {args.messages} messages over {args.keys} keys "
        f"(one poison key), {args.publishers} publishers, {args.consumer_kills} consumer kills, "
        f"{args.broker_kills if args.backend == 'jetstream' else 0} broker kills, seed {args.seed}; "
        f"records in {workdir}",
        flush=True,
    )
    start = time.monotonic()
    runner = run_jetstream if args.backend == "jetstream" else run_memory
    report = trio.run(runner, args, workdir)
    print(f"finished in {time.monotonic() - start:.1f} s")
    print("\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
