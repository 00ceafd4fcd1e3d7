"""NoPublicConstructor: for classes only keyedbus creates (as trio's `Task`, `Nursery`)."""

from __future__ import annotations

from typing import Any, NoReturn, TypeVar

__all__ = ["NoPublicConstructor"]

T = TypeVar("T")


class NoPublicConstructor(type):
    """A metaclass: `Cls(...)` raises TypeError; keyedbus creates instances with `Cls._create(...)`."""

    def __call__(cls, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(
            f"keyedbus.{cls.__qualname__} has no public constructor: "
            f"{'use keyedbus.open_bus()' if cls.__qualname__ == 'Bus' else 'keyedbus creates it for you'}"
        )

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]
