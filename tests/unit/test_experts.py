"""Tests for the expert protocol, its adapters, dispatch and validated querying."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from client_sdk.experts import (
    CallableExpert,
    Expert,
    ExpertOutputError,
    SklearnExpert,
    TorchExpert,
    as_expert,
    query_expert,
)

torch.set_num_threads(1)

RNG = np.random.default_rng(0)
X = RNG.random((23, 5)).astype(np.float32)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fitted_logreg():
    y = np.array(["cat", "dog", "eel"] * 8)[: len(X)]
    return LogisticRegression(max_iter=200).fit(X, y)


class _Fixed:
    """An Expert returning whatever table it is given, to exercise validation."""

    def __init__(self, out, labels=("a", "b", "c")):
        self.out, self.labels = out, labels

    def predict_proba(self, x):
        return self.out


def test_callable_expert_output_validated():
    expert = CallableExpert(lambda x: _softmax(x[:, :3]), ["a", "b", "c"])
    p = query_expert(expert, X, "fn")
    assert p.shape == (23, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p, _softmax(X[:, :3]), rtol=1e-5)
    assert expert.labels == ("a", "b", "c")


def test_sklearn_expert_labels_default_to_classes():
    est = _fitted_logreg()
    expert = SklearnExpert(est)
    assert expert.labels == ("cat", "dog", "eel")
    p = query_expert(expert, X, "lr")
    np.testing.assert_allclose(p, est.predict_proba(X), rtol=1e-5)


def test_sklearn_expert_label_count_must_match():
    with pytest.raises(ValueError, match=r"2 names.*3 classes"):
        SklearnExpert(_fitted_logreg(), ["a", "b"])


def test_sklearn_expert_unfitted_is_a_clear_error():
    with pytest.raises(TypeError, match="fit it"):
        SklearnExpert(LogisticRegression())
    with pytest.raises(TypeError, match="fit it"):
        as_expert(LogisticRegression())


@pytest.mark.parametrize("outputs", ["logits", "probs"])
def test_torch_expert(outputs):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(5, 4)] + ([torch.nn.Softmax(dim=1)] if outputs == "probs" else [])
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(5), *layers)
    net.train()
    expert = TorchExpert(net, ["w", "x", "y", "z"], outputs=outputs)
    p = query_expert(expert, X.astype(np.float64), "net")  # float64 input is cast
    assert p.shape == (23, 4)
    assert not net.training  # eval mode: batch norm uses running statistics
    with torch.no_grad():
        logits = net[1](net[0](torch.as_tensor(X))).numpy()
    np.testing.assert_allclose(p, _softmax(logits), rtol=1e-4, atol=1e-6)


def test_torch_expert_rejects_unknown_outputs():
    with pytest.raises(ValueError, match="outputs"):
        TorchExpert(torch.nn.Linear(5, 2), ["a", "b"], outputs="scores")


def test_as_expert_dispatch():
    fixed = _Fixed(np.full((1, 3), 1 / 3))
    assert isinstance(fixed, Expert)
    assert as_expert(fixed) is fixed
    assert as_expert(fixed, ["a", "b", "c"]) is fixed
    assert isinstance(as_expert(_fitted_logreg()), SklearnExpert)
    assert isinstance(as_expert(torch.nn.Linear(5, 2), ["a", "b"]), TorchExpert)
    fn_expert = as_expert(lambda x: _softmax(x[:, :2]), ["p", "q"])
    assert isinstance(fn_expert, CallableExpert) and fn_expert.labels == ("p", "q")


def test_as_expert_requires_labels_for_torch_and_callables():
    with pytest.raises(TypeError, match="labels"):
        as_expert(torch.nn.Linear(5, 2))
    with pytest.raises(TypeError, match="labels"):
        as_expert(lambda x: x)


def test_as_expert_rejects_mismatched_labels_of_an_expert():
    with pytest.raises(ValueError, match="differ"):
        as_expert(_Fixed(None), ["a", "c", "b"])


def test_as_expert_rejects_other_objects():
    with pytest.raises(TypeError, match=r"accepted.*scikit-learn.*torch"):
        as_expert(42)


def test_query_expert_batches_give_same_answer():
    calls = []

    def fn(x):
        calls.append(len(x))
        return _softmax(x[:, :3])

    expert = CallableExpert(fn, ["a", "b", "c"])
    full = query_expert(expert, X, "fn")
    calls.clear()
    batched = query_expert(expert, X, "fn", batch_size=10)
    assert calls == [10, 10, 3]
    np.testing.assert_array_equal(full, batched)


def test_query_expert_wrong_shape_names_expert():
    with pytest.raises(
        ExpertOutputError, match=r"expert 'svm_a' returned shape \(23, 4\), expected \(23, 3\)"
    ):
        query_expert(_Fixed(np.full((23, 4), 0.25)), X, "svm_a")


def test_query_expert_1d_output_names_expert():
    with pytest.raises(ExpertOutputError, match=r"expert 'knn'.*1-D.*class indices"):
        query_expert(_Fixed(np.zeros(23)), X, "knn")


def test_query_expert_nan_names_expert_and_row():
    out = np.full((23, 3), 1 / 3)
    out[7, 1] = np.nan
    with pytest.raises(ExpertOutputError, match=r"expert 'nan_box'.*NaN.*row 7"):
        query_expert(_Fixed(out), X, "nan_box")


def test_query_expert_nan_row_counts_across_batches():
    out = np.full((23, 3), 1 / 3)
    out[17, 0] = np.inf
    batches = iter([out[:10], out[10:20], out[20:]])
    expert = CallableExpert(lambda x: next(batches), ["a", "b", "c"])
    with pytest.raises(ExpertOutputError, match="row 17"):
        query_expert(expert, X, "inf_box", batch_size=10)


def test_query_expert_negative_names_expert():
    out = np.full((23, 3), 1 / 3)
    out[2] = [1.2, -0.2, 0.0]
    with pytest.raises(ExpertOutputError, match=r"expert 'logit_box'.*negative.*softmax"):
        query_expert(_Fixed(out), X, "logit_box")


def test_query_expert_rows_must_sum_to_one():
    out = np.full((23, 3), 0.3)
    with pytest.raises(ExpertOutputError, match=r"expert 'unnorm'.*sum to 1.*0\.9"):
        query_expert(_Fixed(out), X, "unnorm")


def test_query_expert_tolerates_rounding_and_renormalizes():
    out = np.tile([0.5 + 5e-4, 0.5, -5e-7], (23, 1))
    p = query_expert(_Fixed(out), X, "rounding")
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_query_expert_rejects_empty_or_duplicate_labels():
    with pytest.raises(ExpertOutputError, match=r"expert 'nolab'.*no labels"):
        query_expert(_Fixed(np.zeros((23, 0)), labels=()), X, "nolab")
    with pytest.raises(ExpertOutputError, match=r"expert 'dup'.*\['a'\].*more than once"):
        query_expert(_Fixed(np.full((23, 3), 1 / 3), labels=("a", "b", "a")), X, "dup")


def test_query_expert_rejects_non_numeric_output():
    with pytest.raises(ExpertOutputError, match=r"expert 'text'.*not a numeric array"):
        query_expert(_Fixed([["x", "y", "z"]] * 23), X, "text")


def test_sklearn_labels_must_follow_classes_order_unless_renamed():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.random((40, 3))
    est = LogisticRegression().fit(x, np.where(x[:, 0] > 0.5, 7, 4))  # classes_ [4, 7]
    with pytest.raises(ValueError, match="order of classes_"):
        SklearnExpert(est, ["7", "4"])
    assert SklearnExpert(est, ["4", "7"]).labels == ("4", "7")
    assert SklearnExpert(est, ["cat", "dog"]).labels == ("cat", "dog")


def test_an_expert_that_raises_is_named():
    import torch

    expert = TorchExpert(torch.nn.Linear(5, 2), ["a", "b"])
    with pytest.raises(ExpertOutputError, match=r"'lin'.*shape \(3, 4\)"):
        query_expert(expert, np.zeros((3, 4), dtype=np.float32), "lin")
