"""The training data of a bank: query inputs, the experts' outputs on them, and task descriptors.

Every expert answers on its own queries; experts that share a query pool share the inputs, so an
input is encoded once and scored against every expert that answered it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Triples:
    x: np.ndarray  # (N, d) float32 query inputs
    eta: np.ndarray  # (N, E, C) float32 expert outputs embedded in the vocabulary (zeros elsewhere)
    mask: np.ndarray  # (N, E) bool: did expert e answer input n
    label_names: tuple[str, ...]  # the vocabulary L, C names
    expert_names: tuple[str, ...]  # E names
    expert_labels: tuple[tuple[str, ...], ...]  # each expert's own labels, in its column order

    @property
    def tau(self) -> np.ndarray:
        """(E, C) multi-hot task descriptors."""
        index = {name: i for i, name in enumerate(self.label_names)}
        tau = np.zeros((len(self.expert_names), len(self.label_names)), dtype=np.float32)
        for e, labels in enumerate(self.expert_labels):
            tau[e, [index[c] for c in labels]] = 1.0
        return tau

    def split(self, holdout: float, seed: int) -> tuple[Triples, Triples]:
        """(train, held-out) by input: held-out inputs measure imitation fidelity."""
        train, held = self.split_indices(holdout, seed)
        return self._take(train), self._take(held)

    def split_indices(self, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The row indices ``split`` puts in (train, held-out): a seeded permutation of the
        inputs."""
        order = np.random.default_rng(seed).permutation(self.x.shape[0])
        n_hold = round(holdout * len(order))
        return order[n_hold:], order[:n_hold]

    def _take(self, idx: np.ndarray) -> Triples:
        return Triples(
            self.x[idx],
            self.eta[idx],
            self.mask[idx],
            self.label_names,
            self.expert_names,
            self.expert_labels,
        )


def vocabulary(expert_labels: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Union of the experts' labels, in order of first appearance."""
    seen: dict[str, None] = {}
    for labels in expert_labels:
        for c in labels:
            seen.setdefault(c, None)
    return tuple(seen)


def assemble(
    names: list[str],
    labels: list[tuple[str, ...]],
    queries: list[np.ndarray],
    outputs: list[np.ndarray],
    shared: list[int] | None = None,
) -> Triples:
    """Build triples from each expert's queries (n_e, d) and outputs (n_e, |Y_e|).

    ``shared[e]`` names a pool id: experts with the same id queried the same inputs (in the same
    order), which are then stored once. By default every expert has its own pool.
    """
    vocab = vocabulary(labels)
    index = {c: i for i, c in enumerate(vocab)}
    pools = shared if shared is not None else list(range(len(names)))
    offsets: dict[int, int] = {}
    blocks: list[np.ndarray] = []
    total = 0
    for e, pool in enumerate(pools):
        if pool not in offsets:
            offsets[pool] = total
            blocks.append(np.asarray(queries[e], dtype=np.float32))
            total += len(queries[e])
    x = np.concatenate(blocks)
    eta = np.zeros((total, len(names), len(vocab)), dtype=np.float32)
    mask = np.zeros((total, len(names)), dtype=bool)
    for e, pool in enumerate(pools):
        rows = slice(offsets[pool], offsets[pool] + len(queries[e]))
        eta[rows, e][:, [index[c] for c in labels[e]]] = outputs[e]
        mask[rows, e] = True
    return Triples(x, eta, mask, vocab, tuple(names), tuple(tuple(own) for own in labels))
