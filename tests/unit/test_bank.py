"""The bank interface and its artifacts: both families adapt, save, load and refuse bad files."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toys import answers, clusters, two_experts

from protofuse import artifacts
from protofuse.adapted import from_files, load_adapted
from protofuse.artifacts import ArtifactError
from protofuse.bank import Bank, _diverged, bank_meta, fit_bank, load_bank
from protofuse.bank_meta import BankMeta, BankMetaError, FederationRecord
from protofuse.families.generative import expert_distribution
from protofuse.protocol.federation import decode_distribution, encode_distribution
from protofuse.settings import (
    AdaptSettings,
    FederationSettings,
    ModelSettings,
    PrivacySettings,
    TrainingSettings,
)
from protofuse.triples import assemble

torch.set_num_threads(1)


# What an adapted model keeps of its bank (BankMeta.identity): enough to rebuild and trace it.
IDENTITY = {"family", "config", "x_dim", "label_names", "image_shape", "likelihood"}
IDENTITY |= {"input_range", "version"}


def _toy_triples(seed: int = 0):
    """Four separable clusters; expert a knows 0/1/2, expert b knows 2/3."""
    x, y, _ = clusters(seed)
    return two_experts(x, y), x, y


@pytest.fixture(scope="module", params=["discriminative", "generative"])
def bank(request):
    triples, _, _ = _toy_triples()
    epochs = 12 if request.param == "discriminative" else 30
    return fit_bank(
        triples,
        ModelSettings(family=request.param, feat_dim=8, hidden=32),
        TrainingSettings(epochs=epochs, lr=5e-3),
        AdaptSettings(n_z=8),
        None,
        "bernoulli",
    )


def _support(x, y, classes, k, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False) for c in classes])
    return x[idx], y[idx].astype(str)


def test_adapted_model_follows_sklearn_conventions(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [1, 3], 5)  # a task no single expert covers
    model = bank.adapt(sx, sy)
    assert model.classes_.tolist() == ["1", "3"]
    keep = np.isin(y, [1, 3])
    proba = model.predict_proba(x[keep])
    assert proba.shape == (keep.sum(), 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(model.predict(x[keep]), model.classes_[proba.argmax(1)])
    if bank.family == "discriminative":
        # The generative family's accuracy on this toy depends on the training seed (0.43 to 1.0
        # over seeds 0-5): asserting it here would pass by seed luck. The benchmark measures it.
        assert (model.predict(x[keep]) == y[keep].astype(str)).mean() > 0.8


def test_bank_and_adapted_model_round_trip_exactly(bank, tmp_path):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [0, 3], 3)
    version = bank.save(tmp_path / "bank")
    model = bank.adapt(sx, sy)
    loaded = load_bank(tmp_path / "bank")
    assert loaded.version == version == bank.version
    assert [e.name for e in loaded.experts] == ["a", "b"]
    for (k1, v1), (k2, v2) in zip(
        bank.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    np.testing.assert_array_equal(
        loaded.adapt(sx, sy).predict_proba(x[:50]), model.predict_proba(x[:50])
    )
    model.save(tmp_path / "model")
    again = load_adapted(tmp_path / "model", unsigned_ok=True)
    assert again.classes_.tolist() == model.classes_.tolist()
    assert again.bank_meta["version"] == version
    np.testing.assert_array_equal(again.predict_proba(x[:50]), model.predict_proba(x[:50]))
    # the same folder as bytes, as the adaptation service sends it
    files = model.to_files()
    assert files == {f: (tmp_path / "model" / f).read_bytes() for f in ("weights.npz", "meta.json")}
    sent = from_files(files, unsigned_ok=True)
    with pytest.warns(FutureWarning, match="loaded without verifying who made it"):
        from_files(files)  # neither a key nor unsigned_ok: loaded, with a warning for now
    np.testing.assert_array_equal(sent.predict_proba(x[:50]), model.predict_proba(x[:50]))


def test_tampered_or_mismatched_artifacts_are_refused(bank, tmp_path):
    bank.save(tmp_path / "bank")
    weights = tmp_path / "bank" / "weights.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        load_bank(tmp_path / "bank")
    with pytest.raises(
        ArtifactError,
        match="holds a 'protofuse-bank' artifact, expected a 'protofuse-adapted-model'",
    ):
        bank.save(tmp_path / "bank2")
        load_adapted(tmp_path / "bank2", unsigned_ok=True)
    meta_path = tmp_path / "bank2" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_bank(tmp_path / "bank2")
    with pytest.raises(ArtifactError, match="no such"):
        load_bank(tmp_path / "missing")


def test_bad_support_sets_and_inputs_get_clear_errors(bank):
    _, x, _ = _toy_triples()
    with pytest.raises(ValueError, match="at least 2 classes"):
        bank.adapt(x[:5], np.array(["1"] * 5))
    with pytest.raises(ValueError, match=r"expected \(n, 16\)"):
        bank.adapt(x[:4, :10], np.array(["0", "1", "0", "1"]))
    with pytest.raises(ValueError, match="one label name per support example"):
        bank.adapt(x[:4], np.array(["0", "1"]))
    bad = x[:4].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bank.adapt(bad, np.array(["0", "1", "0", "1"]))
    with pytest.raises(ValueError, match="dtype <U3, expected real numbers"):
        bank.adapt(np.full((4, 16), "abc"), np.array(["0", "1", "0", "1"]))


def test_a_familys_adapt_is_its_scored_adaptation_without_the_scores(bank):
    # Bank.adapt goes through adapt_scored; adapt is the interface every family implements too
    _, x, y = _toy_triples()
    xs = torch.as_tensor(x[:16], dtype=torch.float32)
    classes = sorted({str(v) for v in y[:16]})
    ys = torch.tensor([classes.index(str(v)) for v in y[:16]])
    settings = bank.meta.settings.adapt
    task = bank.family_impl.adapt(bank, xs, ys, classes, settings, 3)
    scored, support = bank.family_impl.adapt_scored(bank, xs, ys, classes, settings, 3)
    with torch.no_grad():
        torch.testing.assert_close(task.log_proba(xs), support)
        torch.testing.assert_close(scored.log_proba(xs), support)
    assert task.n_classes == len(classes)


def test_uncovered_labels(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [0, 3], 5)
    sy = np.where(sy == "3", "new", sy)  # a label no expert knows
    if bank.family == "generative":
        with pytest.raises(ValueError, match="covered by no expert"):
            bank.adapt(sx, sy)
        return
    model = bank.adapt(sx, sy)
    keep = np.isin(y, [0, 3])
    truth = np.where(y[keep] == 3, "new", y[keep].astype(str))
    assert (model.predict(x[keep]) == truth).mean() > 0.9


def test_zero_shot_uses_no_examples(bank):
    _, x, y = _toy_triples()
    model = bank.zero_shot(["0", "3"])
    keep = np.isin(y, [0, 3])
    proba = model.predict_proba(x[keep])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    if bank.family == "discriminative":  # the generative family's zero-shot is weak on toy data
        assert (model.predict(x[keep]) == y[keep].astype(str)).mean() > 0.9


def test_a_poor_expert_gets_less_weight_than_its_peers():
    """Expert 'liar' covers the same labels as 'a' but swaps 0 and 1 on most inputs."""
    triples, x, y = _toy_triples()
    rng = np.random.default_rng(1)
    eye = np.eye(4, dtype=np.float32)[y] + 0.01
    lies = eye[:, [0, 1, 2]].copy()
    swap = rng.random(len(y)) < 0.6
    lies[swap] = lies[swap][:, [1, 0, 2]]
    lies /= lies.sum(1, keepdims=True)
    outs = [triples.eta[:, 0][:, :3], triples.eta[:, 1][:, [2, 3]], lies]
    names, labels = ["a", "b", "liar"], [("0", "1", "2"), ("2", "3"), ("0", "1", "2")]
    fed = assemble(names, labels, [x, x, x], outs, shared=[0, 0, 0])
    bank = fit_bank(
        fed,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=12, lr=5e-3),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    weight = {e.name: e.weight for e in bank.experts}
    consensus = {e.name: e.consensus for e in bank.experts}
    assert consensus["liar"] < consensus["a"] - 0.2
    assert weight["liar"] < 0.6 < weight["a"]
    off = fit_bank(
        fed,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=12, lr=5e-3, reweight=False),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    assert {e.weight for e in off.experts} == {1.0}


def test_edited_metadata_is_refused(bank, tmp_path):
    bank.save(tmp_path / "bank")
    meta_path = tmp_path / "bank" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["label_names"] = list(reversed(meta["label_names"]))  # would silently swap every class
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="checksum"):
        load_bank(tmp_path / "bank")


def test_saving_over_an_artifact_replaces_it_whole(bank, tmp_path):
    first = bank.save(tmp_path / "bank")
    second = bank.save(tmp_path / "bank")
    assert first == second and load_bank(tmp_path / "bank").version == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no staging folders left behind


def test_predictions_do_not_depend_on_the_rest_of_the_batch(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [1, 3], 3)
    model = bank.adapt(sx, sy)
    together = model.predict_proba(x[:40])
    alone = np.concatenate([model.predict_proba(x[i : i + 1]) for i in range(40)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert model.predict_proba(x[:0]).shape == (0, 2)


def test_adaptation_options_are_validated(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [1, 3], 3)
    with pytest.raises(ValueError, match="recompose"):
        bank.adapt(sx, sy, recompose="gausian")
    with pytest.raises(ValueError, match="typo_field"):
        bank.adapt(sx, sy, typo_field=3)
    with pytest.raises(ValueError, match="as strings"):
        bank.adapt(sx, sy.astype(float))


def test_labels_no_expert_compares_are_ranked_with_or_without_distillation(tmp_path):
    triples, x, y = _toy_triples()
    keep = np.isin(y, [0, 3])  # 0 and 3 never share an expert: only the bank relates them
    for train in (
        TrainingSettings(epochs=12, lr=5e-3),
        TrainingSettings(epochs=12, lr=5e-3, distill=0.0, reweight=False),
    ):
        bank = fit_bank(
            triples, ModelSettings(feat_dim=8), train, AdaptSettings(), None, "bernoulli"
        )
        assert (bank.zero_shot(["0", "3"]).predict(x[keep]) == y[keep].astype(str)).mean() > 0.95
    bank.save(tmp_path / "bank")
    assert load_bank(tmp_path / "bank").meta.settings.training.distill == 0.0


def test_one_epoch_of_training_works_with_reweighting():
    triples, _, _ = _toy_triples()
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    assert [e.weight for e in bank.experts] == [1.0, 1.0]


def test_adapted_models_say_how_they_were_fitted_and_keep_it_on_disk(bank, tmp_path):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [1, 3], 2)
    model = bank.adapt(sx, sy)
    expected_method = "map" if bank.family == "discriminative" else "mixture"
    assert (
        model.info["method"] == expected_method
        and model.info["n_support"] == 4
        and model.info["uncovered_labels"] == []
    )
    assert model.info["options"] == bank.adapt_settings.model_dump()
    assert bank.zero_shot(["1", "3"]).info == {"method": "zero-shot", "n_support": 0}
    model.save(tmp_path / "model")
    assert load_adapted(tmp_path / "model", unsigned_ok=True).info == json.loads(
        json.dumps(model.info)
    )
    assert model.classes_.dtype.kind == "U" and model.predict(x[:3]).dtype.kind == "U"


def test_expert_records_survive_a_round_trip(bank, tmp_path):
    bank.save(tmp_path / "bank")
    loaded = load_bank(tmp_path / "bank")
    assert len(loaded.experts) == len(bank.experts)
    for a, b in zip(loaded.experts, bank.experts, strict=True):
        assert (a.name, a.labels, a.n_queries, a.weight, a.fidelity.n) == (
            b.name,
            b.labels,
            b.n_queries,
            b.weight,
            b.fidelity.n,
        )
        np.testing.assert_allclose(
            [a.fidelity.agreement, a.fidelity.kl, a.consensus],
            [b.fidelity.agreement, b.fidelity.kl, b.consensus],
            equal_nan=True,
        )
    assert [e.n_queries for e in loaded.experts] == [400, 400] and loaded.experts[0].labels == (
        "0",
        "1",
        "2",
    )
    if bank.family == "generative":
        for e in bank.experts:
            for source in ("prior", "posterior"):
                d, again = (
                    expert_distribution(bank, e.name, source),
                    expert_distribution(loaded, e.name, source),
                )
                assert d.mean.shape == (2,) and d.cov.shape == (2, 2)
                torch.testing.assert_close(again.mean, d.mean)


def test_square_inputs_are_rows_not_one_flattened_example(bank):
    _, x, y = _toy_triples()
    model = bank.adapt(*_support(x, y, [1, 3], 2))
    square = x[:16]  # as many rows as features: still 16 examples
    assert model.predict_proba(square).shape == (16, 2)
    np.testing.assert_allclose(
        model.predict_proba(x[0]), model.predict_proba(x[:1]), atol=1e-6
    )  # one 1-D row is one example


def test_generative_recomposition_follows_the_requested_form():
    triples, x, y = _toy_triples()
    bank = fit_bank(
        triples,
        ModelSettings(family="generative", hidden=16),
        TrainingSettings(epochs=3),
        AdaptSettings(n_z=4),
        None,
        "bernoulli",
    )
    sx, sy = _support(x, y, [1, 3], 2)
    gaussian = bank.adapt(sx, sy, recompose="gaussian", seed=1).task.q
    mixture = bank.adapt(sx, sy, recompose="mixture", seed=1).task.q
    assert gaussian.w.shape == (32, 2) and torch.allclose(
        gaussian.log_weights, torch.full((32,), -math.log(32))
    )
    assert mixture.w.shape == (
        8 * (len(bank.experts) + 1),
        2,
    )  # the bank's experts and the task prior
    for q in (gaussian, mixture, bank.zero_shot(["1", "3"]).task.q):
        assert torch.logsumexp(q.log_weights, 0).item() == pytest.approx(0.0, abs=1e-5)
    torch.testing.assert_close(
        bank.adapt(sx, sy, recompose="gaussian", seed=1).task.q.w, gaussian.w
    )
    assert not torch.equal(bank.adapt(sx, sy, recompose="gaussian", seed=2).task.q.w, gaussian.w)
    torch.testing.assert_close(
        bank.zero_shot(["1", "3"]).task.q.w, bank.zero_shot(["1", "3"]).task.q.w
    )
    # The zero-shot prototypes come from the task's own prior p(w | tau*), not another task's.
    assert not torch.allclose(
        bank.zero_shot(["1", "3"]).task.q.w, bank.zero_shot(["0", "2"]).task.q.w
    )


def test_weights_that_do_not_match_their_configuration_name_the_folder(tmp_path):
    triples, _, _ = _toy_triples()
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    bank.save(tmp_path / "bank")
    arrays, meta = artifacts.load(tmp_path / "bank", "protofuse-bank")
    meta["config"]["feat_dim"] = 16  # a well-formed, checksummed artifact whose weights are 8-wide
    meta.pop("sha256")
    artifacts.save(
        tmp_path / "odd",
        "protofuse-bank",
        arrays,
        {k: v for k, v in meta.items() if k not in ("kind", "format_version")},
    )
    with pytest.raises(
        ArtifactError, match=r"odd: weights do not match the recorded discriminative configuration"
    ):
        load_bank(tmp_path / "odd")
    meta.pop("experts")
    artifacts.save(
        tmp_path / "partial",
        "protofuse-bank",
        arrays,
        {k: v for k, v in meta.items() if k not in ("kind", "format_version")},
    )
    with pytest.raises(ArtifactError, match=r"partial: bank metadata is incomplete or malformed"):
        load_bank(tmp_path / "partial")


def _resaved(src, dst, edit):
    """The bank at ``src`` re-saved at ``dst`` with its meta.json edited and a valid checksum."""
    arrays, meta = artifacts.load(src, "protofuse-bank")
    edit(meta)
    artifacts.save(
        dst,
        "protofuse-bank",
        arrays,
        {k: v for k, v in meta.items() if k not in ("kind", "format_version", "sha256")},
    )
    return dst


def test_bank_meta_round_trips_through_save_and_load_typed_and_in_the_json_shape_of_before(
    bank, tmp_path
):
    version = bank.save(tmp_path / "bank")
    loaded = load_bank(tmp_path / "bank")
    assert (
        loaded.meta == bank.meta
        and loaded.meta.version == version
        and loaded.meta.sha256.startswith(version)
    )
    meta = loaded.meta
    assert (
        isinstance(meta, BankMeta)
        and isinstance(meta.settings.training, TrainingSettings)
        and isinstance(meta.settings.adapt, AdaptSettings)
    )
    assert (
        meta.label_names == ("0", "1", "2", "3")
        and meta.x_dim == meta.config["x_dim"]
        and meta.federation is None
        and meta.federated_rounds == 0
    )
    assert meta.input_range is not None and meta.input_range[0] < meta.input_range[1]
    on_disk = json.loads((tmp_path / "bank" / "meta.json").read_text())
    envelope = {"kind", "format_version", "sha256", "experts", "settings"}
    assert set(on_disk) == envelope | IDENTITY - {"version"}
    assert (
        set(on_disk["settings"]) == {"model", "training", "adapt"}
        and on_disk["image_shape"] is None
    )
    assert {k: on_disk[k] for k in meta.to_json()} == meta.to_json()
    with pytest.warns(
        DeprecationWarning, match=r"bank.meta.x_dim"
    ):  # the dict it was, still readable
        assert loaded.meta["x_dim"] == meta.x_dim
    with pytest.warns(DeprecationWarning):
        assert loaded.meta.get("federation") is None and loaded.meta.get("sha256") == meta.sha256


def test_metadata_errors_read_as_plain_sentences_and_old_dict_access_warns(bank):
    record = {**bank.meta.to_json(), "label_names": ["0", "0", "1", "2"], "colour": "red"}
    with pytest.raises(BankMetaError) as error:
        BankMeta.from_json(record)
    lines = str(error.value).splitlines()[1:]
    assert sorted(lines) == [
        "  colour: unknown field (written by a newer protofuse?)",
        "  label_names: lists ['0'] more than once; each label appears once",
    ]
    with pytest.warns(DeprecationWarning) as caught:
        assert bank.meta["version"] == bank.meta.version
        assert bank.meta.get("colour", "none") == "none"
    assert all("is deprecated: bank.meta is a BankMeta now" in str(w.message) for w in caught)


def test_a_federated_banks_meta_round_trips_and_a_bank_before_input_checks_still_loads(tmp_path):
    triples, _, _ = _toy_triples()
    fitted = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    federation = FederationRecord(
        rounds=3, weights_digest="ab" * 32, settings=FederationSettings(rounds=3)
    )
    meta = bank_meta(
        "discriminative",
        fitted.meta.config,
        fitted.label_names,
        [2, 2],
        "gaussian",
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        federation=federation,
    )
    Bank(fitted.model, meta, fitted.experts).save(tmp_path / "fed")
    loaded = load_bank(tmp_path / "fed")
    assert (
        loaded.meta.federation == federation
        and loaded.meta.federated_rounds == 3
        and loaded.meta.image_shape == (2, 2)
    )
    assert loaded.meta.input_range is None
    assert "input_range" not in json.loads(
        (tmp_path / "fed" / "meta.json").read_text()
    )  # absent, as before it existed
    assert (
        json.loads((tmp_path / "fed" / "meta.json").read_text())["federation"]["settings"]["rounds"]
        == 3
    )
    with pytest.raises(TypeError, match="meta must be a BankMeta"):
        Bank(fitted.model, meta.to_json(), fitted.experts)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m.update(x_dim="wide"), "x_dim"),
        (lambda m: m.pop("label_names"), "label_names"),
        (lambda m: m["settings"]["training"].update(lr=-1), "settings.training.lr"),
        (lambda m: m["settings"]["adapt"].update(colour="red"), "settings.adapt.colour"),
        (lambda m: m.update(input_range=[0.0]), r"input_range\[1\]"),
        (lambda m: m.update(label_names=["0", "0", "1", "2"]), "label_names"),
        (
            lambda m: m.update(
                federation={"rounds": -1, "weights_digest": "ab" * 32, "settings": {}}
            ),
            "federation.rounds",
        ),
        (lambda m: m.update(x_dim=m["x_dim"] + 1), "x_dim"),
        (lambda m: m["experts"][1].pop("fidelity"), r"experts\[1\].fidelity"),
    ],
)
def test_a_malformed_meta_field_is_refused_by_name(tmp_path, edit, field):
    triples, _, _ = _toy_triples()
    fitted = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    fitted.save(tmp_path / "bank")
    with pytest.raises(
        ArtifactError,
        match=rf"odd: bank metadata is incomplete or malformed in meta.json:\n  {field}: ",
    ) as error:
        load_bank(_resaved(tmp_path / "bank", tmp_path / "odd", edit))
    assert "re-create it with `protofuse fit`" in str(error.value)
    assert (
        error.value.__cause__ is None and error.value.__suppress_context__
    )  # a message, not a pydantic traceback


def test_families_see_the_bank_through_bank_view_only(bank):
    """No family imports the bank or the adapted model, not even for the type checker; a stand-in
    holding only BankView's members is all a family needs."""
    import ast
    from pathlib import Path
    from types import SimpleNamespace

    import protofuse.families

    for file in Path(protofuse.families.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in (
                    "bank",
                    "adapted",
                    "protofuse.bank",
                    "protofuse.adapted",
                ), f"{file.name} imports {node.module}"
    members = ("model", "label_names", "meta", "experts", "distributions", "covered_indices")
    view = SimpleNamespace(**{m: getattr(bank, m) for m in members})
    impl = bank.family_impl
    _, x, _ = _toy_triples()
    task = impl.zero_shot(view, ["0", "3"], bank.adapt_settings)
    with torch.no_grad():
        torch.testing.assert_close(
            task.log_proba(torch.from_numpy(x[:5])),
            bank.zero_shot(["0", "3"]).task.log_proba(torch.from_numpy(x[:5])),
        )
    assert impl.describe_expert(view, 1) == impl.describe_expert(bank, 1)
    described = impl.describe_expert(bank, 1)  # what ListExperts sends: a valid wire message
    assert (described.pseudonym, described.label_names) == ("b", ("2", "3"))
    assert decode_distribution(encode_distribution(described)) == described
    assert described.round == 0  # fitted centrally: no federation round made it
    if bank.family == "generative":  # both of the expert's distributions, each its own
        assert described.head.prior != described.head.posterior
    record = FederationRecord(rounds=7, weights_digest="ab" * 32, settings=FederationSettings())
    view.meta = bank.meta.model_copy(update={"federation": record})
    assert impl.describe_expert(view, 1).round == 7  # every family: the rounds that made it


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reweighting_lets_the_honest_expert_win_where_a_liar_disagrees(seed):
    """The liar swaps 0 and 1 on 60% of its answers. With reweighting its answers count for
    less, so the bank separates 0 from 1 by a clearly wider margin than without."""
    triples, x, y = _toy_triples(seed)
    rng = np.random.default_rng(seed + 1)
    lies = (np.eye(4, dtype=np.float32)[y] + 0.01)[:, [0, 1, 2]]
    swap = rng.random(len(y)) < 0.6
    lies[swap] = lies[swap][:, [1, 0, 2]]
    lies /= lies.sum(1, keepdims=True)
    fed = assemble(
        ["a", "b", "liar"],
        [("0", "1", "2"), ("2", "3"), ("0", "1", "2")],
        [x, x, x],
        [triples.eta[:, 0][:, :3], triples.eta[:, 1][:, [2, 3]], lies],
        shared=[0, 0, 0],
    )
    keep = np.isin(y, [0, 1])
    sign = torch.from_numpy(np.where(y[keep] == 0, 1.0, -1.0)).float()

    def margin(reweight: bool) -> float:
        bank = fit_bank(
            fed,
            ModelSettings(feat_dim=8),
            TrainingSettings(epochs=12, lr=5e-3, reweight=reweight, seed=seed),
            AdaptSettings(),
            None,
            "bernoulli",
        )
        logits = bank.model.logits(bank.model.embed(torch.from_numpy(x[keep])))
        return (
            (
                (logits[:, bank.label_names.index("0")] - logits[:, bank.label_names.index("1")])
                * sign
            )
            .mean()
            .item()
        )

    assert margin(True) > 1.2 * margin(False) > 0


def test_integer_support_labels_name_their_classes(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [1, 3], 3)
    model = bank.adapt(sx, sy.astype(np.int64))
    assert model.classes_.tolist() == ["1", "3"]
    np.testing.assert_allclose(
        model.predict_proba(x[:5]), bank.adapt(sx, sy).predict_proba(x[:5]), atol=1e-6
    )


def test_labels_no_expert_covers_get_the_fix_for_the_family(bank):
    fix = (
        "give examples with bank.adapt"
        if bank.family == "discriminative"
        else "use the discriminative family"
    )
    with pytest.raises(
        ValueError, match=rf"labels \['new'\] are covered by no expert in this bank .*; {fix}"
    ):
        bank.zero_shot(["0", "new"])


def test_an_unsaved_bank_says_so_and_describes_itself(bank):
    triples, _, _ = _toy_triples()
    fresh = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    assert fresh.version == "unsaved"
    assert repr(fresh) == (
        "Bank(family='discriminative', labels=['0', '1', '2', '3'], experts=['a', 'b'], "
        "version='unsaved')"
    )
    assert (
        repr(fresh.zero_shot(["0", "3"]))
        == "AdaptedModel(family='discriminative', classes=['0', '3'])"
    )


def test_generative_banks_store_each_experts_two_distributions(tmp_path):
    """Built here, not from the shared fixture, so that the bank's construction is part of this
    test (mutation testing maps code to the tests that call it)."""
    triples, _, _ = _toy_triples()
    bank = fit_bank(
        triples,
        ModelSettings(family="generative", hidden=8),
        TrainingSettings(epochs=1),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    bank.save(tmp_path / "bank")
    loaded = load_bank(tmp_path / "bank")
    for e in bank.experts:
        for source in ("prior", "posterior"):
            d = expert_distribution(bank, e.name, source)
            assert d.mean.shape == (2,) and d.cov.shape == (2, 2) and torch.isfinite(d.cov).all()
            torch.testing.assert_close(expert_distribution(loaded, e.name, source).cov, d.cov)
    assert not torch.allclose(
        expert_distribution(bank, "a", "prior").mean,
        expert_distribution(bank, "a", "posterior").mean,
    )


def test_an_expert_whose_queries_are_all_held_out_keeps_its_prior():
    """Expert b answered one query; when the held-out split takes it, b has no training input and
    its data-driven distribution falls back to the prior network's (not a NaN from no data)."""
    triples, x, _ = _toy_triples()
    one = np.eye(2, dtype=np.float32)[[0]] * 0.98 + 0.01
    fed = assemble(
        ["a", "b"], [("0", "1", "2"), ("2", "3")], [x, x[:1]], [triples.eta[:, 0, :3], one]
    )
    seed = next(
        s for s in range(100) if 400 in fed.split_indices(0.1, s)[1]
    )  # b's only row is row 400
    bank = fit_bank(
        fed,
        ModelSettings(family="generative", hidden=8),
        TrainingSettings(epochs=1, seed=seed),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    prior, posterior = (
        expert_distribution(bank, "b", "prior"),
        expert_distribution(bank, "b", "posterior"),
    )
    torch.testing.assert_close(posterior.mean, prior.mean)
    torch.testing.assert_close(posterior.cov, prior.cov)


def test_support_accuracy_is_the_adapted_models_own_accuracy_on_its_examples(bank):
    _, x, y = _toy_triples()
    sx, sy = _support(x, y, [0, 1, 3], 4)
    model = bank.adapt(sx, sy)
    assert model.info["support_accuracy"] == pytest.approx(float(np.mean(model.predict(sx) == sy)))


def test_a_run_folder_loads_the_bank_it_holds(bank, tmp_path):
    """`protofuse adapt RUN` works on a federation's run folder, whose bank is in bank/."""
    version = bank.save(tmp_path / "run" / "bank")
    assert load_bank(tmp_path / "run").version == version


@pytest.mark.parametrize(
    "edit, says",
    [
        (lambda m: m.update(sha256="0" * 64), "checksum mismatch"),
        (lambda m: m["bank"].update(config={**m["bank"]["config"], "feat_dim": 3}), "weights do"),
        (lambda m: m.pop("task"), "adapted model lacks or garbles 'task'"),
        (lambda m: m.update(classes=m["classes"][:1] * 2), "more than once"),
        (lambda m: m.update(classes=[*m["classes"], "extra"]), "3 class names for a task of 2"),
        (lambda m: m.update(classes=["", *m["classes"][1:]]), "'classes'"),
        (lambda m: m.update(classes=["x" * 257, *m["classes"][1:]]), "'classes'"),
        (lambda m: m["bank"].update(x_dim=-1), "'bank'"),
        # a forged config asking for networks of 10**12 weights: refused on torch's meta device,
        # before anything is allocated
        (
            lambda m: m["bank"].update(config={**m["bank"]["config"], "x_dim": 10**6}),
            "weights do not match",
        ),
    ],
)
def test_an_adapted_model_from_bytes_names_its_source(bank, edit, says):
    _, x, y = _toy_triples()
    files = bank.adapt(*_support(x, y, [0, 3], 2)).to_files()
    meta = json.loads(files["meta.json"])
    edit(meta)
    if meta.get("sha256") != "0" * 64:
        meta["sha256"] = artifacts.checksum(files["weights.npz"], meta)
    files = {**files, "meta.json": json.dumps(meta).encode()}
    with pytest.raises(ArtifactError) as err:
        from_files(files, unsigned_ok=True, source="reply of service:50051")
    assert str(err.value).startswith("reply of service:50051: ") and says in str(err.value)


def test_what_an_adapted_model_keeps_of_its_bank_is_plain_json_with_exactly_its_identity(bank):
    identity = bank.meta.identity()
    assert set(identity) == IDENTITY
    assert identity["image_shape"] is None and identity["version"] == bank.version
    assert json.loads(json.dumps(identity)) == identity  # lists, not tuples: as loaded from disk
    assert identity["label_names"] == list(bank.label_names)
    no_range = bank.meta.model_copy(update={"input_range": None})
    assert "input_range" not in no_range.identity() and "image_shape" in no_range.identity()


def test_the_banks_json_metadata_leaves_the_envelope_to_the_artifact(bank):
    meta = bank.meta.model_copy(update={"sha256": "ab" * 32})
    assert "sha256" not in meta.to_json() and "version" not in meta.to_json()


def test_expert_trust_survives_a_round_trip(bank, tmp_path):
    experts = [replace(e, weight=w) for e, w in zip(bank.experts, (0.25, 0.75), strict=True)]
    Bank(bank.model, bank.meta, experts, bank.distributions).save(tmp_path / "bank")
    assert [e.weight for e in load_bank(tmp_path / "bank").experts] == [0.25, 0.75]


def test_a_bank_trains_for_as_many_epochs_as_its_data_calls_for():
    """With no epochs set, the count follows the number of training inputs (not its fallback)."""
    triples, _, _ = _toy_triples()
    training = TrainingSettings(lr=5e-3)
    seen: list[int] = []

    class Stop(Exception):
        pass

    def first_epoch(epoch: int, epochs: int, loss: float) -> None:
        seen.append(epochs)
        raise Stop

    with pytest.raises(Stop):
        fit_bank(
            triples,
            ModelSettings(feat_dim=8),
            training,
            AdaptSettings(),
            None,
            "bernoulli",
            first_epoch,
        )
    n_train = len(triples.split(training.holdout, training.seed)[0].x)
    assert seen == [training.resolved_epochs("discriminative", n_train)]
    assert seen[0] != training.resolved_epochs("discriminative")


def test_without_held_out_queries_fidelity_is_unmeasured():
    triples, _, _ = _toy_triples()
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=1, holdout=0.0),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    assert [e.fidelity.n for e in bank.experts] == [0, 0]
    assert all(math.isnan(e.fidelity.agreement) for e in bank.experts)


def test_a_generative_bank_records_the_settings_and_image_shape_it_was_fitted_with():
    triples, _, _ = _toy_triples()  # 16 features: a 4 x 4 image
    bank = fit_bank(
        triples,
        ModelSettings(family="generative", feat_dim=8, hidden=32, hide_eta=0.25, lam=0.5),
        TrainingSettings(epochs=1),
        AdaptSettings(n_z=4),
        (4, 4),
        "bernoulli",
    )
    config = bank.meta.config
    assert (config["hide_eta"], config["lam"], tuple(config["image_shape"])) == (0.25, 0.5, (4, 4))
    assert bank.model.cfg.hide_eta == 0.25


def test_a_generative_model_keeps_its_sampling_seed_on_disk(bank, tmp_path):
    if bank.family != "generative":
        pytest.skip("the discriminative family samples nothing at prediction")
    _, x, y = _toy_triples()
    model = bank.adapt(*_support(x, y, [0, 3], 3), seed=5)
    model.save(tmp_path / "model")
    again = load_adapted(tmp_path / "model", unsigned_ok=True)
    np.testing.assert_array_equal(again.predict_proba(x[:20]), model.predict_proba(x[:20]))


def test_zero_shot_samples_as_many_latents_as_the_settings_say(bank):
    if bank.family != "generative":
        pytest.skip("the discriminative family samples nothing at prediction")
    assert bank.zero_shot(["0", "3"], n_z=4).task.n_z == 4
    assert bank.zero_shot(["0", "3"]).task.n_z == bank.adapt_settings.n_z == 8


def test_an_expert_with_one_label_contributes_and_the_bank_stays_finite():
    """Its answers are always that label: its agreement with any consensus says nothing (chance
    is 1), so it is weighed as unmeasured rather than turning every weight into 0 / 0."""
    _, x, y = _toy_triples()
    one = np.ones((len(x), 1), np.float32)
    triples = assemble(
        ["a", "b", "solo"],
        [("0", "1", "2"), ("2", "3"), ("3",)],
        [x, x, x[y == 3]],
        [answers(y, [0, 1, 2]), answers(y, [2, 3]), one[y == 3]],
        shared=[0, 0, 1],
    )
    bank = fit_bank(
        triples,
        ModelSettings(feat_dim=8),
        TrainingSettings(epochs=4),
        AdaptSettings(),
        None,
        "bernoulli",
    )
    assert all(np.isfinite(e.weight) and 0 < e.weight <= 1 for e in bank.experts)
    assert all(
        torch.isfinite(v).all() for v in bank.model.state_dict().values() if v.is_floating_point()
    )
    sx, sy = _support(x, y, [0, 3], 3)
    assert (
        bank.adapt(sx, sy).predict(x[np.isin(y, [0, 3])]) == y[np.isin(y, [0, 3])].astype(str)
    ).mean() > 0.8


@given(
    scale=st.floats(1e-3, 3e38),
    sign=st.sampled_from([-1.0, 1.0]),
    noise_seed=st.integers(0, 2**16),
)
@settings(max_examples=25, deadline=None)
def test_support_inputs_of_any_finite_size_give_a_finite_model_or_a_clear_error(
    bank, scale, sign, noise_seed
):
    """Inputs far outside the bank's range once made L-BFGS overflow (a RuntimeError) or fitted
    NaN weights: adaptation now answers a finite model or a ValueError naming x."""
    _, x, y = _toy_triples()
    xs, ys = _support(x, y, [0, 3], 2, seed=noise_seed % 7)
    rng = np.random.default_rng(noise_seed)
    big = np.clip(sign * scale * rng.standard_normal(xs.shape), -3e38, 3e38).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inputs out of the bank's range warn first
        try:
            model = bank.adapt(big, ys)
        except ValueError as err:
            assert str(err).startswith("x: adaptation on these inputs diverged"), err
            return
        assert np.isfinite(model.predict_proba(xs)).all()
    model.to_files()  # finite: it can be written


def test_a_diverged_adaptation_on_a_dp_bank_names_the_bank_s_noise(bank):
    """A bank trained under differential privacy carries the run's noise and no input range: when
    adaptation diverges, the error says the noisy weights may be the cause and how to get a less
    noisy bank, not only that the inputs are out of range."""
    record = FederationRecord(
        rounds=40,
        weights_digest="ab" * 32,
        settings=FederationSettings(),
        privacy=PrivacySettings(mode="dp", epsilon=1.0),
        noise_multiplier=25.6,
        epsilon=0.99,
    )
    dp = Bank(bank.model, bank.meta.model_copy(update={"federation": record}), bank.experts)
    message = _diverged(dp, "(NaN or infinite weights)")
    assert message.startswith("x: adaptation on these inputs diverged")
    assert "differential privacy (epsilon 0.99, noise multiplier 25.6)" in message
    assert "larger [privacy] epsilon" in message
    assert "differential privacy" not in _diverged(bank, "(NaN or infinite weights)")


def _forged(files: dict[str, bytes], change) -> dict[str, bytes]:
    """An adapted model's files with some arrays changed and a valid checksum (unsigned)."""
    arrays = artifacts.npz_arrays(files["weights.npz"])
    change(arrays)
    data = artifacts.npz_bytes(arrays)
    meta = json.loads(files["meta.json"])
    meta["sha256"] = artifacts.checksum(data, meta)
    return {"weights.npz": data, "meta.json": json.dumps(meta).encode()}


def _weight_matrix(arrays):
    """The encoder's (decoder's) last weight matrix: after its batch norm, nothing rescales it."""
    return [
        k
        for k, v in arrays.items()
        if k.startswith(("bank.encoder", "bank.decoder")) and v.ndim >= 2
    ][-1]


def _first(arrays, prefix):
    return next(k for k, v in arrays.items() if k.startswith(prefix) and v.dtype.kind == "f")


@pytest.mark.parametrize(
    "change, says",
    [
        # float64 1e300 is finite on disk and infinite once torch casts it to float32
        (
            lambda a: a.update({(k := _first(a, "bank.")): np.full(a[k].shape, 1e300)}),
            "dtype torch.float64",
        ),
        # finite weights whose predictions overflow: refused by the probe prediction
        (lambda a: a[_weight_matrix(a)].fill(np.float32(3e38)), "NaN or infinite"),
        (
            lambda a: a.update({(k := _first(a, "task.")): a[k].astype(np.float64)}),
            "not float32",
        ),
    ],
)
def test_weights_that_load_but_cannot_predict_are_refused(bank, change, says):
    """Found by an attacker's review: the finite check ran on the stored dtype, before the cast
    to float32, so a model whose predictions are all NaN loaded."""
    _, x, y = _toy_triples()
    files = bank.adapt(*_support(x, y, [0, 3], 2)).to_files()
    forged = _forged(files, change)
    with pytest.raises(ArtifactError, match=says):
        from_files(forged, unsigned_ok=True, source="reply")
