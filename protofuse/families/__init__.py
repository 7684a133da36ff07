"""Prototype families behind one interface (``Family``); ``family(name)`` returns one."""

from __future__ import annotations

from typing import Any

from .base import Family, Fitted, Task
from .discriminative import Discriminative, DiscriminativeTask
from .generative import Generative, GenerativeTask

# Each family reads its own kind of networks; the registry holds every kind (``Family[Any]``).
FAMILIES: dict[str, Family[Any]] = {f.name: f for f in (Discriminative(), Generative())}


def family(name: str) -> Family[Any]:
    """The family called ``name``, or a ValueError listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown prototype family {name!r}; known families: {sorted(FAMILIES)}"
        ) from None


__all__ = [
    "FAMILIES",
    "Discriminative",
    "DiscriminativeTask",
    "Family",
    "Fitted",
    "Generative",
    "GenerativeTask",
    "Task",
    "family",
]
