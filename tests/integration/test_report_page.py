"""The run report in a real browser: Debian's Chromium, headless, opens the page written by
``protofuse fit`` (under the page's own Content-Security-Policy, which allows nothing but inline
images and style), every image loads, and a screenshot is taken.

Chromium comes from tests/host/setup.sh (``apt-get install chromium``); without it the test skips
(CI installs it, and fails if it cannot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pytest

from protofuse_cli.main import main

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="Chromium is not installed (tests/host/setup.sh installs it)"
)
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]

# The test's own page (no policy of its own) frames the report and, once everything has loaded,
# writes each image's state into its body: --dump-dom then prints it. Reading the frame needs
# --allow-file-access-from-files (file:// pages are otherwise each their own origin).
PROBE = """<!DOCTYPE html><html><body>
<iframe id="report" src="report.html" style="width:1200px;height:800px"></iframe>
<script>
window.addEventListener("load", () => {
  const doc = document.getElementById("report").contentDocument;
  document.body.dataset.images = JSON.stringify(
    [...doc.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]));
  document.body.dataset.titles = JSON.stringify(
    [...doc.querySelectorAll("h2")].map(h => h.textContent));
});
</script></body></html>"""


def _browser(*args: str, timeout: float = 120) -> str:
    assert BROWSER is not None
    done = subprocess.run(
        [BROWSER, *HEADLESS, *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return done.stdout


def test_the_report_renders_in_chromium_with_every_image_loaded(tmp_path, capsys):
    spec = _toy_spec(tmp_path)
    assert main(["fit", str(spec), "--out", str(tmp_path / "fit")]) == 0
    page = tmp_path / "fit" / "report.html"
    assert page.exists()  # fit ends with the report
    x, y = np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy")
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    assert main(["report", str(tmp_path / "fit"), "--eval", str(tmp_path / "eval.npz")]) == 0

    probe = tmp_path / "fit" / "probe.html"
    probe.write_text(PROBE)
    dom = _browser(
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    images = json.loads(unescape(re.search(r'data-images="([^"]*)"', dom)[1]))
    titles = json.loads(unescape(re.search(r'data-titles="([^"]*)"', dom)[1]))
    assert titles == ["Run", "Training", "Experts", "Coverage", "Prototype map", "New tasks"]
    assert len(images) == page.read_text().count("<img ") == 5
    assert all(complete and width > 100 and height > 100 for complete, width, height in images)

    shot = tmp_path / "report.png"
    _browser(f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 2400)
    assert len(data) > 50_000  # text and figures, not a blank page


def _toy_spec(folder: Path) -> Path:
    """Two experts over four clusters (the unit tests' toy), as a spec fit can read."""
    from toys import clusters

    x, y, _ = clusters(0, n=400)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y.astype(str))
    (folder / "experts.py").write_text(
        "import numpy as np\n"
        "Y = np.load(__file__.rsplit('/', 1)[0] + '/y.npy').astype(int)\n"
        "X = np.load(__file__.rsplit('/', 1)[0] + '/x.npy')\n"
        "def _lookup(x, cols):\n"
        "    idx = [int(np.argmin(((X - r) ** 2).sum(1))) for r in x]\n"
        "    p = np.eye(4)[Y[idx]][:, cols] + 0.01\n"
        "    return p / p.sum(1, keepdims=True)\n"
        "def a(x): return _lookup(x, [0, 1, 2])\n"
        "def b(x): return _lookup(x, [2, 3])\n"
    )
    spec = folder / "spec.toml"
    spec.write_text(
        "[training]\nepochs = 6\n\n[model]\nfeat_dim = 8\n\n"
        '[[experts]]\nname = "a"\npredict = "experts:a"\nlabels = ["0", "1", "2"]\n'
        'queries = "x.npy"\n\n'
        '[[experts]]\nname = "b"\npredict = "experts:b"\nlabels = ["2", "3"]\nqueries = "x.npy"\n'
    )
    return spec
