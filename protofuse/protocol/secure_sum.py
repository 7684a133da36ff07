"""What a client masks in a secure-aggregation round (``[privacy] mode = "secagg"``), and how the
server reads the round's step back from the sum.

Flower's SecAgg+ (``secaggplus_mod`` on the client, ``SecAggPlusWorkflow`` on the server) sums
one list of float arrays per client, each value clipped to ``[-CLIP_RANGE, CLIP_RANGE]`` and
quantized, and hands the server their mean (it divides by the weights the clients state; every
protofuse client states 1). So a client sends, in this order:

- its change to every float array it was sent, by sorted name; an array of ``ROW_KEYS`` (one row
  per label) with the rows of labels its expert does not cover set to 0 when rows are averaged
  over their coverers (``rowwise``). Integer arrays are not sent: the server keeps its own;
- one canary, ``CLIP_RANGE`` itself. An honest sum's mean canary is exactly ``CLIP_RANGE``; a
  client that states a weight above 1 through Flower's mod (to outweigh the others) has its own
  canary clipped, so the mean comes out lower and the round's sum is refused (``step``).

What this cannot catch: a client that forges its masked integers instead of running Flower's mod
can add anything to the sum (modulo 2**32), canary included; the server, which sees only the sum,
refuses a mean (or a row's mean over its coverers) outside the clipping range, but a forgery inside
it passes. A client that states weight 0 leaves its vector out of Flower's mean while the server
still counts it among the K clients summed: every row's step is scaled by K / (K - 1) (at most
1.5, a round needs 3 clients); the canary cannot see it. Secure aggregation
protects each client from the server, not the federation from a hostile client
(docs/threat-model.md).

The server knows who replied and which labels each declared, so a row's count of coverers is
public and never travels in the masked vector: a client cannot inflate it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from protofuse.families.discriminative import ROW_KEYS

CLIP_RANGE = 8.0  # Flower's default clipping range (SecAggPlusWorkflow)
QUANTIZATION_RANGE = 2**22  # Flower's default: 16 / 2**22 ~ 3.8e-6 per value and client
# Each value of the mean is off by at most one quantization step per client; the canary must be
# within that, and a client stating weight 2 moves it by CLIP_RANGE / (n + 1), far more.
CANARY_TOLERANCE = 1e-3


class SecureSumError(ValueError):
    """The round's secure sum cannot be used (a client misstated its weight, or a wrong shape)."""


def float_keys(sent: Mapping[str, np.ndarray]) -> list[str]:
    """The arrays a client masks, in the order it masks them."""
    return sorted(k for k, v in sent.items() if np.issubdtype(v.dtype, np.floating))


def layout(sent: Mapping[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The shapes of the masked vector's arrays (the server checks every reply against them)."""
    return [tuple(sent[k].shape) for k in float_keys(sent)] + [(1,)]


def masked_vector(
    sent: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    covers: np.ndarray,
    rowwise: bool,
) -> list[np.ndarray]:
    """A client's vector: its change to each float array (rows it does not cover zeroed when
    ``rowwise``; ``covers`` (C,) is 0/1 over the vocabulary), then the canary (float64)."""
    out = []
    for key in float_keys(sent):
        if key not in trained or trained[key].shape != sent[key].shape:
            raise SecureSumError(f"arrays.{key}: missing or reshaped in the trained weights")
        delta = np.asarray(trained[key], np.float64) - np.asarray(sent[key], np.float64)
        if key in ROW_KEYS and rowwise:
            delta = delta * covers.reshape((-1,) + (1,) * (delta.ndim - 1))
        out.append(delta)
    return [*out, np.array([CLIP_RANGE])]


def step(
    mean: list[np.ndarray],
    sent: Mapping[str, np.ndarray],
    covers: np.ndarray,
    rowwise: bool,
) -> dict[str, np.ndarray]:
    """The round's step from the mean of the ``K`` replying clients' vectors (``covers`` (K, C)
    is what each declared): an array's mean change, or a row's sum over its coverers divided by
    their number (a row nobody covers does not move)."""
    shapes = layout(sent)
    if [tuple(np.shape(a)) for a in mean] != shapes:
        raise SecureSumError(
            f"the secure sum has shapes {[np.shape(a) for a in mean]}, not {shapes}"
        )
    canary = float(mean[-1][0])
    if not abs(canary - CLIP_RANGE) <= CANARY_TOLERANCE:
        raise SecureSumError(
            f"the secure sum's canary is {canary:.6f}, not {CLIP_RANGE}: a client stated a weight "
            "above 1 to outweigh the others; this round's sum is not used"
        )
    k = len(covers)
    coverage = covers.sum(0)  # (C,) clients that replied and declared the label
    out = {}
    for key, m in zip(float_keys(sent), mean, strict=False):
        # A mean of values clipped to the range lies in it: anything else was forged.
        if not (np.isfinite(m).all() and np.abs(m).max(initial=0.0) <= CLIP_RANGE):
            raise SecureSumError(
                f"the secure sum of {key} leaves the clipping range [-{CLIP_RANGE}, {CLIP_RANGE}]: "
                "a client forged its masked vector; this round's sum is not used"
            )
        if key in ROW_KEYS and rowwise:
            shape = (-1,) + (1,) * (m.ndim - 1)
            out[key] = (
                m * k / np.maximum(coverage, 1).reshape(shape) * (coverage > 0).reshape(shape)
            )
            # A row's mean over its coverers lies in the range too; a forged vector can push the
            # sum of a row few clients cover k / coverage times further than the whole mean.
            if np.abs(out[key]).max(initial=0.0) > CLIP_RANGE:
                raise SecureSumError(
                    f"the secure sum of {key} leaves the clipping range on a row's coverers: a "
                    "client forged its masked vector; this round's sum is not used"
                )
        else:
            out[key] = np.asarray(m, np.float64)
    return out
