"""Mutation testing of the method's modules with mutmut 3: a measurement of the tests, never run in CI.

    python -m bench.mutation --sample 3 --out bench-results/mutation    # a fixed third: ~40 min on 2 cores
    python -m bench.mutation --sample 1                                  # every mutant (hours on 2 cores)
    python -m bench.mutation --sample 3 --list                          # generate and count, run nothing
    python -m bench.mutation --report-only --out bench-results/mutation # re-report the last run (new equivalences)

What is mutated (``only_mutate``) and what travels into mutmut's ``mutants/`` copy (``also_copy``)
is set in ``[tool.mutmut]`` of pyproject.toml; mutmut reads it from the working directory, so every
mutmut call here runs in the repository root. mutmut must already be installed (``mutmut==3.8.1``):
this script installs nothing.

Packages installed under another name than their folder (``[tool.setuptools.package-dir]``:
``protofuse_server`` is ``server/``) are mutated under the installed name. mutmut names a mutant's
module after its path, and its trampoline switches a mutant on only in the module whose ``__name__``
is that name; mutants/ comes first on ``sys.path``, so the tests import the mutated copy only if it
sits in mutants/ under the name they import. So for the whole run a link ``protofuse_server ->
server`` stands in the repository root (a source path of ``[tool.mutmut]``, removed at the end),
and every other renamed package that travels by ``also_copy`` (``cli/``) gets the same link inside
mutants/, so that the tests import the copy and not the editable install's checkout.

Test selection is mutmut's own: a stats pass runs the selected tests (``pytest_add_cli_args_test_selection``:
the unit tier; the integration tier starts real servers, minutes per mutant) once with every mutated
function recording the tests that reach it (directly or through other functions), and each mutant
then runs only those tests, with ``-x``, in a child forked from a process that already imported torch.

The sample keeps a mutant when ``crc32(name) % N == 0``. Names are ``module.function__mutmut_K``,
fixed by the source, so the same sample is drawn on every run until the mutated code changes: the
score can be compared before and after tests are added. ``mutants/`` is rebuilt on every run, so no
stats or verdict from an earlier run (or older tests) leaks into this one.

Writes ``OUT/mutation.json`` (every sampled mutant with its status) and ``OUT/mutation.md`` (score,
counts per module, survivors with their diffs). Survivors judged equivalent or harmless are listed,
with the reason, in ``bench/mutation-equivalent.toml``; the report keeps them apart from the
survivors nobody has explained yet.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT = ROOT / "bench" / "mutation-equivalent.toml"
MUTMUT = (
    Path(sys.executable).parent / "mutmut"
)  # the console script: `python -m mutmut` re-imports its __main__

# One torch thread per worker: the workers already share the cores, and extra threads only contend.
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# What `mutmut run` does before its stats pass, without the stats pass: the mutant names exist only
# once mutants/ is generated, and the sample is drawn from them before anything runs.
GENERATE = """
import os, sys
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
create_mutants(int(sys.argv[1]))
"""

# Verdicts that come from running tests (or from finding none to run): the score's denominator.
# "no tests" counts: a mutant that no test reaches is a mutant that no test kills.
RUN_STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault")
NOT_KILLED = ("survived", "no tests", "timeout", "suspicious", "segfault")


@dataclass
class Mutant:
    name: str
    module: str
    function: str
    status: str
    equivalent: str | None = None  # the reason given in mutation-equivalent.toml
    diff: str | None = None  # `mutmut show`, for every mutant not killed


def mutmut_config() -> dict:
    """The [tool.mutmut] section of pyproject.toml; without it mutmut would guess what to mutate."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("mutmut")
    if not config or not config.get("only_mutate"):
        raise SystemExit("pyproject.toml has no [tool.mutmut] section with only_mutate")
    return config


def package_dirs() -> dict[str, str]:
    """Installed name -> folder, for the packages whose folder has another name (protofuse_server -> server)."""
    setuptools = (
        tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    )
    return {
        name: folder
        for name, folder in setuptools.get("package-dir", {}).items()
        if name and name != folder
    }


