"""The shared weights as the server handles them: each update checked against the arrays that
were sent before anything is combined (``defences`` combines them), rows appended for new labels
(old rows never move), and the conversion to Flower's ArrayRecord.

A prototype row and its bias (the arrays of ``ROW_KEYS``, one row per label of the vocabulary)
are combined over the clients whose expert covers that label (``rowwise``), or over all clients
(``fedavg``); every other array over all clients.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from protofuse.protocol import federation as wire

from .defences import ROW_KEYS

__all__ = ["ROW_KEYS", "check_update", "extend_rows", "to_record"]


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
