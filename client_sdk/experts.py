"""The black-box expert protocol, adapters for common model kinds, and validated querying."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

NEGATIVE_TOLERANCE = -1e-6
ROW_SUM_TOLERANCE = 1e-3


@runtime_checkable
class Expert(Protocol):
    """A black box mapping inputs (n, d) to probabilities over its own labels (n, len(labels))."""

    # Read-only here, so that an expert may keep its labels in any sequence (the adapters keep a
    # tuple); a plain attribute satisfies it.
    @property
    def labels(self) -> Sequence[str]: ...  # label names, in the order of the output columns

    def predict_proba(self, x: np.ndarray) -> np.ndarray: ...


class ExpertOutputError(ValueError):
    """An expert answered with something that is not a probability table over its labels."""


def _label_tuple(labels: Sequence[Any] | None, who: str) -> tuple[str, ...]:
    if labels is None:
        raise TypeError(
            f"{who} needs labels: pass the label names in the order of its output columns"
        )
    if isinstance(labels, str):
        raise TypeError(
            f"{who}: labels is the string {labels!r}; pass a list of label names, e.g. ['0', '1']"
        )
    return tuple(str(label) for label in labels)


class CallableExpert:
    """A plain function ``fn(x) -> probabilities`` with the label names of its columns."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], labels: Sequence[str]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableExpert needs a callable, got {type(fn).__name__}")
        self.fn = fn
        self.labels = _label_tuple(labels, "CallableExpert")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(x))


class SklearnExpert:
    """A fitted scikit-learn classifier; labels default to its ``classes_`` as strings."""

    def __init__(self, estimator: Any, labels: Sequence[str] | None = None) -> None:
        if not hasattr(estimator, "predict_proba"):
            raise TypeError(
                f"{type(estimator).__name__} has no predict_proba; use a probabilistic classifier "
                "(e.g. SVC(probability=True)) or wrap it in CalibratedClassifierCV"
            )
        if not hasattr(estimator, "classes_"):
            raise TypeError(
                f"{type(estimator).__name__} has no classes_: fit it before wrapping it as an "
                "expert"
            )
        classes = list(estimator.classes_)
        if labels is None:
            self.labels = tuple(str(c) for c in classes)
        else:
            self.labels = _label_tuple(labels, "SklearnExpert")
            if len(self.labels) != len(classes):
                raise ValueError(
                    f"labels {list(self.labels)} has {len(self.labels)} names but the estimator "
                    f"has {len(classes)} classes {classes}; give one name per class, in the order "
                    "of classes_"
                )
            own = tuple(str(c) for c in classes)
            # Renaming classes is allowed (e.g. 0/1 -> "cat"/"dog"); reordering or mixing names
            # the estimator already uses would silently mislabel its output columns.
            if self.labels != own and set(self.labels) & set(own):
                raise ValueError(
                    f"labels {list(self.labels)} do not match the estimator's classes_ "
                    f"{list(own)}; list them in the order of classes_ (or give entirely new names "
                    "to rename them)"
                )
        self.estimator = estimator

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator.predict_proba(x))


class TorchExpert:
    """A torch module mapping (n, d) float32 inputs to logits (softmaxed here) or probabilities."""

    def __init__(self, module: Any, labels: Sequence[str], outputs: str = "logits") -> None:
        import torch

        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchExpert needs a torch.nn.Module, got {type(module).__name__}")
        if outputs not in ("logits", "probs"):
            raise ValueError(
                f"outputs is {outputs!r}; use 'logits' (softmax applied here) or 'probs' (module "
                "already returns probabilities)"
            )
        self.module = module
        self.labels = _label_tuple(labels, "TorchExpert")
        self.outputs = outputs

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        self.module.eval()  # batch norm and dropout must not behave as in training
        param = next(self.module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            out = self.module(torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device))
            if self.outputs == "logits":
                out = torch.softmax(out, dim=-1)
        return out.detach().cpu().numpy()


def _is_expert(obj: Any) -> bool:
    # Protocol isinstance only checks the attributes exist; a callable predict_proba is the point.
    return isinstance(obj, Expert) and callable(getattr(obj, "predict_proba", None))


