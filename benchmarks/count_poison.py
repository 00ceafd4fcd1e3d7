"""poison_isolation's two sides counted with callgrind, deterministically: repeatable whatever the load.

    python -m benchmarks.count_poison [--messages 100000] [--cache]

Runs the scenario's own workload (`_bench_run._poison_run`, keyedbus's log silenced as there) under
``valgrind --tool=callgrind``, with and without the poison key, and prints instructions (with `--cache`:
D1 and last-level misses, simulated with a 32 KB D1 and a 1 MB LL, about a core's own caches, and branch
mispredictions). The retries are timed, so the run must see them where a native run does: trio's scheduler
and `random` (the retry jitter) are seeded, and the clock advances `PER_STEP` seconds per task step (the
native run's pace: 100,000 healthy messages, ~111,500 steps, ~1.5 s on a quiet machine) and jumps over
idle waits. Whole process: start-up and imports are in both sides alike. Needs valgrind; ~5 min a side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
from typing import Any

import trio
import trio.abc

#: Seconds of the run's clock per task step: the native pace (see the module docstring).
PER_STEP = 1.35e-5
_EVENTS = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw", "Bcm", "Bim")


class _StepClock(trio.abc.Clock, trio.abc.Instrument):
    """Time that advances with the work done (per task step), not with the machine's load."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps = 0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self.now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline == float("inf"):
            return 86400.0  # nothing scheduled at all: a real wait
        self.now = max(self.now, deadline)  # idle until then: jump
        return 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1
        self.now += PER_STEP


def _run(side: str, messages: int) -> None:
    from benchmarks import _bench_run

    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)  # as _bench_run.main
    random.seed(0)
    trio._core._run._r.seed(0)  # the scheduler's batch order (no public way to seed it)
    clock = _StepClock()
    params = {"messages": messages, "keys": 1_000}
    result = trio.run(_bench_run._poison_run, params, side == "ours", clock=clock, instruments=[clock])
    print(json.dumps({"side": side, "steps": clock.steps, "clock_s": clock.now, **result}))


def _count(side: str, messages: int, cache: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        if cache:
            command += ["--cache-sim=yes", "--branch-sim=yes", "--D1=32768,8,64", "--LL=1048576,16,64"]
        command += [
            sys.executable,
            "-m",
            "benchmarks.count_poison",
            "--run",
            side,
            "--messages",
            str(messages),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        with open(out) as profile:
            text = profile.read()
    events = re.search(r"^events: (.*)$", text, re.MULTILINE)
    totals = re.search(r"^totals: (.*)$", text, re.MULTILINE)
    if events is None or totals is None:
        raise SystemExit(f"no totals in callgrind's output:\n{done.stderr}")
    counts = dict(zip(events.group(1).split(), map(int, totals.group(1).split()), strict=True))
    return {**json.loads(done.stdout.strip().splitlines()[-1]), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--cache", action="store_true", help="simulate the caches and branch predictor")
    parser.add_argument("--run", choices=("ours", "baseline"), help=argparse.SUPPRESS)  # one run, uncounted
    args = parser.parse_args()
    if args.run:
        _run(args.run, args.messages)
        return
    ours = _count("ours", args.messages, args.cache)
    baseline = _count("baseline", args.messages, args.cache)
    print(f"{'':10}{'ours':>16}{'baseline':>16}{'ratio':>8}")
    for name in ("steps", *_EVENTS):
        if name in ours:
            print(f"{name:10}{ours[name]:16,}{baseline[name]:16,}{ours[name] / baseline[name]:8.3f}")


if __name__ == "__main__":
    main()
