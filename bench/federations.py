"""Build demo and benchmark federations: heterogeneous experts over overlapping class subsets."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.datasets import Dataset, load_dataset, make_splits, task_subset
from client_sdk.experts import CallableExpert, Expert, TorchExpert

KINDS = ("logreg", "svm", "forest", "knn", "mlp")


@dataclass(frozen=True)
class ExpertRecipe:
    """How to train one expert. The degradation fields make deliberately bad participants."""

    name: str
    kind: str  # one of KINDS
    classes: tuple[str, ...]  # label names it is trained on, in the order of its output columns
    label_noise: float = 0.0  # fraction of training labels replaced by a different class at random
    confuse: float = 0.0  # fraction of the first class's training examples labelled as the second
    sharpen: float = 1.0  # output softmax(sharpen * log p): > 1 makes the expert overconfident

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"recipe {self.name!r}: kind is {self.kind!r}; use one of {KINDS}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(
                f"recipe {self.name!r}: classes {self.classes} must name at least 2 distinct labels"
            )
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(
                f"recipe {self.name!r}: label_noise is {self.label_noise}; use a fraction in [0, 1)"
            )
        # confuse = 1 would remove the first class from training, and with it an output column.
        if not 0.0 <= self.confuse < 1.0:
            raise ValueError(
                f"recipe {self.name!r}: confuse is {self.confuse}; use a fraction in [0, 1)"
            )
        if self.sharpen <= 0:
            raise ValueError(
                f"recipe {self.name!r}: sharpen is {self.sharpen}; use a positive factor (1 leaves "
                "outputs unchanged)"
            )


def _digits(*ds: int) -> tuple[str, ...]:
    return tuple(str(d) for d in ds)


# A ring of overlapping pairs: every digit is covered by exactly two experts, no expert by more
# than four classes, and the overlaps tie all labels into one consistent vocabulary.
DEFAULT_RECIPES: tuple[ExpertRecipe, ...] = (
    ExpertRecipe("logreg", "logreg", _digits(0, 1, 2, 3)),
    ExpertRecipe("svm", "svm", _digits(2, 3, 4, 5)),
    ExpertRecipe("forest", "forest", _digits(4, 5, 6, 7)),
    ExpertRecipe("knn", "knn", _digits(6, 7, 8, 9)),
    ExpertRecipe("mlp", "mlp", _digits(8, 9, 0, 1)),
)

# Sparse coverage: three classes each, neighbours sharing one; half the digits are covered once.
SPARSE_RECIPES: tuple[ExpertRecipe, ...] = (
    ExpertRecipe("s_logreg", "logreg", _digits(0, 1, 2)),
    ExpertRecipe("s_svm", "svm", _digits(2, 3, 4)),
    ExpertRecipe("s_forest", "forest", _digits(4, 5, 6)),
    ExpertRecipe("s_knn", "knn", _digits(6, 7, 8)),
    ExpertRecipe("s_mlp", "mlp", _digits(8, 9, 0)),
)


def _ring_of_triples(labels: tuple[str, ...]) -> tuple[ExpertRecipe, ...]:
    """One expert per label, trained on it and its next two around the ring, the kinds taken in
    turn: every label is covered by three experts and neighbours share two labels (as the digits'
    ring), and exactly the pairs three apart around the ring have no common expert."""
    recipes = []
    for i in range(len(labels)):
        kind = KINDS[i % len(KINDS)]
        name = kind if i < len(KINDS) else f"{kind}-{i // len(KINDS) + 1}"
        recipes.append(
            ExpertRecipe(name, kind, tuple(labels[(i + j) % len(labels)] for j in range(3)))
        )
    return tuple(recipes)


# The 7 classes of the image-segmentation table (bench.datasets.load_segment), in label order.
SEGMENT_RECIPES: tuple[ExpertRecipe, ...] = _ring_of_triples(
    ("brickface", "cement", "foliage", "grass", "path", "sky", "window")
)


def recipes_for(dataset: str) -> tuple[ExpertRecipe, ...]:
    """The benchmark's federation for a dataset: the digits' ring, or the table's own."""
    return SEGMENT_RECIPES if dataset == "segment" else DEFAULT_RECIPES


# Bad participants for robustness checks. "poor": its annotator labelled most 1s as 3s, plus
# 20% random label noise (measured about 0.65-0.8 accuracy on its classes on digits and
# MNIST-5k; label noise alone barely hurts a logistic regression). "overconfident": a sound
# classifier whose probabilities are sharpened until nearly one-hot, wrong answers included.
ROBUSTNESS_RECIPES: tuple[ExpertRecipe, ...] = (
    ExpertRecipe("poor", "logreg", _digits(1, 3, 5, 7), label_noise=0.2, confuse=0.6),
    ExpertRecipe("overconfident", "logreg", _digits(2, 4, 6, 8), sharpen=10.0),
)


@dataclass(frozen=True)
class BuiltExpert:
    """A trained expert with its name, model kind and output labels."""

    name: str
    kind: str
    labels: tuple[str, ...]
    expert: Expert


