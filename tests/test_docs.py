"""Every code block in README.md and docs/*.md runs: Python as a script (or with pytest when it holds tests),
console blocks command by command against a nats-server started here, config blocks through nats-server -t."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from keyedbus.testing import NatsServer, _binary

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The README's first block is the two set-up commands; .ci/run runs them word for word on a fresh clone.
README_SETUP = "python3 -m venv .venv"


def _blocks() -> list[tuple[str, int, str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for number, match in enumerate(FENCE.finditer(text), 1):
            language, body = match.group(1), match.group(2)
            if page.name == "README.md" and README_SETUP in body:
                continue
            found.append((page.relative_to(ROOT).as_posix(), number, language, body))
    return found


BLOCKS = _blocks()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> object:
    with NatsServer(tmp_path_factory.mktemp("docs") / "js") as running:
        yield running


def test_every_block_has_a_language_this_test_runs() -> None:
    assert BLOCKS, "no code blocks found"
    unknown = [(p, n, lang) for p, n, lang, _ in BLOCKS if lang not in ("python", "console", "conf")]
    assert not unknown, f"code blocks this test cannot run: {unknown}"


@pytest.mark.nats
@pytest.mark.parametrize(
    ("page", "number", "language", "body"), BLOCKS, ids=[f"{p}#{n}" for p, n, _, _ in BLOCKS]
)
def test_block_runs(
    page: str, number: int, language: str, body: str, server: NatsServer, tmp_path: Path
) -> None:
    scripts = sysconfig.get_path("scripts")
    env = {
        **os.environ,
        "KEYEDBUS_URL": server.url,
        "NATS_URL": server.url,
        "PATH": scripts + os.pathsep + os.environ["PATH"],
    }
    if language == "conf":
        conf = tmp_path / "nats-server.conf"
        conf.write_text(body)
        done = subprocess.run([_binary(), "-t", "-c", str(conf)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return
    if language == "python":
        script = tmp_path / ("test_block.py" if re.search(r"^(async )?def test_", body, re.M) else "block.py")
        script.write_text(body)
        if script.name.startswith("test_"):
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
        else:
            command = [sys.executable, str(script)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, f"{page} block {number}:\n{done.stdout}\n{done.stderr}"
        return
    for line in body.splitlines():
        if not line.startswith("$ "):
            continue
        done = subprocess.run(
            line[2:], shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
        )
        assert done.returncode == 0, f"{page} block {number}: {line}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr
