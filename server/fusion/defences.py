"""What one client can do to a round, bounded: pure numpy on the clients' deltas.

Nothing a client says about itself sets its influence. Its reported example count is capped by
the queries it declared and then by ``max_weight_ratio`` times the round's median count; its
update (the change it made to the weights it was sent) is clipped to ``clip_factor`` times the
round's median norm; the combination is a weighted mean, a coordinate-wise median or a trimmed
mean (Flower's FedAvg, FedMedian and FedTrimmedAvg, here row-wise: a prototype row is combined
over the clients whose expert covers its label), or the weighted mean of the clients Multi-Krum
keeps (Flower's Krum: each client scored by the summed squared distances to its n - f - 2
nearest peers, the n - f best kept; the shared weights choose once over all their arrays, each
prototype row among the clients covering it); and each client's *evidence* is how well its
update points where the other clients' updates point (the cosine between its delta and the
coordinate-wise median of the others', on the shared weights and on the rows it shares with
them). A client cannot raise its evidence alone: the reference is made of the others' updates.

Shapes: K clients, C labels of the vocabulary; ``covers`` (K, C) is 0/1, client k's expert covers
label c. Arrays named in ``ROW_KEYS`` have one row per label (first axis C).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ROW_KEYS = ("prototypes", "bias")  # arrays with one row per label of the vocabulary

Combine = Literal["mean", "median", "trimmed_mean", "krum"]
Deltas = list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class Bounds:
    """The round's limits on each client (``[federation]`` settings)."""

    clip_factor: float | None = 2.0  # a delta's norm at most this times the median; None: no clip
    max_weight_ratio: float | None = 2.0  # a weight at most this times the median; None: no cap
    combine: Combine = "mean"
    trim: float = 0.2  # trimmed_mean: the fraction cut at each end of every coordinate
    assumed_hostile: int = 1  # krum: f, the hostile clients a round is assumed to hold


def example_weights(reported: np.ndarray, declared: np.ndarray, ratio: float | None) -> np.ndarray:
    """(K,) averaging weights from the example counts clients report.

    A count is never negative and never above the queries the client declared when it joined;
    then no client weighs more than ``ratio`` times the median client, so a large (or lying)
    count buys at most that much influence. All-zero counts give equal weights."""
    n = np.clip(reported.astype(np.float64), 0.0, declared.astype(np.float64))
    if ratio is not None and len(n):
        n = np.minimum(n, ratio * float(np.median(n)))
    return n if n.sum() > 0 else np.ones(len(n))


VARIANCE_SUFFIX = "running_var"  # batch-norm running variances: never negative


