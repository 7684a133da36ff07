"""Baselines our method is compared against, each returning (n_test, K) class probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from protofuse.model.networks import (
    Augmentation,
    FeatureAugmentation,
    augment_features,
    augment_images,
    feature_statistics,
    make_encoder,
)


@dataclass(frozen=True)
class ExpertOutput:
    """One black-box expert's predict_proba on some inputs; columns follow ``labels``."""

    labels: tuple[str, ...]
    proba: np.ndarray  # (n, len(labels))


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _n_classes(y: np.ndarray, n_classes: int | None) -> int:
    return int(n_classes) if n_classes is not None else int(np.max(y)) + 1


def _fit_proba(
    clf: ClassifierMixin,
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
) -> np.ndarray:
    """Fit a sklearn classifier and return probabilities over all ``n_classes`` columns.

    A class absent from the training set gets probability 0; with a single class present
    sklearn refuses to fit, and the only sensible answer is that class with certainty.
    """
    train_y = np.asarray(train_y, dtype=int)
    present = np.unique(train_y)
    out = np.zeros((len(test_x), n_classes))
    if len(present) == 1:
        out[:, present[0]] = 1.0
        return out
    clf.fit(np.asarray(train_x, dtype=np.float64), train_y)
    out[:, clf.classes_] = clf.predict_proba(np.asarray(test_x, dtype=np.float64))
    return out


def _logreg_proba(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, n_classes: int, seed: int
) -> np.ndarray:
    """Multinomial logistic regression, C=1 (lbfgs fits softmax for more than two classes)."""
    return _fit_proba(
        LogisticRegression(C=1.0, max_iter=1000, random_state=seed),
        train_x,
        train_y,
        test_x,
        n_classes,
    )


def _normalise_rows(scores: np.ndarray) -> np.ndarray:
    """Rows scaled to sum to 1; an all-zero row (no evidence at all) becomes uniform."""
    scores = np.asarray(scores, dtype=np.float64)
    total = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.where(total > 0, scores / np.where(total > 0, total, 1.0), uniform)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Baselines that see only the support set


def scratch(
    support_x: np.ndarray,
    support_y: np.ndarray,
    test_x: np.ndarray,
    seed: int = 0,
    n_classes: int | None = None,
) -> np.ndarray:
    """Train from scratch on the support set alone: logistic regression on raw inputs (k=1 ok)."""
    return _logreg_proba(support_x, support_y, test_x, _n_classes(support_y, n_classes), seed)


