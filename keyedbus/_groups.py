"""What leaves `open_bus` when its nursery raises an exception group (trio-websocket's policy).

Unwrap one level only; prefer the user's exception, attaching keyedbus's own errors as its `__context__`;
a user's own ExceptionGroup propagates unchanged.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["is_users", "to_raise"]


def to_raise(group: BaseExceptionGroup[BaseException], user: BaseException | None) -> BaseException:
    """The exception `open_bus` raises for its nursery's `group`; `user` is what the block raised, if any.

    - The user's exception is in the group: it is raised as itself (a group as it was raised), with the
      other (internal) exceptions attached at the end of its `__context__` chain.
    - Otherwise, a group of one: that one, bare (a KeyboardInterrupt from a handler comes out as itself).
    - Otherwise the group itself.
    """
    inner = group.exceptions
    if user is not None and any(is_users(exc, user) for exc in inner):
        others = [exc for exc in inner if not is_users(exc, user)]
        if others:
            internal = (
                others[0]
                if len(others) == 1
                else BaseExceptionGroup("keyedbus's own errors while the block failed", others)
            )
            _attach(user, internal)
        return user
    if len(inner) == 1:
        return inner[0]
    return group


def is_users(exc: BaseException, user: BaseException | None) -> bool:
    """`exc` is `user`, or a copy trio derived of the user's group (cancel scopes split groups)."""
    if exc is user:
        return True
    return (
        isinstance(exc, BaseExceptionGroup)
        and isinstance(user, BaseExceptionGroup)
        and len(exc.exceptions) == len(user.exceptions)
        and all(is_users(a, b) for a, b in zip(exc.exceptions, user.exceptions, strict=True))
    )


def _attach(exc: BaseException, context: BaseException) -> None:
    """Put `context` at the end of `exc`'s `__context__` chain (never making a cycle)."""
    seen = {id(exc)}
    while exc.__context__ is not None:
        exc = exc.__context__
        if id(exc) in seen or exc is context:
            return
        seen.add(id(exc))
    if id(context) not in seen:
        exc.__context__ = context
