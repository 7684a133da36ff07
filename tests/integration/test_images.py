"""Colour and larger images: the layout of a row, the conv encoder's channels and depth,
augmentation that keeps channels aligned, the spec's image_shape, and a colour bank end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.datasets import colourize, load_dataset, resize
from protofuse.input_checks import image_hint
from protofuse.model.discriminative import DiscriminativeConfig, DiscriminativePrototypes
from protofuse.model.generative import GenerativeConfig, GenerativePrototypes
from protofuse.model.networks import (
    Augmentation,
    ConvEncoder,
    as_channels_first,
    as_rows,
    augment_images,
    conv_blocks,
    image_size,
)
from protofuse.spec import SpecError, load_spec
from protofuse_cli.main import main

torch.set_num_threads(1)


def test_a_row_is_an_image_flattened_channels_last():
    images = np.random.default_rng(0).random((2, 5, 6, 3)).astype(np.float32)  # (n, H, W, C)
    rows = torch.from_numpy(images.reshape(2, -1))
    planes = as_channels_first(rows, (5, 6, 3))
    assert planes.shape == (2, 3, 5, 6)
    assert torch.equal(planes[1, 2], torch.from_numpy(images[1, :, :, 2]))  # channel 2 of image 1
    assert torch.equal(as_rows(planes), rows)
    assert image_size((5, 6, 3)) == 90 and image_size((5, 6)) == 30


def test_augmentation_moves_every_channel_of_an_image_alike():
    grey = torch.from_numpy(load_dataset("digits").x[:16])  # (16, 64)
    three = grey[:, :, None].expand(16, 64, 3).reshape(16, -1)  # the same picture in each channel
    moved = augment_images(
        three, (8, 8, 3), Augmentation(1, 12, 0.1), torch.Generator().manual_seed(1)
    ).view(16, 64, 3)
    assert torch.allclose(moved[..., 0], moved[..., 1]) and torch.allclose(
        moved[..., 0], moved[..., 2]
    )
    assert not torch.allclose(moved[..., 0], grey)  # it did move
    # A colour background is carried to the edges, not replaced by black.
    flat = torch.full((4, 8 * 8 * 3), 0.6)
    assert torch.allclose(
        augment_images(flat, (8, 8, 3), Augmentation(2, 20, 0.1), torch.Generator().manual_seed(0)),
        flat,
    )


@pytest.mark.parametrize(
    "shape,blocks",
    [
        ((8, 8), 2),
        ((28, 28), 2),
        ((28, 28, 3), 2),
        ((32, 32, 3), 2),
        ((64, 64), 3),
        ((128, 96, 3), 4),
    ],
)
def test_the_conv_encoder_takes_channels_and_deepens_for_large_images(shape, blocks):
    assert conv_blocks(shape) == blocks
    encoder = ConvEncoder(shape, out_dim=16)
    assert encoder.conv[0].in_channels == (shape[2] if len(shape) == 3 else 1)
    x = torch.rand(3, image_size(shape))
    assert encoder(x).shape == (3, 16)


def test_greyscale_banks_keep_the_layout_they_were_saved_with():
    # Banks fitted before colour support hold these exact parameter names and shapes.
    state = ConvEncoder((28, 28), out_dim=64).state_dict()
    assert state["conv.0.weight"].shape == (32, 1, 3, 3)
    assert state["conv.4.weight"].shape == (64, 32, 3, 3)
    assert state["head.1.weight"].shape == (128, 64 * 7 * 7)
    assert not any(k.startswith("conv.8") for k in state)


def test_both_families_fit_colour_rows():
    x = torch.rand(6, 8 * 8 * 3)
    disc = DiscriminativePrototypes(
        DiscriminativeConfig(x.shape[1], 4, 2, feat_dim=8, encoder="conv", image_shape=(8, 8, 3))
    )
    assert disc.embed(x).shape == (6, 8)
    gen = GenerativePrototypes(
        GenerativeConfig(x.shape[1], 4, image_shape=(8, 8, 3), conv=True, hidden=16)
    )
    eta = torch.softmax(torch.randn(6, 4), -1)
    tau = torch.ones(4)
    out = gen.loss(x, eta, tau.expand(6, 4))
    assert torch.isfinite(out["loss"])
    assert gen.decoder(torch.randn(6, gen.cfg.w_dim + gen.cfg.z_dim)).shape == (6, 8 * 8 * 3)


def test_colour_digits_keep_labels_and_carry_no_label_in_colour():
    grey = load_dataset("digits")
    colour = colourize(grey)
    assert colour.image_shape == (8, 8, 3) and colour.x.shape == (len(grey), 192)
    assert np.array_equal(colour.y, grey.y) and colour.label_names == grey.label_names
    assert colour.x.min() >= 0 and colour.x.max() <= 1
    pixels = colour.x.reshape(len(grey), 64, 3)
    background = pixels[
        np.arange(len(grey)), grey.x.argmin(1)
    ]  # (n, 3) where the grey image is blankest
    # Background colours are spread alike in every class: colour says nothing about the digit.
    means = np.stack([background[colour.y == c].mean(0) for c in range(10)])
    assert np.abs(means - background.mean(0)).max() < 0.05
    # The ink stands out from the background in every channel.
    ink = pixels[np.arange(len(grey)), grey.x.argmax(1)]
    contrast = np.abs(ink - background) * (1 / grey.x.max(1))[:, None]
    assert contrast.min() > 0.15


def test_resize_makes_larger_images_of_the_same_digits():
    grey = load_dataset("digits")
    big = resize(grey, 32)
    assert big.image_shape == (32, 32) and big.x.shape == (len(grey), 1024)
    assert abs(big.x.mean() - grey.x.mean()) < 0.02  # the same ink, spread over more pixels
    assert resize(colourize(grey), 16).image_shape == (16, 16, 3)


def test_spec_takes_a_colour_image_shape_and_names_bad_ones(tmp_path):
    spec = tmp_path / "spec.toml"
    expert = '[[experts]]\nname = "a"\npredict = "m:f"\nlabels = ["0", "1"]\nqueries = "q.npy"\n'
    spec.write_text("[data]\nimage_shape = [32, 32, 3]\n\n" + expert)
    assert load_spec(spec).data.image_shape == (32, 32, 3)
    for shape, message in (
        ("[32, 32, 3, 1]", "[height, width, channels]"),
        ("[32, 32, 0]", "channels"),
        ("[2, 32, 3]", "at least 4 pixels"),
    ):
        spec.write_text(f"[data]\nimage_shape = {shape}\n\n" + expert)
        with pytest.raises(SpecError, match=r"data\.image_shape") as err:
            load_spec(spec)
        assert message in str(err.value)


def test_flattened_colour_images_get_a_colour_hint():
    colour = colourize(load_dataset("digits")).x
    assert "image_shape = [8, 8, 3]" in image_hint(colour)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    from bench.demo import write_federation

    folder = tmp_path_factory.mktemp("colour")
    spec = write_federation(folder / "federation", "digits-colour", k=5, seed=0)
    assert "image_shape = [8, 8, 3]" in spec.read_text()
    assert main(["fit", str(spec), "--out", str(folder / "bank")]) == 0
    return folder


def test_a_colour_bank_is_fitted_adapted_and_used_end_to_end(colour_run):
    fed = colour_run / "federation"
    assert (
        main(
            [
                "adapt",
                str(colour_run / "bank"),
                "--support",
                str(fed / "support.npz"),
                "--out",
                str(colour_run / "model"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(colour_run / "model"),
                "--inputs",
                str(fed / "test_x.npy"),
                "--out",
                str(colour_run / "pred.npz"),
                "--unsigned-ok",
            ]
        )
        == 0
    )
    pred = np.load(colour_run / "pred.npz")
    truth = np.load(fed / "test_y.npy")
    accuracy = float((pred["classes"][pred["proba"].argmax(1)] == truth).mean())
    assert accuracy > 0.8, accuracy  # 5-way: chance is 0.2


def test_colour_queries_of_the_wrong_width_are_refused(colour_run, tmp_path, capsys):
    spec = colour_run / "federation" / "spec.toml"
    bad = tmp_path / "spec.toml"
    bad.write_text(
        spec.read_text()
        .replace("image_shape = [8, 8, 3]", "image_shape = [8, 8, 4]")
        .replace(
            'queries = "queries.npy"', f'queries = "{colour_run / "federation" / "queries.npy"}"'
        )
    )
    (tmp_path / "experts.py").write_text((colour_run / "federation" / "experts.py").read_text())
    assert main(["fit", str(bad), "--out", str(tmp_path / "bank")]) != 0
    assert (
        "data.image_shape [8, 8, 4] has 256 values per image but the queries have 192 features"
        in capsys.readouterr().err
    )
