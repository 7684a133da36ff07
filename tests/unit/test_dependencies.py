"""Lean installs: every third-party import of the installed packages is declared for its role.

pyproject.toml's ``dependencies`` are what every user gets (the core ``protofuse``, the SDK's
experts and loaders, the ``protofuse`` command); each side is an extra (README, "Install"):

- ``protofuse/``, ``cli/`` and ``client_sdk/`` (less its Flower client app and the adaptation
  service's client) import only the base dependencies, and so do the few server modules the
  command reaches on a core install (``protofuse certs``; the ``serve`` parser's settings);
- ``client_sdk/clientapp`` (and its deprecated alias) and ``client_sdk/fusion_client.py``: base +
  ``client``;
- ``server/``: base + ``server``; the benchmark (``bench/``, not installed): base + ``bench``;
- the core never imports Flower, Ray, scikit-learn, mlxtend or matplotlib.

Every import is read from the source (function-level imports included): a new import of a
package that is not declared for its role fails here, not in a user's fresh install. And a
core-only install is imitated in a subprocess (the extras' modules made unimportable): the SDK
loads and adapts banks, and what needs an extra says which one.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIRST_PARTY = {"protofuse", "client_sdk", "protofuse_server", "protofuse_cli", "bench"}

# Import name (or dotted prefix) -> distribution, where they differ or to say the name is known.
# A third-party import missing here fails test_every_import_is_known: add it with its distribution.
DISTRIBUTION = {
    "google.protobuf": "protobuf",
    "grpc": "grpcio",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "grpc_tools": "grpcio-tools",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "flwr": "flwr",
    "ray": "ray",
    "torch": "torch",
    "numpy": "numpy",
    "pydantic": "pydantic",
    "cryptography": "cryptography",
    "rich": "rich",
    "matplotlib": "matplotlib",
    "mlxtend": "mlxtend",
    "river": "river",
    "atheris": "atheris",
    "dp_accounting": "dp-accounting",
    "onnx": "onnx",
    "prometheus_client": "prometheus-client",
    "tensorboard": "tensorboard",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
}

# What the core must never import (tests/unit/test_boundaries.py has the finer directions).
NOT_IN_CORE = ("flwr", "ray", "sklearn", "mlxtend", "matplotlib")

# Server modules the command imports on every install: `protofuse certs init/node` (an
# organization makes its own SuperNode key pair) and the `serve` parser's options.
SERVER_MODULES_OF_THE_CORE = {
    "server/__init__.py",
    "server/certs.py",
    "server/service/__init__.py",
    "server/service/settings.py",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> tuple[str, set[str]]:
    """(normalized distribution, extras) of a PEP 508 requirement string."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", req)
    assert m, f"unparsable requirement {req!r}"
    return normalize(m[1]), {normalize(e) for e in (m[2] or "").split(",") if e.strip()}


def declared(*extras: str) -> set[str]:
    """Distributions the base install plus ``extras`` declares, self-references expanded."""
    project = PYPROJECT["project"]
    optional = {normalize(k): v for k, v in project["optional-dependencies"].items()}
    names: set[str] = set()
    todo, seen = [normalize(e) for e in extras], set()
    for req in project["dependencies"]:
        names.add(requirement_name(req)[0])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"extra {extra!r} is not in [project.optional-dependencies]"
        for req in optional[extra]:
            name, sub = requirement_name(req)
            if name == "protofuse":
                todo.extend(sub)
            else:
                names.add(name)
    return names


