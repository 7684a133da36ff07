"""protofuse simulate on Flower's simulation engine, end to end: a SuperLink in simulation mode,
one virtual client per expert, the real ServerApp and ClientApp. The run is killed in the middle
of a round (SIGKILL of the server, by the ServerApp of crashing_server_app.py, run from a copy of
protofuse's Flower app), then resumed by the real one; the bank it exports serves adapt and
predict."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from test_metrics import scrape

from bench.demo import write_federation
from protofuse.bank import load_bank
from protofuse.families import FAMILIES
from protofuse.flower.simulation import SimulationError, app_dir, simulate
from protofuse.protocol import federation as wire
from protofuse_cli.main import main
from protofuse_server.fusion.server_app import STORE
from protofuse_server.fusion.store import BankStore
from protofuse_server.metrics import ADDRESS_ENV

SERVERAPP = 'serverapp = "protofuse_server.fusion.server_app:app"'


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sim")
    return write_federation(folder / "federation", "digits", k=5, seed=0)


def crashing_app(folder: Path) -> Path:
    """A copy of protofuse's Flower app whose ServerApp is crashing_server_app's (same clients)."""
    return app_with_server(folder, "crashing_server_app")


def app_with_server(folder: Path, module: str) -> Path:
    """A copy of protofuse's Flower app whose ServerApp is ``module``'s (a file beside this one
    that wraps the fusion server's); the clients are protofuse's own."""
    app = folder / f"{module}-app"
    app.mkdir()
    pyproject = (app_dir() / "pyproject.toml").read_text()
    assert SERVERAPP in pyproject, (
        "protofuse's Flower app names another ServerApp: update this test"
    )
    (app / "pyproject.toml").write_text(pyproject.replace(SERVERAPP, f'serverapp = "{module}:app"'))
    shutil.copy(Path(__file__).with_name(f"{module}.py"), app)
    return app


def test_a_killed_simulation_resumes_and_its_bank_adapts_to_a_new_task(
    federation, tmp_path, capsys
):
    run = tmp_path / "run"
    # Killed in round 3 (the agreement round: replies in, nothing merged), as a power cut would.
    with pytest.raises(SimulationError, match="run the same command again to resume"):
        simulate(federation, run, rounds=4, app=crashing_app(tmp_path))
    with sqlite3.connect(run / "store" / "bank.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT round FROM history ORDER BY round")] == [1, 2]
        assert db.execute("SELECT COUNT(*) FROM experts").fetchone()[0] == 5
        key = db.execute("SELECT run_key FROM run").fetchone()[0]  # of the spec with rounds=4
    with BankStore(run / STORE, key) as store:
        before = store.latest().state  # the evidence of rounds 1-2 is what the resume starts from
        before_arrays = store.latest().arrays
    assert sorted(before["evidence"]) == ["forest", "knn", "logreg", "mlp", "svm"]
    assert before["strikes"] == {} and before["expelled"] == []

    assert main(["simulate", str(federation), "--out", str(run), "--rounds", "4"]) == 0
    err = capsys.readouterr().err
    assert "fusion: rounds 3..5 of 5" in err  # resumed after the last checkpoint, not from scratch
    assert "round 3/5 agreement" in err and "round 5/5 weighted" in err
    with sqlite3.connect(run / "store" / "bank.sqlite") as db:
        assert [r[0] for r in db.execute("SELECT round FROM history ORDER BY round")] == [
            1,
            2,
            3,
            4,
            5,
        ]

    with BankStore(run / STORE, key) as store:
        after = store.latest().state
    assert sorted(after["evidence"]) == sorted(before["evidence"])  # carried on, then updated
    assert after["evidence"] != before["evidence"]

    bank = load_bank(run)  # the run folder, as adapt, predict and info take it
    assert bank.meta.federation.rounds == 5
    assert "report written to" in err and (run / "report.html").exists()  # simulate ends with it
    # normalization "auto" in a federation: layer norm, no running statistic of any client's data
    assert bank.meta.config["norm"] == "layer"
    assert not [k for k in before_arrays if "running" in k or "num_batches" in k]
    assert sorted(e.name for e in bank.experts) == ["forest", "knn", "logreg", "mlp", "svm"]
    assert all(
        e.n_queries > 0 and 0 < e.weight <= 1 and 0.5 < e.fidelity.agreement <= 1
        for e in bank.experts
    )
    assert max(e.weight for e in bank.experts) == 1.0
    queries = np.load(
        federation.parent / "queries.npy"
    )  # each client sent its queries' min and max
    assert bank.meta.input_range == (float(queries.min()), float(queries.max()))
    manifest = wire.decode_manifest(
        (run / "manifest.pb").read_bytes(), families=FAMILIES
    )  # what the server publishes
    assert (manifest.round, manifest.version, manifest.vocabulary, manifest.family) == (
        5,
        bank.version,
        bank.label_names,
        "discriminative",
    )
    # One record type on both sides: the manifest's experts are the bank's, with the federation's
    # counts.
    assert {e.name: (e.labels, e.weight, e.n_queries) for e in manifest.experts} == {
        e.name: (e.labels, e.weight, e.n_queries) for e in bank.experts
    }
    assert all(e.last_round == 5 and e.n_examples > 0 for e in manifest.experts)

    folder = federation.parent
    support = np.load(folder / "support.npz")
    assert (
        main(
            [
                "adapt",
                str(run),
                "--support",
                str(folder / "support.npz"),
                "--out",
                str(tmp_path / "model"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                str(tmp_path / "model"),
                "--inputs",
                str(folder / "test_x.npy"),
                "--out",
                str(tmp_path / "pred.npz"),
            ]
        )
        == 0
    )
    pred = np.load(tmp_path / "pred.npz")
    truth = np.load(folder / "test_y.npy")
    accuracy = float((pred["classes"][pred["proba"].argmax(1)] == truth).mean())
    assert accuracy > 0.85, accuracy  # measured 0.95 at 4 rounds; 5-way, 5 shots, digits
    assert set(np.unique(support["y"])) == set(pred["classes"].tolist())
    assert main(["info", str(run)]) == 0
    assert "federated: 5 rounds, rowwise aggregation" in capsys.readouterr().out
    # rounds.json keeps the metrics of the rounds before the resume.
    assert [r["round"] for r in json.loads((run / "rounds.json").read_text())["rounds"]] == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_the_generative_family_is_refused_with_the_reason(federation, tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        federation.read_text().replace(
            "[[experts]]", '[model]\nfamily = "generative"\n\n[[experts]]', 1
        )
    )
    (tmp_path / "experts.py").write_text((federation.parent / "experts.py").read_text())
    (tmp_path / "queries.npy").write_bytes((federation.parent / "queries.npy").read_bytes())
    assert main(["simulate", str(spec), "--out", str(tmp_path / "run")]) == 2
    assert "only the discriminative family federates" in capsys.readouterr().err


def _copy_federation(federation: Path, folder: Path, extra: str) -> Path:
    spec = folder / "spec.toml"
    spec.write_text(federation.read_text() + extra)
    for name in ("experts.py", "queries.npy"):
        (folder / name).write_bytes((federation.parent / name).read_bytes())
    return spec


def test_a_dp_run_releases_noisy_weights_and_no_client_measurement(federation, tmp_path, capsys):
    spec = _copy_federation(federation, tmp_path, "\n[privacy]\nmode = 'dp'\nepsilon = 8\n")
    run = tmp_path / "run"
    assert main(["simulate", str(spec), "--out", str(run), "--rounds", "2"]) == 0
    assert "differential privacy: (epsilon 8, delta 1e-05)-DP per client over 2 rounds" in (
        capsys.readouterr().err
    )
    bank = load_bank(run)
    fed = bank.meta.federation
    assert fed.privacy.mode == "dp" and 7.8 < fed.epsilon <= 8.0 and fed.noise_multiplier > 0
    # What each client measured on its own queries is not in the bank, nor in the manifest.
    assert bank.meta.input_range is None
    assert all(
        (e.n_queries, e.weight, e.fidelity.n, np.isnan(e.consensus)) == (0, 1.0, 0, True)
        for e in bank.experts
    )
    assert not bank.model.expert_bias.detach().numpy().any()
    assert not bank.model.expert_log_temp.detach().numpy().any()
    manifest = wire.decode_manifest((run / "manifest.pb").read_bytes(), families=FAMILIES)
    assert all((e.n_queries, e.n_examples, e.fidelity.n) == (0, 0, 0) for e in manifest.experts)
    assert main(["info", str(run)]) == 0
    assert "differential privacy: epsilon 8 at delta 1e-05 per client" in capsys.readouterr().out


def test_a_dp_run_over_its_budget_is_refused_before_it_starts(federation, tmp_path, capsys):
    spec = _copy_federation(
        federation, tmp_path, "\n[privacy]\nmode = 'dp'\nepsilon = 1\nnoise_multiplier = 0.5\n"
    )
    assert main(["simulate", str(spec), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "privacy.noise_multiplier: 0.5 over 40 rounds spends epsilon" in err
    assert "more than privacy.epsilon = 1" in err and not (tmp_path / "run").exists()


def test_under_secure_aggregation_the_server_receives_masked_sums_only(
    federation, tmp_path, capsys
):
    """[privacy] mode = "secagg": every round that trains goes through Flower's SecAgg+, and no
    reply the server receives holds a client's weights (the recording ServerApp writes down every
    reply); the bank from the unmasked sums adapts like a plain one."""
    spec = _copy_federation(federation, tmp_path, "\n[privacy]\nmode = 'secagg'\n")
    run = tmp_path / "run"
    simulate(spec, run, rounds=3, app=app_with_server(tmp_path, "recording_server_app"))
    replies = json.loads((run / "replies.json").read_text())
    masked = [r for r in replies if "secaggplus_configs" in r["configs"]]
    # 3 training rounds (consensus, then two weighted; the agreement round trains nothing) x 5
    # clients x SecAgg+'s 4 stages.
    assert len(masked) == 3 * 5 * 4
    vectors = [r for r in masked if "masked_params" in r["configs"]["secaggplus_configs"]]
    assert len(vectors) == 3 * 5
    for reply in replies:
        # No reply carries an array: the weights, the change and the vector all stay on the
        # clients; what travels is the masked vector (bytes) and the plain-text report.
        assert all(not arrays for arrays in reply["arrays"].values()), reply
    for reply in vectors:
        assert reply["configs"]["fusion"] == {"distribution": "bytes", "stats": "bytes"}
        assert reply["configs"]["secaggplus_configs"]["masked_params"] == "list"
    assert "secure aggregation (Flower's SecAgg+)" in capsys.readouterr().out

    bank = load_bank(run)
    assert bank.meta.federation.privacy.mode == "secagg"
    assert all(e.weight == 1.0 for e in bank.experts)  # no report sets a weight
    support = np.load(federation.parent / "support.npz")
    model = bank.adapt(support["x"], support["y"])
    test_x, test_y = (np.load(federation.parent / f) for f in ("test_x.npy", "test_y.npy"))
    assert (model.predict(test_x) == test_y).mean() > 0.8  # 0.91 when written (plain: 0.89)
    assert main(["info", str(run)]) == 0
    assert "secure aggregation (Flower's SecAgg+)" in capsys.readouterr().out


def test_the_fusion_server_counts_rounds_clients_replies_and_bytes(
    federation, tmp_path, monkeypatch
):
    """A real simulation whose ServerApp serves its metrics; a scraper polls them while it runs
    (the exporter lives as long as the run) and keeps the last scrape."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(ADDRESS_ENV, f"127.0.0.1:{port}")
    last: dict = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):  # not serving yet, or the run is over
                last.update(scrape(port))
            done.wait(0.3)

    scraper = threading.Thread(target=poll, daemon=True)
    scraper.start()
    try:
        simulate(federation, tmp_path / "run", rounds=2)
    finally:
        done.set()
        scraper.join(timeout=15)
    total = load_bank(tmp_path / "run").meta.federation.rounds
    assert last, "never scraped the fusion server's metrics"
    # the last scrape may precede the last round by the polling interval
    assert total - 1 <= last[("protofuse_fusion_rounds_completed_total", ())] <= total
    assert last[("protofuse_fusion_clients", ())] == 5
    assert last[("protofuse_fusion_replies_total", (("status", "ok"),))] >= 5 * (total - 1)
    assert ("protofuse_fusion_replies_total", (("status", "invalid"),)) not in last
    assert last[("protofuse_fusion_reply_bytes_total", ())] > 0
