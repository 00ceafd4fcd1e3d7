"""Where the time goes: one benchmark side under cProfile, in its own process, with the top entries printed.

    python benchmarks/hotspots.py nats_core [--side ours] [--messages 100000] [--keys 10000] [--top 25]

Scenarios: pool_memory, nats_core, jetstream (the sides that mark their timed section with `_profile`; only
that section is profiled, not the set-up or the storing before a JetStream run). The NATS ones start their
own nats-server on a free loopback port. cProfile (the standard library's) counts every call, which inflates
many small calls; its ranking by own time is what matters here, not its absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NATS = ("nats_core", "jetstream", "latency_nats", "peer_nats_core", "peer_jetstream")


def _print_top(profile: Path, top: int) -> None:
    stats = pstats.Stats(str(profile))
    rows = []
    # pstats keeps its table in .stats: {(file, line, function): (calls, primitive calls, tottime, cumtime,
    # callers)}; that is its documented use by print_stats, with no public accessor.
    for (file, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append((tottime, cumtime, calls, f"{_short(file)}:{line}({function})"))
    rows.sort(reverse=True)
    total: float = stats.total_tt  # type: ignore[attr-defined]
    print(f"total {total:.2f} s (profiled); top {top} by own time")
    print(f"{'own s':>7} {'own %':>6} {'cum s':>7} {'calls':>9}  function")
    for tottime, cumtime, calls, where in rows[:top]:
        print(f"{tottime:7.3f} {100 * tottime / total:6.1f} {cumtime:7.3f} {calls:9d}  {where}")


def _short(file: str) -> str:
    """A path from the package root: keyedbus/_pool.py, trio/_core/_run.py, collections/__init__.py."""
    for marker in ("site-packages/", "/work/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            return file.split("/", 1)[1] if marker != "site-packages/" else file
    return file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario")
    parser.add_argument("--side", default="ours")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--params", default="{}", help="further parameters as JSON")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, help="keep the .prof file here")
    args = parser.parse_args()
    params = {
        "messages": args.messages,
        "keys": args.keys,
        "rep": 0,
        "tag": "prof",
        **json.loads(args.params),
    }
    work = Path(tempfile.mkdtemp(prefix="keyedbus-profile-"))
    output = args.output or work / "out.prof"
    command = [sys.executable, str(HERE / "_bench_run.py"), args.scenario, args.side, json.dumps(params)]
    server = None
    if args.scenario in NATS:
        from keyedbus.testing import NatsServer

        server = NatsServer(work / "jetstream")
        server.start()
        command.append(server.url)
    try:
        environment = {**os.environ, "KEYEDBUS_BENCH_PROFILE": str(output)}
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    finally:
        if server is not None:
            server.stop()
    if done.returncode != 0:
        sys.exit(f"{args.scenario}/{args.side} failed:\n{done.stderr[-3000:]}")
    print(f"{args.scenario}/{args.side} {json.dumps(params)}: {done.stdout.strip().splitlines()[-1]}")
    if not output.exists():
        sys.exit(f"{args.scenario}/{args.side} has no profiled section (_profile in _bench_run.py)")
    _print_top(output, args.top)


if __name__ == "__main__":
    main()
