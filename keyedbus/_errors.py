"""The keyedbus error hierarchy: one root, one subclass per failure."""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "BusClosedError",
    "ConnectionFailedError",
    "DuplicateSubscriptionError",
    "HandlerTimeoutError",
    "InvalidConfigError",
    "InvalidEnvelopeError",
    "InvalidHandlerError",
    "InvalidHeaderError",
    "InvalidKeyError",
    "InvalidTopicError",
    "KeyedBusError",
    "MissingExtraError",
    "PublishError",
    "TopicConfigConflictError",
    "UnsupportedEventLoopError",
]


class KeyedBusError(Exception):
    """Root of every error keyedbus raises; catch this to catch them all."""


class ArgumentTypeError(KeyedBusError, TypeError):
    """An argument has the wrong type (for example `str` where `bytes` is required)."""


class InvalidHandlerError(ArgumentTypeError):
    """A handler is not an `async def` function taking one message."""


class InvalidTopicError(KeyedBusError, ValueError):
    """A topic name breaks the NATS subject rules keyedbus follows."""


class InvalidKeyError(KeyedBusError, ValueError):
    """A message key (aggregate id) is empty, too long or has characters outside the allowed set."""


class InvalidHeaderError(KeyedBusError, ValueError):
    """A header name or value cannot travel on the wire."""


class InvalidConfigError(KeyedBusError, ValueError):
    """A configuration value (PoolConfig, RetryPolicy, TopicConfig, open_bus option) is out of range."""


class InvalidEnvelopeError(KeyedBusError, ValueError):
    """An envelope is invalid, or bytes do not decode as one; `reason` says which rule failed."""

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}; {hint}" if hint else reason)


class DuplicateSubscriptionError(KeyedBusError, ValueError):
    """This bus already has a subscription for that (topic, group)."""


class TopicConfigConflictError(KeyedBusError, ValueError):
    """A topic is already in use with a configuration that cannot be changed in place."""


class BusClosedError(KeyedBusError, RuntimeError):
    """The bus has been closed (its `open_bus` block has exited)."""


class ConnectionFailedError(KeyedBusError):
    """The broker could not be reached or refused the connection."""


class PublishError(KeyedBusError):
    """A publish failed: refused at the call, or the broker's store ack did not come.

    `topic` and `message_id` name the message (None where not known). The message says whether it may
    have been stored anyway; publishing again with the same `message_id` is always safe.
    """

    def __init__(self, message: str, *, topic: str | None = None, message_id: str | None = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.message_id = message_id


class MessageTooLargeError(PublishError):
    """A message (payload plus encoded headers) is bigger than the broker's max_payload; refused at the call.

    `size` and `limit` are both in bytes.
    """

    def __init__(
        self, message: str, *, size: int, limit: int, topic: str | None = None, message_id: str | None = None
    ) -> None:
        super().__init__(message, topic=topic, message_id=message_id)
        self.size = size
        self.limit = limit


class TopicFullError(PublishError):
    """A memory:// topic is at its bound and no subscriber can make room in time (or the publisher is the
    handler that would have to make it); see docs/semantics.md, "Limits and retention"."""


class HandlerTimeoutError(KeyedBusError):
    """A handler ran longer than `PoolConfig.handler_timeout` and was cancelled."""


class MissingExtraError(KeyedBusError, ImportError):
    """An optional part of keyedbus needs packages that are not installed; the message names the extra."""


class UnsupportedEventLoopError(KeyedBusError, RuntimeError):
    """keyedbus was called outside a trio run (for example under asyncio or anyio's asyncio backend)."""