def third_party_imports(file: Path) -> set[str]:
    """Every absolute module name ``file`` imports that is neither the standard library nor ours
    (module level and inside functions; relative imports are ours)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {
        n
        for n in names
        if n.split(".")[0] not in sys.stdlib_module_names and n.split(".")[0] not in FIRST_PARTY
    }


def distribution_of(module: str) -> str | None:
    for prefix in sorted(DISTRIBUTION, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return normalize(DISTRIBUTION[prefix])
    return None


def role_of(rel: str) -> tuple[str, ...]:
    """The extras a module may rely on, besides the base dependencies."""
    if rel == "bench/fuzz.py":
        return ("bench", "fuzz")
    if rel == "bench/onnx_parity.py":  # `make bench-onnx`: exports and runs with onnxruntime
        return ("bench", "onnx")
    if rel == "protofuse/privacy.py":  # imports the accountant only when a DP run is planned
        return ("dp",)
    if rel == "protofuse/report/tracking.py":  # `--tensorboard DIR`: TensorBoard's event files
        return ("report", "tracking")
    if rel.startswith("protofuse/report/"):  # `protofuse report`: matplotlib draws its figures
        return ("report",)
    if rel == "protofuse/export.py":  # `protofuse export`: torch's ONNX exporter, onnxruntime
        return ("onnx",)
    if rel.startswith("bench/"):
        return ("bench",)
    if rel.startswith("client_sdk/clientapp/") or rel in (
        "client_sdk/client_app.py",
        "client_sdk/fusion_client.py",
    ):
        return ("client",)
    if rel.startswith("server/") and rel not in SERVER_MODULES_OF_THE_CORE:
        return ("server",)
    return ()


def sources(*folders: str) -> list[str]:
    return sorted(
        str(f.relative_to(ROOT))
        for folder in folders
        for f in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in f.parts
    )


INSTALLED = sources("protofuse", "client_sdk", "server", "cli")


def test_the_sources_are_found():
    assert (
        "protofuse/bank.py" in INSTALLED
        and "cli/main.py" in INSTALLED
        and "server/fusion/server_app.py" in INSTALLED
    )
    assert "client_sdk/clientapp/app.py" in INSTALLED


def test_every_import_is_known():
    unknown = {
        f: sorted(m for m in third_party_imports(ROOT / f) if distribution_of(m) is None)
        for f in INSTALLED + sources("bench")
    }
    unknown = {f: m for f, m in unknown.items() if m}
    assert not unknown, (
        "imports with no distribution in DISTRIBUTION (add them, then declare them for their "
        f"role): {unknown}"
    )


@pytest.mark.parametrize("rel", INSTALLED + sources("bench"))
def test_every_import_is_declared_for_its_role(rel):
    role = role_of(rel)
    allowed = declared(*role)
    missing = sorted(
        {
            f"{m} ({distribution_of(m)})"
            for m in third_party_imports(ROOT / rel)
            if distribution_of(m) not in allowed and distribution_of(m) is not None
        }
    )
    where = "dependencies" + "".join(f" + [{r}]" for r in role)
    assert not missing, f"{rel} imports {missing}, not declared in pyproject.toml's {where}"


def test_the_core_imports_no_flower_ray_or_benchmark_library():
    core = [f for f in INSTALLED if not role_of(f)]
    wrong = {
        f: sorted(m for m in third_party_imports(ROOT / f) if m.split(".")[0] in NOT_IN_CORE)
        for f in core
    }
    wrong = {f: m for f, m in wrong.items() if m}
    assert not wrong, wrong


def test_the_base_install_holds_no_side():
    base = declared()
    assert base.isdisjoint(
        {
            "flwr",
            "ray",
            "scikit-learn",
            "mlxtend",
            "matplotlib",
            "river",
            "grpcio",
            "grpcio-health-checking",
            "grpcio-reflection",
            "pytest",
        }
    ), base


def test_only_simulation_brings_ray():
    optional = PYPROJECT["project"]["optional-dependencies"]
    for extra in ("client", "server"):
        reqs = [requirement_name(r) for r in optional[extra]]
        assert ("flwr", set()) in reqs, f"[{extra}] needs Flower without its simulation engine"
        assert not any(extras for name, extras in reqs if name in ("flwr", "protofuse")), (
            f"[{extra}] must not pull an extra (Ray): {optional[extra]}"
        )
        assert declared(extra).isdisjoint(
            {"ray", "scikit-learn", "mlxtend", "matplotlib", "river"}
        ), extra
    assert ("flwr", {"simulation"}) in [requirement_name(r) for r in optional["simulation"]]


def test_the_test_extra_holds_every_other_extra():
    """Every extra but the fuzzer's (a tool of `make fuzz`, like mutmut for `make mutation`)."""
    optional = {normalize(k) for k in PYPROJECT["project"]["optional-dependencies"]}
    assert "atheris" not in declared("test")
    assert declared("test") >= declared(*(optional - {"test", "fuzz"})) | {
        "pytest",
        "grpcio-tools",
        "ruff",
        "mypy",
        "hypothesis",
    }


def test_constraints_pin_the_linters_and_keep_packaging_for_flower():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9._-]+", line)[0]
            pins[normalize(name)] = line[len(name) :]
    assert pins.get("ruff", "").startswith("==") and pins.get("mypy", "").startswith("=="), pins
    assert pins.get("torch", "").startswith("=="), "torch's exact version lives in constraints.txt"
    assert "<26" in pins.get("packaging", ""), "Flower 1.42 requires packaging<26"
    assert not any("==" in r for r in PYPROJECT["project"]["dependencies"]), (
        "exact pins belong in constraints.txt"
    )
