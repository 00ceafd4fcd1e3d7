"""NATS URL helpers that need no NATS import."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["safe_url"]


def safe_url(url: str) -> str:
    """The URL's servers as scheme://host:port, never user, password or token."""
    out = []
    for part in url.split(","):
        part = part.strip()
        parsed = urlsplit(part if "://" in part else f"nats://{part}")
        out.append(f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 4222}")
    return ",".join(out)
