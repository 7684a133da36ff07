"""Toy federations shared by the tests: four clusters of inputs and experts that answer for some of
them."""

from __future__ import annotations

import numpy as np

from protofuse.triples import Triples, assemble


def clusters(
    seed: int = 0, n: int = 400, d: int = 16, noise: float = 0.08, clip: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, d) float32, y (n,) in 0..3, centres (4, d)): Gaussian clusters around centres in [0,
    1]^d."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    centres = rng.random((4, d))
    x = centres[y] + noise * rng.standard_normal((n, d))
    return (np.clip(x, 0, 1) if clip else x).astype(np.float32), y, centres


def answers(y: np.ndarray, cols: list[int]) -> np.ndarray:
    """A near-certain expert over the labels ``cols``: its one-hot truth, smoothed, rows summing to
    1."""
    p = np.eye(4, dtype=np.float32)[y][:, cols] + 0.01
    return p / p.sum(1, keepdims=True)


def two_experts(x: np.ndarray, y: np.ndarray) -> Triples:
    """Expert a knows 0/1/2, expert b knows 2/3; both answer on the same inputs. 0 and 3 never
    meet."""
    return assemble(
        ["a", "b"],
        [("0", "1", "2"), ("2", "3")],
        [x, x],
        [answers(y, [0, 1, 2]), answers(y, [2, 3])],
        shared=[0, 0],
    )


def toy_bank(
    family: str = "discriminative",
    epochs: int = 8,
    image_shape: tuple[int, ...] | None = None,
    n: int = 400,
    label_names: tuple[str, str, str, str] = ("0", "1", "2", "3"),
    experts: tuple[str, str] = ("a", "b"),
):
    """(bank, x, y label names): a small bank fitted on the clusters with ``two_experts``' label
    sets (under ``label_names`` and ``experts``' pseudonyms), its inputs repeated to fill
    ``image_shape`` where given."""
    from protofuse.bank import fit_bank
    from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings

    x, y, _ = clusters(0, n=n)
    if image_shape is not None:
        x = np.resize(x, (len(x), int(np.prod(image_shape)))).astype(np.float32)
    triples = assemble(
        list(experts),
        [label_names[:3], label_names[2:]],
        [x, x],
        [answers(y, [0, 1, 2]), answers(y, [2, 3])],
        shared=[0, 0],
    )
    bank = fit_bank(
        triples,
        ModelSettings(family=family, feat_dim=8, hidden=16),
        TrainingSettings(epochs=epochs, lr=5e-3),
        AdaptSettings(n_z=4),
        image_shape,
        "bernoulli",
    )
    return bank, x, np.asarray(label_names)[y]