def as_expert(obj: Any, labels: Sequence[str] | None = None) -> Expert:
    """Wrap a model as an Expert: an Expert, a fitted sklearn classifier, a torch module or a
    function returning probabilities (the last two need ``labels``)."""
    import torch

    if _is_expert(obj):
        if labels is not None and tuple(str(label) for label in labels) != tuple(
            str(label) for label in obj.labels
        ):
            raise ValueError(
                f"the expert's own labels {list(obj.labels)} differ from the labels given "
                f"{list(labels)}; list them in the order of its output columns"
            )
        return obj
    if hasattr(obj, "predict_proba") and hasattr(obj, "classes_"):
        return SklearnExpert(obj, labels)
    if isinstance(obj, torch.nn.Module):
        return TorchExpert(obj, _label_tuple(labels, f"torch module {type(obj).__name__}"))
    if hasattr(obj, "predict_proba") and callable(obj.predict_proba) and not isinstance(obj, type):
        if labels is None and type(obj).__module__.startswith("sklearn"):
            raise TypeError(
                f"{type(obj).__name__} has no classes_: fit it before wrapping it as an expert"
            )
        return CallableExpert(
            obj.predict_proba,
            _label_tuple(labels, f"{type(obj).__name__} (has predict_proba but no classes_)"),
        )
    if callable(obj) and not isinstance(obj, type):
        return CallableExpert(
            obj, _label_tuple(labels, f"callable {getattr(obj, '__name__', type(obj).__name__)}")
        )
    raise TypeError(
        f"cannot use {type(obj).__name__} as an expert; accepted: an object with .labels and "
        ".predict_proba, "
        "a fitted scikit-learn classifier (predict_proba and classes_), a torch.nn.Module (with "
        "labels), "
        "or a function x -> probabilities (with labels)"
    )


def _check_labels(labels: Sequence[str], name: str) -> int:
    labels = list(labels)
    if not labels:
        raise ExpertOutputError(
            f"expert {name!r} has no labels; give the label names of its output columns"
        )
    seen, dup = set(), []
    for label in labels:
        if label in seen:
            dup.append(label)
        seen.add(label)
    if dup:
        raise ExpertOutputError(
            f"expert {name!r} lists labels {sorted(set(map(str, dup)))} more than once in "
            f"{labels}; each output column needs its own label name"
        )
    return len(labels)


def _validate(out: Any, n: int, width: int, name: str, start: int) -> np.ndarray:
    """One batch's answer as float64 (n, width) probabilities, or an error naming the expert."""
    try:
        arr = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ExpertOutputError(
            f"expert {name!r} returned {type(out).__name__} that is not a numeric array ({err}); "
            f"predict_proba must return an (n, {width}) array of probabilities"
        ) from None
    if arr.ndim != 2:
        raise ExpertOutputError(
            f"expert {name!r} returned a {arr.ndim}-D array of shape {arr.shape}, expected 2-D "
            f"({n}, {width}); return one row of probabilities per input, not class indices"
        )
    if arr.shape != (n, width):
        raise ExpertOutputError(
            f"expert {name!r} returned shape {arr.shape}, expected ({n}, {width}): one row per "
            "input, one column per label; check the labels listed for it"
        )
    finite = np.isfinite(arr)
    if not finite.all():
        row = start + int(np.argwhere(~finite)[0, 0])
        raise ExpertOutputError(
            f"expert {name!r} returned NaN or infinity (first in row {row}); return finite "
            "probabilities, e.g. guard divisions and softmax with max subtraction"
        )
    if (arr < NEGATIVE_TOLERANCE).any():
        row = start + int(np.argwhere(arr < NEGATIVE_TOLERANCE)[0, 0])
        raise ExpertOutputError(
            f"expert {name!r} returned negative values (min {arr.min():.3g}, first in row {row}); "
            "return probabilities, not logits or scores (apply a softmax)"
        )
    sums = arr.sum(axis=1)
    off = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if off.any():
        row = int(np.argmax(off))
        raise ExpertOutputError(
            f"expert {name!r} returned rows that do not sum to 1 (row {start + row} sums to "
            f"{sums[row]:.4g}); return normalized probabilities over its {width} labels"
        )
    # Within tolerance: make rows exact so later logs and divisions see true distributions.
    arr = np.clip(arr, 0.0, None)
    return arr / arr.sum(axis=1, keepdims=True)


def query_expert(expert: Expert, x: np.ndarray, name: str, batch_size: int = 4096) -> np.ndarray:
    """Ask the expert about every row of x in batches; return validated float32 (n, len(labels))."""
    width = _check_labels(expert.labels, name)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"queries for expert {name!r} have shape {x.shape}, expected (n, d): one flattened "
            "input per row"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; use a positive number of rows per call")
    n = len(x)
    result = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, batch_size):
        batch = x[start : start + batch_size]
        try:
            out = expert.predict_proba(batch)
        except Exception as err:  # a black box may fail in any way; name it and its input
            raise ExpertOutputError(
                f"expert {name!r} failed on queries of shape {batch.shape} ({type(err).__name__}: "
                f"{err}); check that its queries have the width it was trained on"
            ) from err
        result[start : start + len(batch)] = _validate(out, len(batch), width, name, start)
    return result
