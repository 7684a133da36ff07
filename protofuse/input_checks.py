"""Checks that tell the user when inputs are probably not what the bank expects.

Two mistakes pass silently otherwise: flattened images declared as plain features (no
``[data] image_shape``: the weaker MLP path, no augmentation) and new inputs scaled unlike the
queries the bank was trained on (0-255 pixels against [0, 1] queries). Both are hints, not
errors: a table can have a square number of columns, and a shift can be real.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

MIN_IMAGE_SIDE = 4  # the spec's own lower bound on an image side
# A new input may stray this far outside the queries' range (as a fraction of that range) before
# a warning: real data wanders a little, a rescaling is off by a factor.
RANGE_SLACK = 0.5


class InputRangeWarning(UserWarning):
    """New inputs span a range unlike the queries the bank was trained on."""


def input_range(x: np.ndarray) -> list[float]:
    """[min, max] over every feature of the query pool: what new inputs are compared with."""
    return [float(np.min(x)), float(np.max(x))]


def image_hint(x: np.ndarray) -> str | None:
    """A sentence naming ``image_shape`` when inputs look like flattened images: a width that is
    a square (greyscale) or three times a square (RGB), and values in [0, 1] or in [0, 255]."""
    shape = _square_image_shape(x.shape[1])
    if shape is None:
        return None
    lo, hi = input_range(x)
    if lo < 0 or not (hi <= 1.0 or (hi <= 255.0 and _integral(x))):
        return None
    scale = "[0, 1]" if hi <= 1.0 else "[0, 255]"
    product = " x ".join(str(v) for v in shape)
    kind = "images" if len(shape) == 2 else "RGB images (channels last)"
    return (
        f"the inputs have {x.shape[1]} = {product} features with values in {scale}: if they are "
        f"flattened {kind}, "
        f"set `[data] image_shape = [{', '.join(str(v) for v in shape)}]` in the spec (a "
        "convolutional encoder and image augmentation; "
        "on MNIST about 8 points better than the flat path); if they are not, ignore this"
    )


def _square_image_shape(d: int) -> list[int] | None:
    """[side, side] if d is a square, [side, side, 3] if d is three squares; else None."""
    for channels in (1, 3):
        side = math.isqrt(d // channels)
        if d % channels == 0 and side * side * channels == d and side >= MIN_IMAGE_SIDE:
            return [side, side] if channels == 1 else [side, side, 3]
    return None


def warn_if_out_of_range(x: np.ndarray, expected: list[float] | None, what: str) -> None:
    """Warn when ``x`` reaches well outside the queries' [min, max] (e.g. 0-255 against [0, 1])."""
    if not expected or x.size == 0:
        return
    lo, hi = expected
    span = max(hi - lo, 1e-12)
    got_lo, got_hi = input_range(x)
    if got_lo < lo - RANGE_SLACK * span or got_hi > hi + RANGE_SLACK * span:
        warnings.warn(
            f"{what} span [{got_lo:.3g}, {got_hi:.3g}] but the bank's queries spanned [{lo:.3g}, "
            f"{hi:.3g}]: "
            "scale and preprocess them the way the experts' queries were, or predictions will be "
            "poor",
            InputRangeWarning,
            stacklevel=3,
        )


def _integral(x: np.ndarray) -> bool:
    if np.issubdtype(x.dtype, np.integer):
        return True
    sample = x.reshape(-1)[:100_000]
    return bool(np.all(sample == np.round(sample)))
