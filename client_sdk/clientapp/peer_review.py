"""A client's part in peer review (protofuse/protocol/review.py): its expert's own view of its
labels' rows, and its scores of other clients' views on its own queries.

Both are computed on the shared encoder the round's weights define, before local training, so the
views of one round sit in the same feature space. Nothing here leaves the client but the view's
rows and one number per candidate.
"""

from __future__ import annotations

import numpy as np
import torch

from protofuse.model.discriminative import DiscriminativePrototypes, fit_view
from protofuse.protocol.review import LabelRows, PeerReview

MAX_ROWS = 1000  # queries for fitting the view, and for scoring candidates (each at most)
MIN_SCORED = 20  # queries of a candidate's labels below which it is not scored (too noisy)


def review_split(n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, score) indices into the training queries: disjoint, each at most MAX_ROWS. The
    score part is added to the held-out queries: a view is never scored on what fitted it."""
    order = np.random.default_rng(seed).permutation(n_train)
    half = len(order) // 2
    return order[:half][:MAX_ROWS], order[half:][:MAX_ROWS]


def embed(model: DiscriminativePrototypes, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.embed(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))


def own_view(
    model: DiscriminativePrototypes,
    z: torch.Tensor,
    answers: np.ndarray,
    labels: tuple[str, ...],
    vocabulary: tuple[str, ...],
) -> LabelRows:
    """The expert's view of its labels' rows (``fit_view``) from features z (n, F) and its
    answers (n, K), starting from the bank's rows."""
    cols = [vocabulary.index(c) for c in labels]
    with torch.no_grad():
        p0 = model.prototypes[cols].detach().clone()
        b0 = model.bias[cols].detach().clone()
    protos, bias = fit_view(z, torch.from_numpy(answers.astype(np.float32)), p0, b0)
    return LabelRows(labels, protos.numpy(), bias.numpy())


def score_candidates(
    z: torch.Tensor, answers: np.ndarray, own: LabelRows, review: PeerReview
) -> tuple[tuple[int, float], ...]:
    """(id, score) for each candidate with enough queries: on the queries whose expert answer
    falls among the candidate's labels S, the share the candidate's rows classify as the expert
    does (over S) minus the share this client's own view does; in [-1, 1], 0: as good as its
    own. A candidate of another width or of labels this expert lacks is a server fault: refused
    with the field named."""
    top = answers.argmax(1)  # (n,) index into own.labels
    feats = z.numpy().astype(np.float64)
    out = []
    for cid, rows in review.candidates:
        missing = [c for c in rows.labels if c not in own.labels]
        if missing:
            raise ValueError(
                f"PeerReview candidate {cid}: labels {missing[:5]} are not this expert's; the "
                "server sends only labels a reviewer declared"
            )
        if rows.prototypes.shape[1] != feats.shape[1]:
            raise ValueError(
                f"PeerReview candidate {cid}: rows {rows.prototypes.shape[1]} wide, the bank's "
                f"features {feats.shape[1]}"
            )
        index = [own.labels.index(c) for c in rows.labels]
        chosen = np.isin(top, index)
        if chosen.sum() < MIN_SCORED:
            continue
        target = np.searchsorted(np.sort(index), top[chosen])  # position within sorted S
        order = np.argsort(index)  # candidate rows in the order of sorted S
        theirs = _agreement(feats[chosen], rows.prototypes[order], rows.bias[order], target)
        mine = own.subset([rows.labels[i] for i in order])
        ours = _agreement(feats[chosen], mine.prototypes, mine.bias, target)
        out.append((cid, float(np.clip(theirs - ours, -1.0, 1.0))))
    return tuple(out)


def _agreement(z: np.ndarray, protos: np.ndarray, bias: np.ndarray, target: np.ndarray) -> float:
    logits = z @ protos.astype(np.float64).T + bias.astype(np.float64)
    return float((logits.argmax(1) == target).mean())