@contextmanager
def installed_names(config: dict) -> Iterator[None]:
    """For the run: each source path that is an installed name links to its folder (protofuse_server -> server)."""
    made = []
    try:
        for name in config.get("source_paths", []):
            folder = package_dirs().get(name)
            if folder is None:
                continue
            link = ROOT / name
            if link.is_symlink() and os.readlink(link) == folder:
                continue  # left by an interrupted run
            if link.exists() or link.is_symlink():
                raise SystemExit(f"{link} exists and is not a link to {folder}/; move it away")
            link.symlink_to(folder, target_is_directory=True)
            made.append(link)
        yield
    finally:
        for link in made:
            link.unlink()


def link_copied_packages(config: dict) -> None:
    """mutants/protofuse_cli -> cli: a renamed package that travels by also_copy is imported from the copy."""
    sources = set(config.get("source_paths", []))
    for name, folder in package_dirs().items():
        link, target = ROOT / "mutants" / name, ROOT / "mutants" / folder
        if name not in sources and target.is_dir() and not (link.exists() or link.is_symlink()):
            link.symlink_to(folder, target_is_directory=True)


def mutmut(*args: str, log: Path | None = None) -> str:
    """Run the mutmut CLI in the repository root; raise with its output when it fails."""
    env = os.environ | THREAD_ENV
    if log is None:
        done = subprocess.run(
            [str(MUTMUT), *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(
                f"mutmut {args[0]} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout
    # A long run goes to a log file (mutmut redraws a progress line many times a second).
    with log.open("w") as f:
        code = subprocess.run(
            [str(MUTMUT), *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    if code:
        raise SystemExit(
            f"mutmut {args[0]} failed ({code}); see {log}:\n" + log.read_text()[-3000:]
        )
    return ""


def generate(config: dict, max_children: int) -> None:
    """Rebuild mutants/ from scratch: stale stats would map mutants to yesterday's tests."""
    shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    subprocess.run(
        [sys.executable, "-c", GENERATE, str(max_children)],
        cwd=ROOT,
        env=os.environ | THREAD_ENV,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    link_copied_packages(config)


def statuses() -> dict[str, str]:
    """Every generated mutant and its status, as `mutmut results --all true` prints them."""
    out: dict[str, str] = {}
    for line in mutmut("results", "--all", "true").splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            out[name] = status
    return out


def in_sample(name: str, n: int) -> bool:
    """The deterministic sample: crc32 of the UTF-8 name (method names contain 'ǁ'), not hash(), which is salted per process."""
    return zlib.crc32(name.encode()) % n == 0


def split_name(name: str) -> tuple[str, str]:
    """'protofuse.bank.xǁBankǁsave__mutmut_3' -> ('protofuse.bank', 'Bank.save')."""
    module, _, mangled = name.partition("__mutmut_")[0].rpartition(".")
    if mangled.startswith("xǁ"):
        cls, _, method = mangled[2:].partition("ǁ")
        return module, f"{cls}.{method}"
    return module, mangled.removeprefix("x_")


def load_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """name -> reason, from [[mutant]] tables with `name` and `reason`."""
    if not path.exists():
        return {}
    entries = tomllib.loads(path.read_text()).get("mutant", [])
    return {e["name"]: e.get("reason", "") for e in entries}


def unmutated_functions(config: dict, names: set[str]) -> list[tuple[str, str, str]]:
    """(module, function, why) for functions of the mutated files that got no mutant at all.

    mutmut 3 only mutates function bodies, and skips decorated functions (other than staticmethod and
    classmethod) because it cannot wrap them in its trampoline: @property, @torch.no_grad(), pydantic
    validators. The report names them so that a gap in the sample is not mistaken for a gap in mutmut.
    """
    from fnmatch import fnmatch

    mangled = {n.partition("__mutmut_")[0] for n in names}
    folders = package_dirs()
    files = {}  # the path mutmut sees (protofuse_server/...) -> the file (server/...)
    for source in config.get("source_paths", []):
        folder = ROOT / folders.get(source, source)
        files |= {f"{source}/{p.relative_to(folder).as_posix()}": p for p in folder.glob("**/*.py")}
    out = []
    for rel, path in sorted(files.items()):
        if not any(fnmatch(rel, p) for p in config["only_mutate"]):
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        tree = ast.parse(path.read_text())
        for node in tree.body:
            methods = (
                [(None, node)] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
            )
            if isinstance(node, ast.ClassDef):
                methods = [
                    (node.name, f)
                    for f in node.body
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                ]
            for cls, f in methods:
                key = f"{module}.xǁ{cls}ǁ{f.name}" if cls else f"{module}.x_{f.name}"
                if key in mangled:
                    continue
                decorators = [ast.unparse(d) for d in f.decorator_list]
                why = "decorated @" + ", @".join(decorators) if decorators else "nothing to mutate"
                out.append((module, f"{cls}.{f.name}" if cls else f.name, why))
    return out


def git_head() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def score(mutants: list[Mutant], drop_equivalent: bool = False) -> tuple[int, int]:
    """(killed, run): equivalent survivors leave the denominator when drop_equivalent."""
    run = [
        m
        for m in mutants
        if m.status in RUN_STATUSES
        and not (drop_equivalent and m.equivalent is not None and m.status != "killed")
    ]
    return sum(m.status == "killed" for m in run), len(run)


def pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%" if n else "n/a"


def markdown(
    summary: dict, mutants: list[Mutant], unmutated: list[tuple[str, str, str]], stale: list[str]
) -> str:
    """The human report: score, counts per module, the unexplained survivors with their diffs, then the explained ones."""
    killed, run = score(mutants)
    k2, n2 = score(mutants, drop_equivalent=True)
    counts = Counter(m.status for m in mutants)
    lines = [
        "# Mutation testing",
        "",
        f"mutmut {summary['mutmut']}, commit `{summary['commit'][:12]}`, {summary['started']}, {summary['max_children']} workers.",
        "",
        f"**Score: {pct(killed, run)}** ({killed} killed / {run} run); {pct(k2, n2)} when the {run - n2} survivors judged equivalent are left out.",
        "",
        f"- mutants generated: {summary['generated']}; sampled: {summary['sampled']} (kept when `crc32(name) % {summary['sample']} == 0`, stable across runs)",
        "- " + ", ".join(f"{s}: {c}" for s, c in sorted(counts.items(), key=lambda sc: -sc[1])),
        f"- elapsed: {summary['elapsed_s'] / 60:.1f} min wall (generation, stats pass, clean run and mutants)",
        "- score = killed / run, where run counts every sampled mutant that got a verdict from the tests; a mutant no test reaches (`no tests`) counts as not killed",
        "",
        "## Per module",
        "",
        "| module | generated | sampled | killed | survived | no tests | timeout | other | score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_module: dict[str, list[Mutant]] = defaultdict(list)
    for m in mutants:
        by_module[m.module].append(m)
    for module in sorted(summary["generated_per_module"]):
        ms = by_module.get(module, [])
        c = Counter(m.status for m in ms)
        other = len(ms) - c["killed"] - c["survived"] - c["no tests"] - c["timeout"]
        lines.append(
            f"| {module} | {summary['generated_per_module'][module]} | {len(ms)} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['timeout']} | {other} | {pct(*score(ms))} |"
        )
    open_ = [m for m in mutants if m.status in NOT_KILLED and m.equivalent is None]
    explained = [m for m in mutants if m.status in NOT_KILLED and m.equivalent is not None]
    lines += ["", f"## Survivors not yet explained ({len(open_)})", ""]
    lines += (
        [
            "Each needs a test that kills it, or an entry in `bench/mutation-equivalent.toml` saying why it cannot matter.",
            "",
        ]
        if open_
        else ["None."]
    )
    for m in open_:
        lines += [
            f"### `{m.name}` ({m.status})",
            "",
            f"{m.module}: `{m.function}`",
            "",
            "```diff",
            (m.diff or "").strip(),
            "```",
            "",
        ]
    lines += ["", f"## Survivors judged equivalent or harmless ({len(explained)})", ""]
    lines += [f"- `{m.name}` ({m.status}): {m.equivalent}" for m in explained] or ["None."]
    if stale:
        lines += [
            "",
            "Entries of `bench/mutation-equivalent.toml` that are killed now, or were not generated (stale):",
            "",
        ]
        lines += [f"- `{name}`" for name in stale]
    lines += [
        "",
        f"## Functions with no mutants ({len(unmutated)})",
        "",
        "mutmut 3 mutates function bodies only, and skips decorated functions; module-level code and class bodies (dataclass fields, pydantic models) get no mutants.",
        "",
    ]
    lines += [f"- {module}: `{function}` ({why})" for module, function, why in unmutated]
    return "\n".join(lines) + "\n"


def collect(sample: list[str], max_children: int) -> list[Mutant]:
    """The sampled mutants with their verdicts, the equivalence notes, and the diff of each one not killed."""
    status = statuses()
    equivalent = load_equivalent()
    mutants = [
        Mutant(n, *split_name(n), status.get(n, "missing"), equivalent.get(n)) for n in sample
    ]
    open_ = [m for m in mutants if m.status in NOT_KILLED]
    with ThreadPoolExecutor(
        max_children
    ) as pool:  # one `mutmut show` costs ~1 s of imports; hundreds add up
        for m, diff in zip(open_, pool.map(lambda m: mutmut("show", m.name), open_)):
            m.diff = diff.partition("\n")[2]  # drop mutmut's '# name: status' header
    return mutants


def write_report(
    out: Path,
    run_info: dict,
    config: dict,
    generated: list[str],
    sample: list[str],
    mutants: list[Mutant],
) -> None:
    """OUT/mutation.json and OUT/mutation.md."""
    equivalent = load_equivalent()
    killed_now = {m.name for m in mutants if m.status == "killed"}
    stale = sorted(n for n in equivalent if n not in generated or n in killed_now)
    unmutated = unmutated_functions(config, set(generated))
    killed, run = score(mutants)
    summary = {
        **run_info,
        "mutmut": metadata.version("mutmut"),
        "sample_rule": f"zlib.crc32(name.encode()) % {run_info['sample']} == 0",
        "only_mutate": config["only_mutate"],
        "generated": len(generated),
        "generated_per_module": dict(sorted(Counter(split_name(n)[0] for n in generated).items())),
        "sampled": len(sample),
        "counts": dict(Counter(m.status for m in mutants)),
        "killed": killed,
        "run": run,
        "score": killed / run if run else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "mutation.json").write_text(
        json.dumps(
            {
                **summary,
                "unmutated_functions": [list(u) for u in unmutated],
                "mutants": [asdict(m) for m in mutants],
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )
    (out / "mutation.md").write_text(markdown(summary, mutants, unmutated, stale))
    print(
        f"score {pct(killed, run)} ({killed} killed / {run} run) in {summary['elapsed_s'] / 60:.1f} min; report in {out / 'mutation.md'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sample",
        type=int,
        default=3,
        help="keep a mutant when crc32(name) %% N == 0 (1: every mutant)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/mutation"))
    p.add_argument(
        "--max-children", type=int, default=2, help="mutants tested in parallel (forked workers)"
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="generate mutants and print the sample's size per module; run nothing",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from the verdicts already in mutants/ (after editing mutation-equivalent.toml)",
    )
    args = p.parse_args(argv)
    if not MUTMUT.exists():
        raise SystemExit(f"{MUTMUT} not found: pip install mutmut==3.8.1")
    config = mutmut_config()
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    with installed_names(config):
        return run(args, config, out)


def run(args: argparse.Namespace, config: dict, out: Path) -> int:
    """The run itself (or the report alone), while the installed names stand."""
    if args.report_only:
        # The run's own facts (commit, start, wall time) come from its JSON, not from now.
        previous = json.loads((out / "mutation.json").read_text())
        run_info = {
            k: previous[k] for k in ("commit", "started", "elapsed_s", "max_children", "sample")
        }
        generated = sorted(statuses())
        sample = [n for n in generated if in_sample(n, run_info["sample"])]
        write_report(out, run_info, config, generated, sample, collect(sample, args.max_children))
        return 0

    run_info = {
        "commit": git_head(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "max_children": args.max_children,
        "sample": args.sample,
    }
    t0 = time.perf_counter()
    generate(config, args.max_children)
    generated = sorted(statuses())
    sample = [n for n in generated if in_sample(n, args.sample)]
    per_module = Counter(split_name(n)[0] for n in generated)
    sampled_per_module = Counter(split_name(n)[0] for n in sample)
    print(f"{len(generated)} mutants generated, {len(sample)} sampled (crc32 % {args.sample} == 0)")
    for module in sorted(per_module):
        print(f"  {module}: {sampled_per_module[module]} / {per_module[module]}")
    if args.list or not sample:
        return 0

    out.mkdir(parents=True, exist_ok=True)
    # Naming the mutants makes mutmut run exactly these (even ones with a verdict), and only the tests that reach them.
    mutmut("run", "--max-children", str(args.max_children), *sample, log=out / "mutmut.log")
    run_info["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_report(out, run_info, config, generated, sample, collect(sample, args.max_children))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
