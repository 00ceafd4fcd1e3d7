"""The benchmarks of ../shared/BENCH.md: each figure is a ratio against a baseline measured in the same run.

Each measurement runs in a fresh subprocess (raw-asyncio baselines must not share a process with
trio_asyncio, which slows plain asyncio), ours and the baseline alternating A B A B, at least 3 repetitions;
the table gives medians and ratios and `benchmarks/results.json` keeps them.

    python benchmarks/bench.py [--quick] [--only SCENARIO ...] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


@attrs.frozen
class Scenario:
    name: str
    unit: str
    higher_is_better: bool
    target: str  # as BENCH.md / the issue states it
    meets: Callable[[float], bool | None]  # None: no target
    params: dict[str, Any]
    quick: dict[str, Any]
    needs_nats: bool = False


def _scenarios() -> list[Scenario]:
    def at_least(bound: float) -> Callable[[float], bool]:
        return lambda r: r >= bound

    def at_most(bound: float) -> Callable[[float], bool]:
        return lambda r: r <= bound

    def no_target(_: float) -> None:
        return None

    out = [
        Scenario(
            "pool_memory",
            "msgs/s",
            True,
            ">= 0.8",
            at_least(0.8),
            {"messages": 200_000, "keys": 10_000},
            {"messages": 20_000, "keys": 10_000},
        ),
        Scenario(
            "nats_core",
            "msgs/s",
            True,
            ">= 0.8",
            at_least(0.8),
            {"messages": 200_000, "keys": 10_000},
            {"messages": 20_000, "keys": 1_000},
            needs_nats=True,
        ),
        Scenario(
            "jetstream",
            "msgs/s",
            True,
            ">= 0.9",
            at_least(0.9),
            {"messages": 50_000, "keys": 10_000},
            {"messages": 5_000, "keys": 1_000},
            needs_nats=True,
        ),
    ]
    for keys in (1, 10, 100, 10_000):
        target, meets = ("<= 1.1", at_most(1.1)) if keys in (1, 100) else ("-", no_target)
        messages = 10_000 if keys > 1 else 2_000  # one key runs sequentially: 2,000 x 2.5 ms is 5 s
        out.append(
            Scenario(
                f"io_bound[keys={keys}]",
                "s",
                False,
                target,
                meets,
                {"messages": messages, "keys": keys},
                {"messages": max(200, messages // 10), "keys": keys},
            )
        )
    out += [
        Scenario(
            "poison_isolation",
            "msgs/s",
            True,
            ">= 0.95",
            at_least(0.95),
            {"messages": 100_000, "keys": 1_000},
            {"messages": 10_000, "keys": 1_000},
        ),
        Scenario(
            "topics_memory",
            "MB",
            False,
            "<= 1.05",
            at_most(1.05),
            {"topics": 1_000},
            {"topics": 1_000},
        ),
        Scenario(
            "latency",
            "ms p99",
            False,
            "<= 1.5",
            at_most(1.5),
            {"messages": 20_000, "keys": 1_000},
            {"messages": 2_000, "keys": 1_000},
        ),
    ]
    return out


def _measure(scenario: str, side: str, params: dict[str, Any], url: str | None) -> dict[str, Any]:
    """Run one measurement in a fresh process; it prints one JSON object."""
    command = [sys.executable, str(HERE / "_bench_run.py"), scenario.split("[")[0], side, json.dumps(params)]
    if url:
        command.append(url)
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{scenario}/{side} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI sizes: proves the suite runs")
    parser.add_argument("--only", nargs="*", help="scenario names (prefix match)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.repetitions < 3 and not args.quick:
        parser.error("BENCH.md asks for at least 3 repetitions")
    scenarios = [s for s in _scenarios() if not args.only or any(s.name.startswith(o) for o in args.only)]
    server = None
    url = None
    if any(s.needs_nats for s in scenarios):
        from keyedbus.testing import NatsServer

        server = NatsServer(Path(tempfile.mkdtemp(prefix="keyedbus-bench-")) / "jetstream")
        server.start()
        url = server.url
    rows = []
    try:
        for scenario in scenarios:
            params = scenario.quick if args.quick else scenario.params
            ours: list[float] = []
            base: list[float] = []
            extra: dict[str, Any] = {}
            for rep in range(args.repetitions):
                for side, into in (("ours", ours), ("baseline", base)):
                    print(
                        f"[{scenario.name}] repetition {rep + 1}/{args.repetitions}: {side} ...",
                        end=" ",
                        flush=True,
                    )
                    result = _measure(scenario.name, side, {**params, "rep": rep}, url)
                    into.append(float(result["value"]))
                    extra.setdefault(side, []).append({k: v for k, v in result.items() if k != "value"})
                    print(f"{result['value']:.4g} {scenario.unit}", flush=True)
            ours_median, base_median = statistics.median(ours), statistics.median(base)
            ratio = ours_median / base_median if base_median else float("nan")
            met = scenario.meets(ratio)
            rows.append(
                {
                    "name": scenario.name,
                    "parameters": params,
                    "unit": scenario.unit,
                    "ours": ours,
                    "baseline": base,
                    "ours_median": ours_median,
                    "baseline_median": base_median,
                    "ratio": ratio,
                    "target": scenario.target,
                    "met": met,
                    "repetitions": args.repetitions,
                    "details": extra,
                }
            )
    finally:
        if server is not None:
            server.stop()
    machine = {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "quick": args.quick,
    }
    args.output.write_text(json.dumps({"machine": machine, "scenarios": rows}, indent=2) + "\n")
    print()
    print(
        f"{'scenario':<22} {'ours':>12} {'baseline':>12} {'unit':>8} {'ratio':>7} {'target':>8} {'met?':>5}"
    )
    for row in rows:
        shown = {True: "yes", False: "NO", None: "-"}[row["met"]]
        print(
            f"{row['name']:<22} {row['ours_median']:>12.4g} {row['baseline_median']:>12.4g} "
            f"{row['unit']:>8} {row['ratio']:>7.3f} {row['target']:>8} {shown:>5}"
        )
    print(
        f"\n{machine['date']}, {machine['cores']} cores, Python {machine['python']}; written to {args.output}"
    )


if __name__ == "__main__":
    main()
