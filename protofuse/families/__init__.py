"""Prototype families behind one interface (``Family``); ``family(name)`` returns one."""

from __future__ import annotations

from .base import Family, Fitted, Task
from .discriminative import Discriminative, DiscriminativeTask
from .generative import Generative, GenerativeTask

FAMILIES: dict[str, Family] = {f.name: f for f in (Discriminative(), Generative())}


def family(name: str) -> Family:
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
