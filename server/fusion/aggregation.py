"""How the clients' shared weights are combined: pure numpy on plain arrays, plus the conversion
to and from Flower's ArrayRecord.

Encoder weights are a weighted mean over all clients. A prototype row and its bias (the arrays of
``ROW_KEYS``, one row per label of the vocabulary) are averaged over the clients whose expert
covers that label (``rowwise``), or over all clients (``fedavg``). An update is checked against
the arrays that were sent before it is averaged; new labels get new rows, old rows never move.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from protofuse.protocol import federation as wire

ROW_KEYS = ("prototypes", "bias")  # arrays with one row per label of the vocabulary


def weighted_mean(
    updates: list[dict[str, np.ndarray]],
    weights: np.ndarray,
    covers: np.ndarray,
    sent: dict[str, np.ndarray],
    rowwise: bool,
) -> dict[str, np.ndarray]:
    """Weighted means of the clients' arrays, cast back to the dtypes that were sent.

    updates: one dict of arrays per client (the names and shapes of ``sent``); weights (K,) with a
    positive sum; covers (K, C) 0/1, client k's expert covers label c; rowwise: ``ROW_KEYS``
    averaged over the covering clients only (rows nobody covers keep what was sent). Integer
    arrays (batch-norm counters) are rounded."""
    out: dict[str, np.ndarray] = {}
    for key, reference in sent.items():
        stack = np.stack([u[key] for u in updates]).astype(np.float64)
        if key in ROW_KEYS and rowwise:
            mean = rowwise_mean(stack, weights, covers, reference)
        else:
            mean = np.tensordot(weights / weights.sum(), stack, axes=1)
        out[key] = (
            mean.astype(reference.dtype)
            if np.issubdtype(reference.dtype, np.floating)
            else np.rint(mean).astype(reference.dtype)
        )
    return out


def rowwise_mean(
    stack: np.ndarray, weights: np.ndarray, covers: np.ndarray, reference: np.ndarray
) -> np.ndarray:
    """Row c averaged over the clients covering label c; rows nobody covers keep ``reference``.

    stack (K, C, ...) the clients' arrays; weights (K,); covers (K, C) 0/1; reference (C, ...).
    """
    w = weights[:, None] * covers  # (K, C)
    total = w.sum(0)  # (C,)
    extra = (1,) * (stack.ndim - 2)
    mean = (w.reshape(w.shape + extra) * stack).sum(0) / np.maximum(total, 1e-12).reshape(
        total.shape + extra
    )
    return np.where((total > 0).reshape(total.shape + extra), mean, reference.astype(np.float64))


def check_update(record: ArrayRecord, sent: dict[str, np.ndarray]) -> None:
    """A client's shared weights must be the arrays it was sent: same names, shapes and dtypes,
    finite values; anything else is refused (WireError naming the array) before averaging."""
    names = set(record.keys())
    if names != set(sent):
        raise wire.WireError(
            f"arrays: got {sorted(names ^ set(sent))[:5]} that do not match the shared weights sent"
        )
    for key, reference in sent.items():
        value = record[key].numpy()
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise wire.WireError(
                f"arrays.{key}: {value.dtype} {value.shape}, the shared weights are "
                f"{reference.dtype} {reference.shape}"
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise wire.WireError(
                f"arrays.{key}: holds NaN or infinite values (a diverged local fit)"
            )


def extend_rows(arrays: dict[str, np.ndarray], n_new: int, seed: int) -> dict[str, np.ndarray]:
    """Append rows for new labels: prototypes drawn like the model's initial rows, biases 0."""
    out = dict(arrays)
    protos = arrays["prototypes"]
    rng = np.random.default_rng(seed)
    out["prototypes"] = np.concatenate(
        [
            protos,
            (rng.standard_normal((n_new, protos.shape[1])) / np.sqrt(protos.shape[1])).astype(
                protos.dtype
            ),
        ]
    )
    out["bias"] = np.concatenate([arrays["bias"], np.zeros(n_new, dtype=arrays["bias"].dtype)])
    return out


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
