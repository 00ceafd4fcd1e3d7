"""Sessions: tests (every installed CPython 3.10-3.13), lint, typecheck, examples, torture, bench."""

from __future__ import annotations

import glob
import os
import shutil

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "examples"]
nox.options.reuse_existing_virtualenvs = True

# pyenv keeps interpreters in per-version folders whose python3.X shims fail unless that folder is on
# PATH; put the real folders on PATH so nox finds them.
for folder in sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3].*/bin"))):
    os.environ["PATH"] = folder + os.pathsep + os.environ["PATH"]
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")
FOUND = [v for v in SUPPORTED if shutil.which(f"python{v}")]
DEFAULT = "3.11" if "3.11" in FOUND else (FOUND or ["3.11"])[0]


# Every supported version is a session, found or not: a missing interpreter shows up as "skipped" in nox's
# summary (with --no-error-on-missing-interpreters, as .ci/run passes) instead of vanishing from the list.
@nox.session(python=list(SUPPORTED))
def tests(session: nox.Session) -> None:
    """Run the test suite (pass pytest options after --)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=DEFAULT)
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=DEFAULT)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, tests and examples."""
    session.install("-e", ".[test]", "mypy>=1.10")
    session.run("mypy", "--strict")


@nox.session(python=DEFAULT)
def examples(session: nox.Session) -> None:
    """Run every example against the embedded broker."""
    session.install("-e", ".")
    for path in sorted(glob.glob("examples/*.py")):
        session.run("python", path)


@nox.session(python=DEFAULT)
def torture(session: nox.Session) -> None:
    """The torture run on JetStream, then on memory:// (full size; pass --quick for the CI size)."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/torture.py", "--backend", "jetstream", *session.posargs)
    session.run("python", "benchmarks/torture.py", "--backend", "memory", *session.posargs)


@nox.session(python=DEFAULT)
def bench(session: nox.Session) -> None:
    """Every benchmark scenario of BENCH.md at full size (pass --quick for the CI size, --only NAME)."""
    # FastStream is the peer of the peer_* scenarios: installed here only, never a runtime or test dependency
    # (without it those scenarios are reported as skipped, as in CI's quick run).
    session.install("-e", ".[test]", "faststream[nats]==0.7.8")
    session.run("python", "benchmarks/bench.py", *session.posargs)
