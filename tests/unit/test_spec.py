"""The federation spec: validation errors name the field as it is written in the TOML file."""

from __future__ import annotations

import pytest

from protofuse.spec import SpecError, load_spec

GOOD = """
[[experts]]
name = "a"
predict = "experts:a"
labels = ["0", "1"]
queries = "q.npy"
"""


def _errors(tmp_path, text: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return str(info.value)


def test_a_good_spec_resolves_paths_beside_itself(tmp_path):
    (tmp_path / "spec.toml").write_text(GOOD)
    spec = load_spec(tmp_path / "spec.toml")
    assert (
        spec.folder == tmp_path.resolve()
        and spec.queries_path(spec.experts[0]) == (tmp_path / "q.npy").resolve()
    )


def test_errors_are_one_line_per_field_written_as_in_the_file(tmp_path):
    text = GOOD + (
        '\n[[experts]]\nname = "b"\npredict = "nocolon"\nlabels = ["x", "x"]\nqueries = '
        '"q.npy"\n\n[training]\nlr = -1\n'
    )
    message = _errors(tmp_path, text)
    lines = message.splitlines()
    assert lines[0].endswith("spec.toml: invalid spec")
    fields = sorted(line.split(":")[0].strip() for line in lines[1:])
    assert fields == ["experts[1].labels", "experts[1].predict", "training.lr"]
    # pydantic's "Value error, " prefix is dropped: the message starts with what is wrong.
    assert any(
        line.startswith("  experts[1].predict: 'nocolon' is not an import path") for line in lines
    )
    assert (
        "  experts[1].labels: labels ['x'] appear more than once; list each output column's label "
        "once" in lines
    )
    assert "  training.lr: Input should be greater than 0" in lines


def test_unknown_fields_and_reserved_names_are_refused_with_the_fix(tmp_path):
    assert (
        "  training.learning_rate: unknown field; check its spelling against the documented fields"
        in _errors(tmp_path, GOOD + "\n[training]\nlearning_rate = 0.1\n").splitlines()
    )
    assert "'folder' is not a spec field; paths are relative to the spec's own folder" in _errors(
        tmp_path, 'folder = "/x"\n' + GOOD
    )
    assert (
        "  experts: no [[experts]] table; describe at least one expert (name, predict or endpoint, "
        "labels, queries)" in _errors(tmp_path, "").splitlines()
    )
    duplicate = _errors(tmp_path, GOOD + GOOD).splitlines()  # a whole-spec rule has no single field
    assert duplicate[1] == (
        "  (top level): expert names ['a'] appear more than once; give each [[experts]] "
        "entry a unique name"
    )


def test_an_expert_is_an_import_path_or_a_model_server_never_both(tmp_path):
    served = (
        '[[experts]]\nname = "org"\nlabels = ["0", "1"]\nqueries = '
        '"q.npy"\n[experts.endpoint]\nprotocol = "open-inference"\nurl = '
        '"http://127.0.0.1:8080"\nmodel = "digits"\n'
    )
    (tmp_path / "spec.toml").write_text(served)
    entry = load_spec(tmp_path / "spec.toml").experts[0]
    assert (
        entry.predict is None and entry.endpoint.model == "digits" and entry.endpoint.retries == 3
    )
    both = served.replace('queries = "q.npy"', 'queries = "q.npy"\npredict = "m:f"')
    assert "give exactly one of predict" in _errors(tmp_path, both)
    assert "give exactly one of predict" in _errors(
        tmp_path, '[[experts]]\nname = "a"\nlabels = ["0"]\nqueries = "q.npy"\n'
    )
    assert "experts[0].endpoint: protocol 'open-inference' needs model" in _errors(
        tmp_path, served.replace('model = "digits"\n', "")
    )
    assert "experts[0].endpoint.url" in _errors(tmp_path, served.replace("http://", "ftp://"))


def test_the_server_reads_the_same_file_without_experts(tmp_path):
    (tmp_path / "server.toml").write_text(
        "[federation]\nrounds = 6\naggregation = 'fedavg'\n[data]\nimage_shape = [8, 8]\n"
    )
    spec = load_spec(tmp_path / "server.toml", experts_required=False)
    assert (
        spec.experts == []
        and spec.federation.rounds == 6
        and spec.federation.aggregation == "fedavg"
    )
    with pytest.raises(SpecError, match="no \\[\\[experts\\]\\] table"):
        load_spec(tmp_path / "server.toml")


def test_table_augmentation_is_set_in_the_training_table(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text(GOOD)
    default = load_spec(path).training
    assert (default.feature_dropout, default.feature_noise) == (None, None)  # the measured default
    path.write_text(GOOD + "\n[training]\nfeature_dropout = 0.1\nfeature_noise = 0.2\n")
    training = load_spec(path).training
    assert (training.feature_dropout, training.feature_noise) == (0.1, 0.2)
    assert (
        "  training.feature_dropout: Input should be less than 1"
        in _errors(tmp_path, GOOD + "\n[training]\nfeature_dropout = 1.0\n").splitlines()
    )


def test_normalization_auto_is_layer_norm_where_weights_leave_and_batch_norm_in_fit(tmp_path):
    from protofuse.families.discriminative import config_for
    from protofuse_server.fusion.server_app import run_key

    path = tmp_path / "server.toml"
    specs = {}
    for norm in ("auto", "layer", "batch"):
        path.write_text(f"[model]\nnormalization = '{norm}'\n")
        specs[norm] = load_spec(path, experts_required=False)
    path.write_text("[federation]\nrounds = 6\n")
    assert load_spec(path, experts_required=False).model.normalization == "auto"  # the default
    auto = specs["auto"].model
    assert (auto.resolved_normalization(True), auto.resolved_normalization(False)) == (
        "layer",
        "batch",
    )
    assert config_for(16, 3, 1, auto, None, federated=True).norm == "layer"
    assert config_for(16, 3, 1, auto, None).norm == "batch"  # central fit
    for norm in ("layer", "batch"):  # a normalization named is used everywhere
        assert config_for(16, 3, 1, specs[norm].model, None, federated=True).norm == norm
        assert config_for(16, 3, 1, specs[norm].model, None).norm == norm
    # A run resumes under the normalization its weights were built with, whatever its name.
    assert run_key(specs["auto"]) == run_key(specs["layer"]) != run_key(specs["batch"])
    with pytest.raises(
        SpecError, match="normalization: Input should be 'auto', 'batch' or 'layer'"
    ):
        path.write_text("[model]\nnormalization = 'group'\n")
        load_spec(path, experts_required=False)


def test_a_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"nowhere\.toml: no such spec file"):
        load_spec(tmp_path / "nowhere.toml")


def _number_fields() -> list[tuple[str, str]]:
    """(table, field) of every number a spec sets: each is bounded where it enters."""
    from protofuse.spec import Spec

    out = []
    for table in ("data", "model", "training", "adapt", "federation"):
        model = type(getattr(Spec(), table))
        for name, field in model.model_fields.items():
            text = str(field.annotation)
            if "float" in text or "int" in text:
                out.append((table, name))
    return out


@pytest.mark.parametrize(("table", "field"), _number_fields())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e308", "-1e308", "9223372036854775807"])
def test_every_number_of_a_spec_is_bounded_and_a_bad_one_named(tmp_path, table, field, value):
    """Infinite, NaN and absurd values never pass into a run: each is refused naming its field
    (or, where the field's range is unbounded by nature, like a seed, accepted as given)."""
    path = tmp_path / "spec.toml"
    path.write_text(GOOD + f"\n[{table}]\n{field} = {value}\n")
    try:
        spec = load_spec(path)
    except SpecError as err:
        assert f"{table}.{field}" in str(err), str(err)
        return
    got = getattr(getattr(spec, table), field)
    assert value not in ("inf", "-inf", "nan"), f"{table}.{field} = {value} was accepted"
    assert field in ACCEPTS_ANY_INTEGER, f"{table}.{field} = {value} was accepted as {got!r}"


# Fields where any integer is meaningful (a seed picks a stream; it is never computed with).
ACCEPTS_ANY_INTEGER = {"seed"}