def _class_means(
    x: np.ndarray, y: np.ndarray, n_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean rows (K, d), zeros for a class with no example, and which classes have one
    (K,)."""
    y = np.asarray(y, dtype=int)
    k = _n_classes(y, n_classes)
    present = np.array([np.any(y == c) for c in range(k)])
    means = np.stack(
        [x[y == c].mean(axis=0) if present[c] else np.zeros(x.shape[1]) for c in range(k)]
    )
    return means, present


def nearest_class_mean(
    support_x: np.ndarray, support_y: np.ndarray, test_x: np.ndarray, n_classes: int | None = None
) -> np.ndarray:
    """Softmax of minus the squared distance to each class mean, over a median-distance temperature.

    Raw squared distances on pixels are in the tens, so an untempered softmax would be one-hot;
    dividing by the median distance keeps the probabilities informative for calibration metrics.
    """
    test_x = np.asarray(test_x, dtype=np.float64)
    means, present = _class_means(np.asarray(support_x, dtype=np.float64), support_y, n_classes)
    d2 = ((test_x[:, None, :] - means[None, :, :]) ** 2).sum(-1)  # (n_t, K)
    temperature = float(np.median(d2[:, present])) if d2.size else 1.0
    logits = -d2 / max(temperature, 1e-12)
    logits[:, ~present] = -np.inf  # a class with no example has no mean to be near
    return _softmax(logits)


# ---------------------------------------------------------------------------------------------
# Baselines that query the experts


def _task_columns(
    labels: tuple[str, ...], task_labels: tuple[str, ...]
) -> tuple[list[int], list[int]]:
    """(task column, expert column) pairs for the task classes this expert covers."""
    own = {name: j for j, name in enumerate(labels)}
    pairs = [(c, own[name]) for c, name in enumerate(task_labels) if name in own]
    return [c for c, _ in pairs], [j for _, j in pairs]


def expert_vote(test_outputs: list[ExpertOutput], task_labels: tuple[str, ...]) -> np.ndarray:
    """No examples: average, per task class, the covering experts' restricted probabilities."""
    n = test_outputs[0].proba.shape[0] if test_outputs else 0
    k = len(task_labels)
    total = np.zeros((n, k))
    count = np.zeros(k)
    for out in test_outputs:
        task_cols, own_cols = _task_columns(out.labels, task_labels)
        if not task_cols:
            continue
        p = np.asarray(out.proba, dtype=np.float64)[:, own_cols]
        if len(own_cols) > 1:
            # Renormalising over the covered task classes removes mass the expert put on
            # classes outside the task; with one covered class it would be a constant 1,
            # so the raw probability is the only informative score there.
            p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
        total[:, task_cols] += p
        count[task_cols] += 1
    scores = np.where(count > 0, total / np.maximum(count, 1), 0.0)  # uncovered classes: 0
    return _normalise_rows(scores)


def _stack_features(outputs: list[ExpertOutput]) -> np.ndarray:
    return np.concatenate([np.asarray(o.proba, dtype=np.float64) for o in outputs], axis=1)


def stacking(
    support_outputs: list[ExpertOutput],
    support_y: np.ndarray,
    test_outputs: list[ExpertOutput],
    task_labels: tuple[str, ...],
    seed: int = 0,
) -> np.ndarray:
    """Logistic regression on all experts' concatenated outputs, fit on the support set.

    Unlike our method this needs every black box at adaptation time, to label support and test.
    """
    return _logreg_proba(
        _stack_features(support_outputs),
        support_y,
        _stack_features(test_outputs),
        len(task_labels),
        seed,
    )


# ---------------------------------------------------------------------------------------------
# Multi-head imitator (local-distillation fusion) with a linear probe


class _MultiHead(nn.Module):
    """Shared encoder, one linear head per expert over that expert's own labels."""

    def __init__(self, encoder: nn.Module, feat_dim: int, head_sizes: list[int]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleList(nn.Linear(feat_dim, m) for m in head_sizes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [torch.log_softmax(head(z), dim=-1) for head in self.heads]


class Imitator:
    """Classic local-distillation fusion: imitate every expert through a shared encoder, then probe.

    Uses the same encoder factory and augmentation (image transforms, or feature dropout and
    noise for tables) as our discriminative bank, so a gap between the two measures the fusion
    (prototypes vs. unrelated heads), not the encoder.
    """

    def __init__(
        self,
        in_dim: int,
        image_shape: tuple[int, int] | None,
        encoder: str = "conv",
        feat_dim: int = 64,
        epochs: int = 30,
        augmentation: Augmentation | FeatureAugmentation | None = None,
        seed: int = 0,
        lr: float = 1e-3,
        batch_size: int = 128,
    ) -> None:
        if encoder == "conv" and image_shape is None:
            raise ValueError(
                "encoder 'conv' needs image inputs (an image shape); use encoder = 'mlp'"
            )
        if encoder not in ("conv", "mlp"):
            raise ValueError(f"unknown encoder {encoder!r}: use 'conv' or 'mlp'")
        self.in_dim, self.image_shape, self.encoder_kind = (
            in_dim,
            (tuple(image_shape) if image_shape else None),
            encoder,
        )
        self.feat_dim, self.epochs, self.augmentation = feat_dim, epochs, augmentation
        self.seed, self.lr, self.batch_size = seed, lr, batch_size
        self.net: _MultiHead | None = None
        self.labels: list[tuple[str, ...]] = []
        self.scaler: StandardScaler | None = None  # fitted on the query pool's features
        self.centre: np.ndarray | None = None  # mean feature of the query pool

    def fit(self, query_x: np.ndarray, outputs: list[ExpertOutput]) -> Imitator:
        """Train encoder and heads by soft cross-entropy against each expert on the query pool."""
        x = torch.as_tensor(np.asarray(query_x, dtype=np.float32))
        targets = [torch.as_tensor(np.asarray(o.proba, dtype=np.float32)) for o in outputs]
        for o, t in zip(outputs, targets, strict=True):
            if t.shape != (len(x), len(o.labels)):
                raise ValueError(
                    f"expert output shape {tuple(t.shape)} != ({len(x)}, {len(o.labels)})"
                )
        # A private RNG scope: seeding the global generator would silently reseed the caller.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            encoder = make_encoder(self.encoder_kind, self.in_dim, self.feat_dim, self.image_shape)
            self.net = _MultiHead(encoder, self.feat_dim, [len(o.labels) for o in outputs])
        self._train(x, targets)
        self.labels = [tuple(o.labels) for o in outputs]
        # Probe statistics come from the unlabeled query pool, never from the few support
        # examples: standardising on k = 1 examples per class would be noise.
        pool = self.features(query_x)
        self.scaler = StandardScaler().fit(pool)
        self.centre = pool.mean(0)
        return self

    def _train(self, x: torch.Tensor, targets: list[torch.Tensor]) -> None:
        # Same optimiser and schedule as train_discriminative, for a like-for-like comparison.
        assert self.net is not None
        gen = torch.Generator().manual_seed(self.seed)
        n_batches = max(1, (len(x) + self.batch_size - 1) // self.batch_size)
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=max(1, self.epochs * n_batches)
        )
        centre, spread = feature_statistics(x)  # the query pool's, as the bank's
        self.net.train()
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(self.batch_size):
                if len(idx) < 2:  # batch norm needs two examples
                    continue
                xb = x[idx]
                # The expert's answer for the original input stays the target.
                if isinstance(self.augmentation, FeatureAugmentation):
                    xb = augment_features(xb, self.augmentation, centre, spread, gen)
                elif self.augmentation is not None and self.image_shape is not None:
                    xb = augment_images(xb, self.image_shape, self.augmentation, gen)
                log_q = self.net(xb)
                loss = torch.stack(
                    [-(t[idx] * lq).sum(-1).mean() for t, lq in zip(targets, log_q, strict=True)]
                ).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval()

    @torch.no_grad()
    def features(self, x: np.ndarray, batch: int = 1024) -> np.ndarray:
        """Encoder features (n, feat_dim), eval mode, no gradients."""
        if self.net is None:
            raise RuntimeError("Imitator.features called before fit")
        self.net.eval()
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if len(xt) == 0:
            return np.zeros((0, self.feat_dim), dtype=np.float32)
        return torch.cat(
            [self.net.encoder(xt[i : i + batch]) for i in range(0, len(xt), batch)]
        ).numpy()

    @torch.no_grad()
    def expert_proba(self, x: np.ndarray, batch: int = 1024) -> list[np.ndarray]:
        """Each head's imitation of its expert on ``x``: (n, len(expert labels)) per expert."""
        if self.net is None:
            raise RuntimeError("Imitator.expert_proba called before fit")
        self.net.eval()
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        chunks = [self.net(xt[i : i + batch]) for i in range(0, len(xt), batch)]
        return [torch.cat([c[e] for c in chunks]).exp().numpy() for e in range(len(self.net.heads))]

    def probe(
        self,
        support_x: np.ndarray,
        support_y: np.ndarray,
        test_x: np.ndarray,
        seed: int = 0,
        n_classes: int | None = None,
    ) -> np.ndarray:
        """Linear probe: logistic regression on features standardised with the query pool's
        statistics."""
        if self.scaler is None:
            raise RuntimeError("Imitator.probe called before fit")
        fs, ft = (self.scaler.transform(self.features(a)) for a in (support_x, test_x))
        return _logreg_proba(fs, support_y, ft, _n_classes(support_y, n_classes), seed)

    def cosine_ncm(
        self,
        support_x: np.ndarray,
        support_y: np.ndarray,
        test_x: np.ndarray,
        n_classes: int | None = None,
        temperature: float = 10.0,
    ) -> np.ndarray:
        """Cosine nearest class mean: features centred on the query pool's mean and L2-normalised,
        class means of the support set, softmax of ``temperature`` times the cosine similarity."""
        if self.centre is None:
            raise RuntimeError("Imitator.cosine_ncm called before fit")

        def unit(f: np.ndarray) -> np.ndarray:
            f = f - self.centre
            return f / np.clip(np.linalg.norm(f, axis=1, keepdims=True), 1e-12, None)

        means, present = _class_means(unit(self.features(support_x)), support_y, n_classes)
        # The means are of features already centred: normalise them, do not centre them again.
        means = means / np.clip(np.linalg.norm(means, axis=1, keepdims=True), 1e-12, None)
        logits = temperature * unit(self.features(test_x)) @ means.T
        logits[:, ~present] = -np.inf
        return _softmax(logits)

    def vote(self, test_x: np.ndarray, task_labels: tuple[str, ...]) -> np.ndarray:
        """Zero-shot from the imitator alone: the expert vote over its heads' imitated answers
        (no expert online, no example)."""
        imitated = [
            ExpertOutput(labels, p)
            for labels, p in zip(self.labels, self.expert_proba(test_x), strict=True)
        ]
        return expert_vote(imitated, task_labels)


CEILING = "ceiling: same encoder trained on all labels"  # its name in the benchmark's tables


class Ceiling:
    """What labels buy: the imitator's encoder, augmentation and schedule trained with cross-entropy
    on the true labels of every labeled example outside the test split (all classes at once);
    a task's prediction is its softmax restricted to the task's classes.

    Not a baseline a federation could run (it pools every organisation's labeled data): the
    reference that a few-shot method with frozen features is measured against.
    """

    def __init__(self, label_names: tuple[str, ...], **imitator_args) -> None:
        self.label_names = tuple(label_names)
        self.net = Imitator(**imitator_args)

    def fit(self, x: np.ndarray, y: np.ndarray) -> Ceiling:
        onehot = np.eye(len(self.label_names), dtype=np.float32)[np.asarray(y, dtype=int)]
        self.net.fit(x, [ExpertOutput(self.label_names, onehot)])
        return self

    def predict_proba(self, x: np.ndarray, task_labels: tuple[str, ...]) -> np.ndarray:
        cols = [self.label_names.index(c) for c in task_labels]
        return _normalise_rows(self.net.expert_proba(x)[0][:, cols])
