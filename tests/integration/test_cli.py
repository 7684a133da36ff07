"""The public command line: fit -> adapt -> predict on digits, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.demo import write_federation
from protofuse_cli.main import main


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fed")
    spec = write_federation(folder, "digits", k=5, seed=0)
    spec.write_text(spec.read_text() + "\n[training]\nepochs = 12\n")
    return folder


@pytest.fixture(scope="module")
def fitted(federation, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    assert main(["fit", str(federation / "spec.toml"), "--out", str(run / "bank")]) == 0
    return run


def test_fit_adapt_predict_reaches_clearly_above_chance(federation, fitted):
    run = fitted
    assert (
        main(
            [
                "adapt",
                str(run / "bank"),
                "--support",
                str(federation / "support.npz"),
                "--out",
                str(run / "model"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(run / "model"),
                "--inputs",
                str(federation / "test_x.npy"),
                "--out",
                str(run / "pred.npz"),
            ]
        )
        == 0
    )
    pred = np.load(run / "pred.npz", allow_pickle=False)
    truth = np.load(federation / "test_y.npy", allow_pickle=False)
    assert pred["proba"].shape == (len(truth), 5)
    assert sorted(pred["classes"].tolist()) == sorted(set(truth.tolist()))
    np.testing.assert_allclose(pred["proba"].sum(1), 1.0, atol=1e-5)
    accuracy = (pred["classes"][pred["proba"].argmax(1)] == truth).mean()
    assert accuracy > 0.8  # chance is 0.2 on this 5-way task


def test_info_lists_experts_and_fidelity(fitted, capsys):
    assert main(["info", str(fitted / "bank")]) == 0
    out = capsys.readouterr()
    assert "discriminative bank" in out.out
    assert "logreg" in out.err and "consensus" in out.err


def _run_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _spec(folder: Path, body: str) -> Path:
    path = folder / "spec.toml"
    path.write_text(body)
    return path


def test_malformed_specs_name_the_problem(federation, tmp_path, capsys):
    np.save(tmp_path / "queries.npy", np.load(federation / "queries.npy"))
    (tmp_path / "experts.py").write_text((federation / "experts.py").read_text())
    first = 'name = "a"\npredict = "experts:logreg"\nqueries = "queries.npy"\n'
    cases = {
        "experts[0].labels: Field required": f"[[experts]]\n{first}",
        "experts[0].labels: List should have at least 1 item": f"[[experts]]\n{first}labels = []\n",
        "appear more than once": f'[[experts]]\n{first}labels = ["0", "0"]\n',
        "experts[0].predict": (
            '[[experts]]\nname = "a"\npredict = "no_colon"\nlabels = ["0"]\nqueries = '
            '"queries.npy"\n'
        ),
        "experts[0].colour: unknown field": f'[[experts]]\n{first}labels = ["0"]\ncolour = 1\n',
        "training.epochs": f'[[experts]]\n{first}labels = ["0"]\n[training]\nepochs = -3\n',
        "training.max_rotation": (
            f'[[experts]]\n{first}labels = ["0"]\n[training]\nmax_rotation = 120\n'
        ),
        "not valid TOML": "[[experts]\n",
    }
    for needle, body in cases.items():
        err = _run_error(
            ["fit", str(_spec(tmp_path, body)), "--out", str(tmp_path / "out")], capsys
        )
        assert needle in err, (needle, err)
    err = _run_error(
        [
            "fit",
            str(
                _spec(
                    tmp_path,
                    f"[[experts]]\n{first.replace('queries.npy', 'nope.npy')}labels = "
                    '["0","1","2","3"]\n',
                )
            ),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "nope.npy" in err and "not found" in err
    err = _run_error(
        [
            "fit",
            str(
                _spec(
                    tmp_path,
                    f"[[experts]]\n{first.replace('experts:logreg', 'experts:missing')}labels = "
                    '["0"]\n',
                )
            ),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert "no attribute 'missing'" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def test_an_expert_with_bad_outputs_is_named(tmp_path, capsys):
    np.save(tmp_path / "q.npy", np.random.default_rng(0).random((20, 4)))
    (tmp_path / "bad.py").write_text(
        "import numpy as np\ndef predict(x):\n    return np.full((len(x), 3), 0.5)\n"
    )
    spec = _spec(
        tmp_path,
        '[[experts]]\nname = "broken"\npredict = "bad:predict"\nlabels = ["a", "b", "c"]\nqueries '
        '= "q.npy"\n',
    )
    err = _run_error(["fit", str(spec), "--out", str(tmp_path / "out")], capsys)
    assert "broken" in err and "sum" in err


def test_bad_support_sets_name_the_field(fitted, tmp_path, capsys):
    bank = str(fitted / "bank")
    x = np.random.default_rng(0).random((4, 64)).astype(np.float32)
    np.savez(tmp_path / "no_y.npz", x=x)
    assert "missing array(s) ['y']" in _run_error(
        ["adapt", bank, "--support", str(tmp_path / "no_y.npz"), "--out", str(tmp_path / "m")],
        capsys,
    )
    np.savez(tmp_path / "obj.npz", x=x, y=np.array(["1", 2, "1", 2], dtype=object))
    assert "string array" in _run_error(
        ["adapt", bank, "--support", str(tmp_path / "obj.npz"), "--out", str(tmp_path / "m")],
        capsys,
    )
    np.savez(tmp_path / "short.npz", x=x, y=np.array(["1", "2"]))
    assert "one label per row of x" in _run_error(
        ["adapt", bank, "--support", str(tmp_path / "short.npz"), "--out", str(tmp_path / "m")],
        capsys,
    )
    np.savez(tmp_path / "narrow.npz", x=x[:, :10], y=np.array(["1", "2", "1", "2"]))
    assert "expected (n, 64)" in _run_error(
        ["adapt", bank, "--support", str(tmp_path / "narrow.npz"), "--out", str(tmp_path / "m")],
        capsys,
    )
    assert "not found" in _run_error(
        ["adapt", bank, "--support", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "m")],
        capsys,
    )
    assert not (tmp_path / "m").exists()


def test_bad_prediction_inputs_name_the_problem(federation, fitted, tmp_path, capsys):
    model = fitted / "model_for_inputs"
    assert (
        main(
            [
                "adapt",
                str(fitted / "bank"),
                "--support",
                str(federation / "support.npz"),
                "--out",
                str(model),
            ]
        )
        == 0
    )
    np.save(tmp_path / "wide.npy", np.zeros((3, 65)))
    assert "expected (n, 64)" in _run_error(
        [
            "predict",
            str(model),
            "--inputs",
            str(tmp_path / "wide.npy"),
            "--out",
            str(tmp_path / "p.npz"),
        ],
        capsys,
    )
    np.save(tmp_path / "nan.npy", np.full((3, 64), np.nan))
    assert "finite" in _run_error(
        [
            "predict",
            str(model),
            "--inputs",
            str(tmp_path / "nan.npy"),
            "--out",
            str(tmp_path / "p.npz"),
        ],
        capsys,
    )
    (tmp_path / "text.npy").write_text("not an array")
    assert "not a plain .npy array" in _run_error(
        [
            "predict",
            str(model),
            "--inputs",
            str(tmp_path / "text.npy"),
            "--out",
            str(tmp_path / "p.npz"),
        ],
        capsys,
    )
    assert "expected a 'protofuse-adapted-model'" in _run_error(
        [
            "predict",
            str(fitted / "bank"),
            "--inputs",
            str(federation / "test_x.npy"),
            "--out",
            str(tmp_path / "p.npz"),
        ],
        capsys,
    )
    assert not (tmp_path / "p.npz").exists()


def test_console_script_answers_help():
    exe = Path(sys.executable).parent / "protofuse"
    out = subprocess.run([str(exe), "adapt", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--support" in out.stdout


def test_integer_labels_in_a_spec_name_their_classes(tmp_path):
    from protofuse.spec import load_spec

    spec = _spec(
        tmp_path, '[[experts]]\nname = "a"\npredict = "m:f"\nlabels = [0, 1]\nqueries = "q.npy"\n'
    )
    assert load_spec(spec).experts[0].labels == ["0", "1"]


def test_an_existing_file_as_output_is_refused_before_training(federation, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    err = _run_error(
        ["fit", str(federation / "spec.toml"), "--out", str(tmp_path / "taken")], capsys
    )
    assert "existing file" in err


def test_fit_names_image_shape_when_digits_come_as_flat_vectors(tmp_path, capsys):
    spec = write_federation(tmp_path, "digits", k=5, seed=0)
    text = spec.read_text().replace("image_shape = [8, 8]", "")
    spec.write_text(text + "\n[training]\nepochs = 1\n")
    assert main(["fit", str(spec), "--out", str(tmp_path / "bank")]) == 0
    assert "set `[data] image_shape = [8, 8]`" in capsys.readouterr().err
