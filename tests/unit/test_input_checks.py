"""Hints and warnings about inputs the bank probably does not expect."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from toys import clusters, two_experts

from bench.datasets import load_dataset
from protofuse.adapted import load_adapted
from protofuse.bank import fit_bank, load_bank
from protofuse.input_checks import InputRangeWarning, image_hint
from protofuse.settings import AdaptSettings, ModelSettings, TrainingSettings

torch.set_num_threads(1)


def test_flattened_images_are_recognised_and_tables_are_not():
    digits = load_dataset("digits").x  # (n, 64), values in [0, 1]
    assert "image_shape = [8, 8]" in image_hint(digits)
    assert "image_shape = [8, 8]" in image_hint(np.round(digits * 255))  # 0-255 pixels
    assert image_hint(digits[:, :60]) is None  # not a square width
    assert image_hint(digits * 255 + 0.5) is None  # not whole numbers: not 8-bit pixels
    assert image_hint(digits - 0.5) is None  # negative values: standardised features, not pixels
    x, _, _ = clusters(
        0, d=16
    )  # a limit of the rule: a 16-column table in [0, 1] reads as 4 x 4 images
    assert image_hint(x) is not None


@pytest.fixture(scope="module")
def bank(tmp_path_factory):
    x, y, _ = clusters(0)
    folder = tmp_path_factory.mktemp("bank")
    fit_bank(
        two_experts(x, y),
        ModelSettings(family="discriminative", feat_dim=8, hidden=32),
        TrainingSettings(epochs=4, lr=5e-3),
        AdaptSettings(),
        None,
        "bernoulli",
    ).save(folder)
    return load_bank(folder), x, y


def test_inputs_scaled_unlike_the_queries_get_a_warning_naming_both_ranges(bank, tmp_path):
    bank, x, y = bank
    idx = np.concatenate([np.flatnonzero(y == c)[:3] for c in (0, 2, 3)])
    sx, sy = x[idx], y[idx].astype(str)
    assert bank.meta.input_range == (float(x.min()), float(x.max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = bank.adapt(sx, sy)  # the queries' own scale: silent
        model.predict_proba(x)
    with pytest.warns(
        InputRangeWarning,
        match=r"support inputs span \[0, 255\] but the bank's queries spanned \[0, 1\]",
    ):
        bank.adapt(np.round(sx * 255), sy)
    model.save(tmp_path / "model")
    again = load_adapted(tmp_path / "model", unsigned_ok=True)  # the range travels with the model
    with pytest.warns(InputRangeWarning, match="inputs span"):
        again.predict(x * 255)
