"""One round's update under client-level differential privacy (``[privacy] mode = "dp"``).

DP-FedAvg with fixed clipping, row-wise: each client's change to the float arrays it was sent is
clipped to the L2 norm ``clip`` over all its arrays together; the clipped changes are summed
(an array of ``ROW_KEYS`` row by row, over the clients covering the row's label); Gaussian noise
of standard deviation ``noise_multiplier * clip`` is added to every coordinate of every sum; each
sum is divided by a public count: the clients admitted to the run, or for a row the admitted
clients that declared its label (at least 1).

Why that is a Gaussian mechanism of sensitivity ``clip``: adding or removing one client changes
the concatenation of all the sums by its own clipped change, whose norm is at most ``clip``,
whichever rows it covers. The counts do not depend on any client's data (they are fixed when the
round is planned), so dividing by them is post-processing, and so is adding the result to the
weights that were sent. A client that does not reply adds nothing; the denominators stay.

Shapes: K clients, C labels; ``covers`` (K, C) is 0/1, ``coverage`` (C,) the public count of
admitted clients per label, ``n_clients`` the admitted clients.
"""

from __future__ import annotations

import numpy as np

from .defences import ROW_KEYS, Deltas


def clip_to_norm(deltas: Deltas, clip: float) -> Deltas:
    """Each client's change scaled down to L2 norm at most ``clip`` over all its arrays."""
    out = []
    for d in deltas:
        norm = float(np.sqrt(sum(float(np.sum(v * v)) for v in d.values())))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        out.append({k: v * scale for k, v in d.items()})
    return out


def noisy_mean(
    deltas: Deltas,
    covers: np.ndarray,
    coverage: np.ndarray,
    n_clients: int,
    clip: float,
    noise_multiplier: float,
    rowwise: bool,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """The round's step: clipped sums plus noise, over public counts (module docstring)."""
    clipped = clip_to_norm(deltas, clip)
    std = noise_multiplier * clip
    step: dict[str, np.ndarray] = {}
    for key in clipped[0] if clipped else ():
        stack = np.stack([d[key] for d in clipped])  # (K, ...)
        if key in ROW_KEYS and rowwise:
            # (K, C, ...) summed over each row's coverers: (C, ...)
            shape = (-1,) + (1,) * (stack.ndim - 2)
            total = (stack * covers.reshape(covers.shape + shape[1:])).sum(0)
            # A row no admitted client covers gets no change and so needs no noise (public).
            noise = rng.normal(0.0, std, size=total.shape) * (coverage > 0).reshape(shape)
            step[key] = (total + noise) / np.maximum(coverage, 1).reshape(shape)
        else:
            total = stack.sum(0)
            step[key] = (total + rng.normal(0.0, std, size=total.shape)) / max(n_clients, 1)
    return step