def _expert_seed(seed: int, name: str) -> int:
    # Stable across processes (str hash is salted), distinct per expert name.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def _corrupt_labels(
    y: np.ndarray, k: int, recipe: ExpertRecipe, rng: np.random.Generator
) -> np.ndarray:
    y = y.copy()
    if recipe.confuse > 0:
        first = np.flatnonzero(y == 0)
        y[rng.choice(first, round(recipe.confuse * len(first)), replace=False)] = 1
    if recipe.label_noise > 0:
        flip = rng.random(len(y)) < recipe.label_noise
        # Shift by 1..k-1 so a flipped label is always a different class.
        y[flip] = (y[flip] + rng.integers(1, k, flip.sum())) % k
    return y


def _mlp(d: int, k: int):
    """The small torch MLP expert: two hidden layers of 128 ReLU units."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(d, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, k),
    )


def _train_mlp(x: np.ndarray, y: np.ndarray, k: int, seed: int, steps: int = 400, batch: int = 64):
    import torch

    # fork_rng: seeding must not disturb the caller's global torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _mlp(x.shape[1], k)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
        xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(steps):
            idx = torch.randint(len(xt), (min(batch, len(xt)),), generator=gen)
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def _fit_sklearn(kind: str, x: np.ndarray, y: np.ndarray, seed: int):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    if kind == "logreg":
        est = LogisticRegression(max_iter=1000, random_state=seed)
    elif kind == "svm":
        # Platt scaling fitted by cross-validation; SVC(probability=True) is deprecated in
        # sklearn 1.9.
        est = CalibratedClassifierCV(SVC(random_state=seed), method="sigmoid", ensemble=False)
    elif kind == "forest":
        est = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    else:
        est = KNeighborsClassifier(n_neighbors=5)
    return est.fit(x, y)


def _sharpened(base: Expert, factor: float, x: np.ndarray) -> np.ndarray:
    """softmax(factor * log p): same ranking as the base expert, far more confident."""
    logp = factor * np.log(
        np.clip(np.asarray(base.predict_proba(x), dtype=np.float64), 1e-12, None)
    )
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def build_expert(recipe: ExpertRecipe, train: Dataset, seed: int) -> BuiltExpert:
    """Train one expert on the examples of its own classes only; columns follow recipe.classes."""
    missing = [c for c in recipe.classes if c not in train.label_names]
    if missing:
        raise ValueError(
            f"recipe {recipe.name!r}: classes {missing} are not labels of the dataset "
            f"{train.label_names}"
        )
    class_idx = [train.label_names.index(c) for c in recipe.classes]
    x, y = task_subset(train, class_idx)
    counts = np.bincount(y, minlength=len(class_idx))
    if (counts < 2).any():
        few = [recipe.classes[j] for j in np.flatnonzero(counts < 2)]
        raise ValueError(
            f"recipe {recipe.name!r}: classes {few} have fewer than 2 training examples; use a "
            "larger expert_train split"
        )
    s = _expert_seed(seed, recipe.name)
    k = len(class_idx)
    y = _corrupt_labels(y, k, recipe, np.random.default_rng(s))
    labels = tuple(recipe.classes)
    if recipe.kind == "mlp":
        expert: Expert = TorchExpert(_train_mlp(x, y, k, s), labels, outputs="logits")
    else:
        # Trained on column indices 0..k-1 (the order of ``labels``), so the columns are named
        # here; SklearnExpert would refuse names that overlap the indices' own text.
        expert = CallableExpert(_fit_sklearn(recipe.kind, x, y, s).predict_proba, labels)
    if recipe.sharpen != 1.0:
        expert = CallableExpert(functools.partial(_sharpened, expert, recipe.sharpen), labels)
    return BuiltExpert(recipe.name, recipe.kind, labels, expert)


def build_federation(
    train: Dataset, recipes: Sequence[ExpertRecipe] = DEFAULT_RECIPES, seed: int = 0
) -> list[BuiltExpert]:
    """Train every recipe's expert on its own classes of ``train``; deterministic given seed."""
    names = [r.name for r in recipes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"recipes share the names {dup}; give each expert its own name")
    return [build_expert(r, train, seed) for r in recipes]


@functools.lru_cache(maxsize=4)
def _demo_federation(dataset: str, seed: int, split_seed: int) -> dict[str, BuiltExpert]:
    splits = make_splits(load_dataset(dataset), split_seed)
    built = build_federation(
        splits.expert_train, DEFAULT_RECIPES + ROBUSTNESS_RECIPES + SPARSE_RECIPES, seed
    )
    return {b.name: b for b in built}


def demo_expert(dataset: str, name: str, seed: int = 0, split_seed: int = 0) -> Expert:
    """One expert of the demo federation on ``dataset`` (trained once per process, then cached)."""
    federation = _demo_federation(dataset, seed, split_seed)
    if name not in federation:
        raise KeyError(f"no demo expert named {name!r}; available: {', '.join(federation)}")
    return federation[name].expert
