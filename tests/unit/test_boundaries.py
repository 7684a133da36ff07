"""The dependency directions of the layout, by role, with no exemption:

    protofuse_cli  ->  client_sdk, protofuse_server  ->  protofuse (core)  ->  protofuse.model

- the model (``protofuse/model``) knows only torch and numpy;
- the core (``protofuse``) imports neither side, nor the CLI, nor the benchmark, nor Flower or
  gRPC as libraries (``protofuse/flower`` starts Flower's executables as processes);
- only the codecs (``protofuse/protocol``) touch the generated protobuf classes (``protofuse.v1``);
- the SDK never imports the server; outside its Flower client app it does not import Flower;
- the server never imports the client SDK; the adaptation service does not import Flower and the
  fusion server does not import gRPC;
- nothing but the CLI imports the CLI, and nothing installed imports the benchmark.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """file -> every absolute module name it imports (relative imports resolved against its
    package, so ``from ..protocol import federation`` counts as ``protofuse.protocol``)."""
    out = {}
    for file in folder.rglob("*.py"):
        if file.parts[-2] == "v1":  # generated code
            continue
        package = _package_of(file)
        names: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                # ``from a import b`` may import the module a.b: both names count
                names |= {module} | {f"{module}.{a.name}" for a in node.names if a.name != "*"}
        out[str(file.relative_to(ROOT))] = names
    return out


def _package_of(file: Path) -> str:
    """The installed package name of a source file's folder (server/ is protofuse_server...)."""
    parts = list(file.relative_to(ROOT).parent.parts)
    installed = {"server": "protofuse_server", "cli": "protofuse_cli"}
    parts[0] = installed.get(parts[0], parts[0])
    return ".".join(parts)


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


SIDES = ("client_sdk", "protofuse_server", "protofuse_cli", "bench")
RULES = [
    # (folder, forbidden module prefixes, allowed exceptions within the folder's files)
    (
        "protofuse/model",
        (
            "flwr",
            "grpc",
            "google.protobuf",
            "protofuse.v1",
            "pydantic",
            "protofuse.protocol",
            "protofuse.bank",
            *SIDES,
        ),
    ),
    (
        "protofuse",
        (
            *SIDES,
            "flwr",
            "grpc",
            "grpc_health",
            "grpc_reflection",
            "rich",
            "sklearn",
            "mlxtend",
            "matplotlib",
            "ray",
        ),
    ),
    ("client_sdk", ("protofuse_server", "protofuse_cli", "bench")),
    ("server", ("client_sdk", "protofuse_cli", "bench")),
    ("server/service", ("flwr",)),
    ("server/fusion", ("grpc", "grpc_health", "grpc_reflection")),
]


# Optional parts of the core, each with the library its extra brings: the run report draws with
# matplotlib (the report extra); nothing else of the core may import it.
EXTRA_PARTS = {"protofuse/report/": ("matplotlib",)}


def _allowed(file: str, module: str) -> bool:
    return any(
        file.startswith(part) and _matches(module, libraries)
        for part, libraries in EXTRA_PARTS.items()
    )


@pytest.mark.parametrize(("folder", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_no_module_imports_across_the_layout(folder, forbidden):
    wrong = {
        f: sorted(m for m in mods if _matches(m, forbidden) and not _allowed(f, m))
        for f, mods in imported_modules(ROOT / folder).items()
    }
    wrong = {f: m for f, m in wrong.items() if m}
    assert not wrong, f"imports across the layout: {wrong}"


def test_only_the_codecs_touch_generated_protobuf_classes():
    touching = {
        f
        for folder in ("protofuse", "client_sdk", "server", "cli")
        for f, mods in imported_modules(ROOT / folder).items()
        if any(_matches(m, ("protofuse.v1",)) for m in mods)
    }
    assert touching <= {
        "protofuse/protocol/federation.py",
        "protofuse/protocol/review.py",
        "protofuse/protocol/service.py",
    }, touching


def test_the_sdk_needs_flower_only_in_its_client_app():
    wrong = {
        f: m
        for f, mods in imported_modules(ROOT / "client_sdk").items()
        if "clientapp" not in f and (m := sorted(x for x in mods if _matches(x, ("flwr",))))
    }
    assert not wrong, wrong


def test_relative_imports_are_resolved_to_their_package(tmp_path, monkeypatch):
    """The checker itself: relative imports count as the absolute modules they name."""
    pkg = tmp_path / "protofuse" / "families"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "from ..protocol import federation\nfrom . import base\nfrom .. import bank\n"
    )
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "y.py").write_text("from .fusion import strategy\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert imported_modules(tmp_path / "protofuse")["protofuse/families/x.py"] >= {
        "protofuse.protocol.federation",
        "protofuse.families.base",
        "protofuse.bank",
    }
    assert imported_modules(tmp_path / "server")["server/y.py"] >= {
        "protofuse_server.fusion.strategy"
    }
