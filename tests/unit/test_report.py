"""The run report (protofuse.report): every section drawn from what the run recorded, names from
outside escaped, history files read like artifacts (refused before they are read into memory)
and validated, and accuracy against k measured on an evaluation set."""

from __future__ import annotations

import base64
import json
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toys import toy_bank

from protofuse import artifacts
from protofuse.bank import load_bank
from protofuse.report import REPORT_FILE, accuracy_against_k, figures, page, write_report
from protofuse.report.history import ROUNDS_FILE, TRAINING_FILE, read_history, training_record

NASTY = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "$\\frac{a}{b}$ & co",
    "x" * 300,
    "tab\tand\nnewline",
)


def _bank(
    labels: tuple[str, str, str, str] = ("0", "1", "2", "3"),
    experts=("a", "b"),
    family: str = "discriminative",
):
    """A small bank on the toy clusters: expert a knows labels 0-2, b 2-3."""
    epochs = 8 if family == "discriminative" else 2
    return toy_bank(family, epochs, label_names=labels, experts=experts)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    bank, x, y = _bank()
    folder = tmp_path_factory.mktemp("fit")
    bank.save(folder)
    (folder / TRAINING_FILE).write_bytes(training_record([1.2, 0.9, float("nan"), 0.7]))
    return folder, x, y


class _Images(HTMLParser):
    """The page's images (src) and whether it holds any script or external reference."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.scripts = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "script" or any(k.startswith("on") for k in attrs):
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def _parsed(path) -> _Images:
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_a_fit_report_has_every_section_with_its_figures_embedded(fitted):
    folder, x, y = fitted
    out = write_report(folder, evaluation=(x, y), shots=(1, 3), episodes=3)
    assert out == folder / REPORT_FILE
    html = out.read_text(encoding="utf-8")
    for title in ("Run", "Training", "Experts", "Coverage", "Prototype map", "New tasks"):
        assert f"<h2>{title}</h2>" in html
    parsed = _parsed(out)
    # curves, trust, coverage, prototype map, accuracy against k: all inline PNGs
    assert len(parsed.images) == 5
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert parsed.scripts == 0 and "http://" not in html and "https://" not in html
    text = " ".join(parsed.text)
    assert "protofuse fit, 3 epochs" in text  # the NaN epoch is not recorded
    # the accuracy table: one row per k, accuracies well above chance on separable clusters
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td class=\"num\">([\d.]+)</td>", html)
    assert [k for k, _ in rows] == ["1", "3"]
    assert all(float(a) > 60 for _, a in rows)


def test_without_history_or_evaluation_the_report_says_what_is_missing(tmp_path):
    bank, _, _ = _bank()
    bank.save(tmp_path)
    html = write_report(tmp_path, out=tmp_path / "r.html").read_text()
    assert "recorded no history" in html
    assert "--eval test.npz" in html


def test_names_from_outside_are_escaped_in_the_page_and_drawn_as_plain_text(tmp_path):
    """Label names and pseudonyms are the experts' own: HTML in them stays text, a ``$`` never
    starts matplotlib's mathtext, a long name is shortened in the figures."""
    labels = (NASTY[0], NASTY[1], NASTY[2], NASTY[3])
    bank, x, y = _bank(labels, experts=(NASTY[4], "<b>b</b>"))
    bank.save(tmp_path)
    parsed = _parsed(write_report(tmp_path, evaluation=(x, y), shots=(1,), episodes=2))
    assert parsed.scripts == 0
    assert len(parsed.images) == 4  # no history: trust, coverage, map, accuracy
    html = (tmp_path / REPORT_FILE).read_text()
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>b</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text(max_size=40), max_size=6),
    st.lists(st.lists(st.text(max_size=20), min_size=2, max_size=2), max_size=4),
)
def test_the_page_holds_no_markup_it_was_not_built_with(paragraphs, rows):
    html = page.render(
        "t", "s", [page.Section("x", paragraphs=paragraphs, table=(("a", "b"), rows))]
    )
    parser = _Images()
    parser.feed(html)
    assert parser.scripts == 0 and not parser.images
    assert re.findall(r"<(\w+)", html.split("<body>", 1)[1]) == re.findall(
        r"<(\w+)",
        page.render(
            "t",
            "s",
            [
                page.Section(
                    "x",
                    paragraphs=["p"] * len(paragraphs),
                    table=(("a", "b"), [["c", "d"]] * len(rows)),
                )
            ],
        ).split("<body>", 1)[1],
    )


def _write_rounds(folder, rounds) -> None:
    (folder / ROUNDS_FILE).write_text(json.dumps({"history": [], "rounds": rounds}))


def _round(r: int, phase: str, **extra):
    return {
        "round": r,
        "phase": phase,
        "clients": 2,
        "loss": 1.0 / r if phase != "agreement" else None,
        "bytes_per_client": 1000.0 if phase != "agreement" else 200.0,
        "fidelity": 0.8,
        "agreement": 0.9 if phase == "agreement" else None,
        "trust": {"a": 1.0, "b": 0.5},
        "evidence": {"a": {"shared": 0.3, "rows": None, "scale": 1.0}},
        **extra,
    }


