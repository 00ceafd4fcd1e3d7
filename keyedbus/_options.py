"""open_bus()'s arguments: the URL (its scheme, and how it may be shown) and the NATS auth and TLS options."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from ._errors import ArgumentTypeError, InvalidConfigError

__all__ = ["check_url", "nats_options", "shown_url"]


def shown_url(url: str) -> str:
    """The URL as it may appear in reprs, logs and errors: no credentials."""
    if url.startswith("memory"):
        return url
    from ._backends._urls import safe_url

    return safe_url(url)


def nats_options(**given: Any) -> dict[str, Any]:
    """Map open_bus's auth and TLS options to nats-py's connect() keywords, checking their types."""
    names = {"user": "user", "password": "password", "token": "token", "credentials": "user_credentials"}
    out: dict[str, Any] = {}
    for name, target in names.items():
        value = given[name]
        if value is not None:
            if not isinstance(value, str):
                raise ArgumentTypeError(f"{name} must be a str or None, got {type(value).__name__}")
            out[target] = value
    if given["tls"] is not None:
        if not isinstance(given["tls"], ssl.SSLContext):
            raise ArgumentTypeError(
                f"tls must be an ssl.SSLContext or None, got {type(given['tls']).__name__}"
            )
        out["tls"] = given["tls"]
    return out


def check_url(url: object) -> str:
    if not isinstance(url, str):
        raise ArgumentTypeError(
            f"url must be a str such as 'memory://' or 'nats://127.0.0.1:4222', got {url!r}"
        )
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in ("memory", "nats", "tls"):
        raise InvalidConfigError(
            f"unsupported bus URL scheme {scheme or url!r}: use 'memory://' or 'nats://host:port'"
        )
    if scheme == "memory" and url != "memory://":
        raise InvalidConfigError(f"the embedded broker takes no address: use 'memory://', got {url!r}")
    return scheme
