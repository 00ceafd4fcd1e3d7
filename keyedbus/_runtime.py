"""Checks at the entry of `open_bus`: running under trio, and the optional NATS packages installed."""

from __future__ import annotations

from types import ModuleType

import trio

from ._errors import MissingExtraError, UnsupportedEventLoopError

__all__ = ["import_nats_backend", "require_trio"]

#: The packages the `nats` extra installs, as their import names.
_NATS_EXTRA = ("nats", "trio_asyncio")


def require_trio(what: str) -> None:
    """Raise UnsupportedEventLoopError unless called inside trio (trio.run, or anyio's trio backend)."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        raise UnsupportedEventLoopError(
            f"{what} runs on trio, and this code is not running under trio (asyncio, or anyio's asyncio "
            'backend?): start it with trio.run(main) or anyio.run(main, backend="trio"); from asyncio or '
            "sync code (a notebook, a script, a WSGI app) use keyedbus.blocking.open_bus(url)"
        ) from None


def import_nats_backend() -> ModuleType:
    """Import the NATS backend, or raise MissingExtraError saying which extra to install."""
    try:
        from ._backends import nats as nats_backend
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if missing not in _NATS_EXTRA:
            raise
        raise MissingExtraError(
            f"nats:// URLs need the nats extra ({missing} is not installed): pip install 'keyedbus[nats]'"
        ) from exc
    return nats_backend