def test_a_federation_history_is_read_with_its_phases_and_trust(tmp_path):
    bank, _, _ = _bank()
    bank.save(tmp_path)
    _write_rounds(
        tmp_path, [_round(1, "imitation"), _round(2, "agreement"), _round(3, "consensus")]
    )
    history = read_history(tmp_path)
    assert history.unit == "round"
    assert [r.phase for r in history.rows] == ["imitation", "agreement", "consensus"]
    assert history.rows[1].loss is None and history.rows[1].agreement == 0.9
    assert history.rows[2].trust == {"a": 1.0, "b": 0.5}
    html = write_report(tmp_path).read_text()
    assert len(_parsed(tmp_path / REPORT_FILE).images) == 4  # no evaluation set
    assert "a federation" not in html  # a fit's bank: its meta says how it was trained


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"loss": "NaN"}, "rounds[0].loss"),
        ({"bytes_per_client": -1.0}, "rounds[0].bytes_per_client"),
        ({"round": -3}, "rounds[0].round"),
        ({"fidelity": 1.5}, "rounds[0].fidelity"),
        ({"trust": {"": 1.0}}, "rounds[0].trust"),
        ({"trust": {"a": float("inf")}}, "rounds[0].trust.a"),
    ],
)
def test_a_malformed_history_is_refused_naming_the_file_and_field(tmp_path, row, field):
    raw = json.dumps({"rounds": [_round(1, "imitation", **row)]}, allow_nan=True)
    (tmp_path / ROUNDS_FILE).write_text(raw)
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        read_history(tmp_path)
    assert ROUNDS_FILE in str(err.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {
                "rounds": st.lists(
                    st.dictionaries(
                        st.sampled_from(
                            [
                                "round",
                                "phase",
                                "clients",
                                "loss",
                                "fidelity",
                                "agreement",
                                "bytes_per_client",
                                "trust",
                            ]
                        ),
                        _json,
                        max_size=8,
                    ),
                    max_size=3,
                )
            }
        ),
    ),
    st.sampled_from([ROUNDS_FILE, TRAINING_FILE]),
)
def test_generated_histories_are_read_or_refused_never_raised(tmp_path, value, name):
    (tmp_path / ROUNDS_FILE).unlink(missing_ok=True)
    (tmp_path / TRAINING_FILE).unlink(missing_ok=True)
    (tmp_path / name).write_text(json.dumps(value, allow_nan=True))
    try:
        history = read_history(tmp_path)
    except ValueError as err:
        assert name in str(err)
        return
    for row in history.rows:  # what was accepted is finite and in range
        for v in (row.loss, row.fidelity, row.agreement, row.bytes_per_client):
            assert v is None or np.isfinite(v)
        assert all(np.isfinite(t) and t >= 0 for t in row.trust.values())


def test_history_files_are_never_read_through_links_or_pipes_or_beyond_the_limit(
    tmp_path, monkeypatch
):
    os.symlink("/dev/zero", tmp_path / ROUNDS_FILE)
    with pytest.raises(ValueError, match="symbolic link"):
        read_history(tmp_path)
    os.unlink(tmp_path / ROUNDS_FILE)
    os.mkfifo(tmp_path / ROUNDS_FILE)  # would block a plain open() forever
    with pytest.raises(ValueError, match="named pipe"):
        read_history(tmp_path)
    os.unlink(tmp_path / ROUNDS_FILE)
    _write_rounds(tmp_path, [_round(1, "imitation")] * 50)
    monkeypatch.setattr(artifacts, "MAX_HISTORY_BYTES", 1000)
    with pytest.raises(ValueError, match="MAX_HISTORY_BYTES"):
        read_history(tmp_path)


def test_the_generative_family_has_no_map_but_a_note(tmp_path):
    bank, _, _ = _bank(family="generative")
    bank.save(tmp_path)
    html = write_report(tmp_path).read_text()
    assert "keeps no prototype row per label" in html
    assert len(_parsed(tmp_path / REPORT_FILE).images) == 2  # trust and coverage


def test_evaluation_needs_two_labels_with_more_examples_than_k(fitted):
    folder, x, y = fitted
    bank = load_bank(folder)
    keep = np.concatenate([np.flatnonzero(y == "0"), np.flatnonzero(y == "1")[:5]])
    with pytest.raises(ValueError, match="more than 5 examples"):
        accuracy_against_k(bank, x[keep], y[keep], shots=(5,))
    result = accuracy_against_k(bank, x, y, shots=(1,), episodes=2, seed=3)
    assert result.ways == 4 and result.episodes == 2 and set(result.by_k) == {1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=30))