def within_domain(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Arrays whose values have a domain, held to it after combining: a batch norm's running
    variance is never negative (a combination of bounded hostile updates can push a coordinate
    below zero, and every client's forward pass would then be NaN: measured with two scaled
    attackers of seven, `make bench-hostile`)."""
    return {
        k: np.maximum(v, 0).astype(v.dtype) if k.endswith(VARIANCE_SUFFIX) else v
        for k, v in arrays.items()
    }


def deltas_of(updates: list[dict[str, np.ndarray]], sent: dict[str, np.ndarray]) -> Deltas:
    """Each client's change to the float arrays it was sent (float64). Integer arrays (batch-norm
    counters) are left out: they are not averaged, the server keeps what it sent."""
    floats = [k for k, v in sent.items() if np.issubdtype(v.dtype, np.floating)]
    return [
        {k: u[k].astype(np.float64) - sent[k].astype(np.float64) for k in floats} for u in updates
    ]


def clip_to_median_norm(deltas: Deltas, factor: float | None) -> tuple[Deltas, np.ndarray]:
    """Deltas scaled down to at most ``factor`` times the round's median norm; returns the
    clipped deltas and each client's scale (1.0 where nothing was cut).

    A scaled-up or float32-maximum update is cut to an honest size; an honest round (norms near
    the median) is left as it is."""
    norms = np.array([np.sqrt(sum(float(np.sum(v * v)) for v in d.values())) for d in deltas])
    if factor is None or not len(deltas):
        return deltas, np.ones(len(deltas))
    limit = factor * float(np.median(norms))
    scale = np.where(norms > limit, limit / np.maximum(norms, 1e-300), 1.0)
    return [{k: v * s for k, v in d.items()} for d, s in zip(deltas, scale, strict=True)], scale


def combine(
    deltas: Deltas, weights: np.ndarray, covers: np.ndarray, bounds: Bounds, rowwise: bool
) -> dict[str, np.ndarray]:
    """One delta from the clients': per array, over all clients, or (a row of ``ROW_KEYS`` when
    ``rowwise``) over the clients covering its label; a row nobody covers does not move."""
    out: dict[str, np.ndarray] = {}
    shared = [k for k in deltas[0] if not (k in ROW_KEYS and rowwise)]
    if bounds.combine == "krum" and shared:  # one choice of clients for all shared arrays
        flat = np.stack([np.concatenate([d[k].ravel() for k in shared]) for d in deltas])
        weights = weights * krum_keep(flat, bounds.assumed_hostile)
    for key in deltas[0]:
        stack = np.stack([d[key] for d in deltas])  # (K, ...)
        if key in ROW_KEYS and rowwise:
            out[key] = np.stack(
                [
                    _combine(stack[covers[:, c] > 0, c], weights[covers[:, c] > 0], bounds)
                    if covers[:, c].any()
                    else np.zeros(stack.shape[2:])
                    for c in range(stack.shape[1])
                ]
            )
        else:
            out[key] = _combine(stack, weights, bounds, chosen=bounds.combine == "krum")
    return out


def krum_keep(flat: np.ndarray, f: int) -> np.ndarray:
    """(K,) 0/1: the clients Multi-Krum keeps from ``flat`` (K, D) updates, assuming ``f`` hostile.

    Each client's score is the sum of squared distances to its n - f - 2 nearest other clients
    (at least one); the n - f with the lowest scores are kept (at least one). An update far from
    the rest (scaled, flipped, noise) has a high score and is dropped."""
    n = len(flat)
    if n <= 2:  # nothing to compare with: every client kept
        return np.ones(n)
    squared = np.sum(flat * flat, axis=1)
    dist = np.maximum(squared[:, None] + squared[None, :] - 2.0 * flat @ flat.T, 0.0)  # (K, K)
    np.fill_diagonal(dist, np.inf)
    neighbours = max(1, n - f - 2)
    scores = np.sort(dist, axis=1)[:, :neighbours].sum(axis=1)
    keep = np.zeros(n)
    keep[np.argsort(scores, kind="stable")[: max(1, n - f)]] = 1.0
    return keep


def _combine(
    stack: np.ndarray, weights: np.ndarray, bounds: Bounds, chosen: bool = False
) -> np.ndarray:
    """stack (K, ...) -> (...): the weighted mean, or the median / trimmed mean of every
    coordinate (unweighted, as Flower's FedMedian and FedTrimmedAvg), or (krum) the weighted mean
    of the clients Multi-Krum keeps (``chosen``: the weights already hold that choice). Zero
    weight in all (every client here distrusted): no step, rather than 0 / 0."""
    if bounds.combine == "krum" and not chosen:
        weights = weights * krum_keep(stack.reshape(len(stack), -1), bounds.assumed_hostile)
    if bounds.combine == "median":
        return np.median(stack, axis=0)
    if bounds.combine == "trimmed_mean":
        cut = int(bounds.trim * len(stack))
        ordered = np.sort(stack, axis=0)
        return ordered[cut : len(stack) - cut].mean(axis=0)
    total = float(weights.sum())
    if total <= 0:  # every client here distrusted (a row only they cover): no step
        return np.zeros(stack.shape[1:])
    return np.tensordot(weights / total, stack, axes=1)


def evidence(
    deltas: Deltas, covers: np.ndarray, rowwise: bool, scale: np.ndarray | None = None
) -> np.ndarray:
    """(K,) in [-1, 1]: the cosine between each client's delta and the coordinate-wise median of
    the other clients' deltas, over the shared arrays and the rows it shares with at least one
    other client (each row against its covering peers' median); times ``scale``, the share of its
    update clipping kept (1.0 where nothing was cut): an update that had to be cut to the round's
    bound points the right way at best, and earns only that share of an honest client's
    evidence. NaN for a client with nothing to compare (alone, or an all-zero delta)."""
    score = evidence_parts(deltas, covers, rowwise)[2]
    return score if scale is None else score * np.minimum(scale, 1.0)


def evidence_parts(
    deltas: Deltas, covers: np.ndarray, rowwise: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shared, rows, both), each (K,): the cosine between a client's delta and the
    coordinate-wise median of the others', over the shared arrays, over the rows it shares with
    peers (each row against its covering peers' median), and over both together (``evidence``).
    The parts go to the round's history: the rows alone are too noisy to judge a client by
    (honest clients' rows barely move once they agree; measured with `make bench-hostile`).
    NaN where there is nothing to compare."""
    k_clients = len(deltas)
    shared, rows, both = (np.full(k_clients, np.nan) for _ in range(3))
    if k_clients < 2:
        return shared, rows, both
    for k in range(k_clients):
        own: dict[bool, list[np.ndarray]] = {False: [], True: []}
        reference: dict[bool, list[np.ndarray]] = {False: [], True: []}
        others = [j for j in range(k_clients) if j != k]
        for key in deltas[k]:
            stack = np.stack([deltas[j][key] for j in others])
            if key in ROW_KEYS and rowwise:
                for c in np.flatnonzero(covers[k] > 0):
                    peers = [i for i, j in enumerate(others) if covers[j, c] > 0]
                    if peers:
                        own[True].append(deltas[k][key][c].ravel())
                        reference[True].append(np.median(stack[peers, c], axis=0).ravel())
            else:
                own[False].append(deltas[k][key].ravel())
                reference[False].append(np.median(stack, axis=0).ravel())
        shared[k] = _cosine(own[False], reference[False])
        rows[k] = _cosine(own[True], reference[True])
        both[k] = _cosine(own[False] + own[True], reference[False] + reference[True])
    return shared, rows, both


def _cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if not a:
        return float("nan")
    u, v = np.concatenate(a), np.concatenate(b)
    denominator = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(u @ v) / denominator if denominator > 0 else float("nan")


def evidence_trust(scores: dict[str, float]) -> dict[str, float]:
    """Trust in [0, 1] from accumulated evidence: relative to the federation's median score, with
    half the median already full trust (honest clients on different tasks point in different
    directions; an honest one is rarely below half the median, a sign-flipped or noise update is
    near or below 0). Without a positive median (no agreement at all) everyone keeps full trust."""
    measured = {k: v for k, v in scores.items() if np.isfinite(v)}
    if not measured:
        return {}
    median = float(np.median(list(measured.values())))
    if median <= 0:
        return dict.fromkeys(measured, 1.0)
    return {k: float(np.clip(v / (0.5 * median), 0.0, 1.0)) for k, v in measured.items()}
