"""The dependency directions of the layout: the client SDK never imports the server, the server
never imports the client's expert adapters, the core imports neither, and the model knows
nothing of Flower."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """file -> every module it imports (absolute names; relative imports resolved to the folder's package)."""
    out = {}
    for file in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[str(file.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("client_sdk", ("protofuse_server",)),
    ("server", ("client_sdk", "bench")),
    ("protofuse", ("client_sdk", "protofuse_server", "bench")),
    ("protofuse/model", ("flwr", "grpc", "google.protobuf", "protofuse.v1")),
])
def test_no_module_imports_across_the_layout(folder, forbidden):
    wrong = {f: sorted(m for m in mods if m.split(".")[0] in forbidden or any(m.startswith(p + ".") or m == p for p in forbidden)) for f, mods in imported_modules(ROOT / folder).items()}
    wrong = {f: m for f, m in wrong.items() if m}
    # The CLI is the one thin layer over both sides.
    wrong.pop("protofuse/cli.py", None)
    assert not wrong, f"imports across the layout: {wrong}"