def test_the_convex_hull_holds_every_point(points):
    xy = np.array(points)
    hull = figures.convex_hull(xy)
    if len(hull) < 3:
        return
    # counter-clockwise corners: every point is on the left of (or on) every edge
    for a, b in zip(hull, np.roll(hull, -1, axis=0), strict=True):
        cross = (b[0] - a[0]) * (xy[:, 1] - a[1]) - (b[1] - a[1]) * (xy[:, 0] - a[0])
        scale = np.abs(b - a).max() * np.abs(xy - a).max() + 1e-9
        assert (cross >= -1e-9 * scale).all()


@pytest.mark.parametrize("rows", [np.zeros((1, 4)), np.ones((5, 4)), np.eye(2, 4), np.eye(3)])
def test_the_principal_plane_of_degenerate_banks_is_finite(rows):
    xy = figures.principal_plane(rows)
    assert xy.shape == (len(rows), 2) and np.isfinite(xy).all()


def test_names_in_figures_are_printable_and_short():
    assert figures.short("a\nb") == "a?b"
    assert len(figures.short("x" * 300)) == figures.MAX_NAME


def test_protofuse_report_and_fit_without_a_report(fitted, tmp_path, capsys):
    from protofuse_cli.main import main

    folder, x, y = fitted
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    out = tmp_path / "page.html"
    code = main(
        [
            "report",
            str(folder),
            "--out",
            str(out),
            "--eval",
            str(tmp_path / "eval.npz"),
            "--shots",
            "1",
            "--episodes",
            "2",
        ]
    )
    assert code == 0 and out.exists()
    assert "report written to" in capsys.readouterr().err
    assert main(["report", str(folder), "--shots", "0"]) == 2
    assert "--shots" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert (
        main(["report", str(folder), "--out", str(out), "--tensorboard", str(tmp_path / "tb")]) == 0
    )
    assert "TensorBoard events written to" in capsys.readouterr().err
    assert any((tmp_path / "tb" / folder.name).iterdir())


def test_writing_the_report_leaves_the_run_as_it_was(tmp_path):
    """Writing the report never touches the run's own files."""
    bank, _, _ = _bank()
    bank.save(tmp_path)
    _write_rounds(tmp_path, [_round(1, "imitation")])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_report(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != REPORT_FILE}
    assert after == before


def test_a_run_is_logged_to_tensorboard_and_read_back_by_its_own_reader(tmp_path):
    """Settings, every round's metrics (a series per field and per expert's trust) and the report's
    figures, read back with TensorBoard's EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from protofuse.report.tracking import log_run, scalars_of

    bank, _, _ = _bank()
    bank.save(tmp_path / "run")
    _write_rounds(
        tmp_path / "run",
        [_round(1, "imitation"), _round(2, "agreement"), _round(3, "consensus")],
    )
    target = log_run(tmp_path / "run", tmp_path / "tb")
    assert target == tmp_path / "tb" / "run"
    scalars = scalars_of(target)
    assert scalars["round/loss"] == [(1, 1.0), (3, pytest.approx(1 / 3))]
    assert [s for s, _ in scalars["round/fidelity"]] == [1, 2, 3]
    assert scalars["round/agreement"] == [(2, pytest.approx(0.9))]
    assert scalars["trust/b"] == [(1, 0.5), (2, 0.5), (3, 0.5)]
    events = EventAccumulator(str(target), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == [
        "report/coverage",
        "report/curves",
        "report/prototypes",
        "report/trust",
    ]
    text = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| family | discriminative |" in text and bank.version in text


def test_many_phases_no_measurements_and_huge_values_are_drawn_or_refused_quickly(tmp_path):
    import time

    bank, _, _ = _bank()
    bank.save(tmp_path)
    _write_rounds(tmp_path, [_round(r, f"phase-{r}") for r in range(1, 400)])
    t0 = time.perf_counter()
    write_report(tmp_path)  # 399 phases: the first seven drawn apart, the rest as one line
    assert time.perf_counter() - t0 < 30
    empty = {"round": 1, "phase": "x", "trust": {}}
    _write_rounds(tmp_path, [empty, {**empty, "round": 2}])
    assert "holds no measurement to draw" in write_report(tmp_path).read_text()
    _write_rounds(tmp_path, [_round(1, "imitation", loss=1.7e308)])
    with pytest.raises(ValueError, match=r"rounds\[0\]\.loss"):
        read_history(tmp_path)


def test_tensorboard_keeps_to_the_banks_experts(tmp_path):
    from protofuse.report.tracking import log_run, scalars_of

    bank, _, _ = _bank()
    bank.save(tmp_path / "run")
    stranger = {f"stranger-{i}": 0.5 for i in range(50)}
    _write_rounds(tmp_path / "run", [_round(1, "imitation", trust={"a": 1.0, **stranger})])
    tags = set(scalars_of(log_run(tmp_path / "run", tmp_path / "tb")))
    assert {t for t in tags if t.startswith("trust/")} == {"trust/a"}
