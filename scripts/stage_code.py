"""Which vitpipe code each DVC stage runs, and whether dvc.yaml declares it.

A stage runs its script and every vitpipe module the script imports, directly or through
other modules, imports inside functions included (a static reading cannot know which are
called). Its `deps` must cover each of them, or a code change leaves `dvc status` clean and
DVC's run-cache hands back results of the old code. They must also stay narrow: a folder is
listed only where the stage imports most of it (at least FOLDER_SHARE of its modules), so an
edit to report code never marks a training stage changed.

    python scripts/stage_code.py           # per stage: what is missing or too broad (exit 1 if any)
    python scripts/stage_code.py --deps    # per stage: the code deps to paste into dvc.yaml

tests/test_architecture.py runs the same check.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import grimp
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vitpipe"
FOLDER_SHARE = 2 / 3


@dataclass
class StageCode:
    stage: str
    script: str
    modules: set[str]        # every vitpipe module it runs (dotted names)
    files: set[str]          # their files, relative to the root
    declared: list[str]      # the vitpipe/ and stages/ paths its deps list
    missing: list[str]       # files it runs that no dep covers
    too_broad: list[str]     # deps that cover nothing it runs, or a folder it uses little of


def module_file(module: str, root: Path = ROOT) -> str:
    path = root / Path(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(root))


def runs_code(init: Path) -> bool:
    """An __init__.py that is more than a docstring runs code whenever its package is imported."""
    body = ast.parse(init.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


def script_imports(script: Path, graph) -> set[str]:
    """vitpipe modules a script imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == PACKAGE:
            for a in node.names:  # `from vitpipe import params`: a submodule, or a name in the package
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in graph.modules else node.module)
    return found


def add_imports_by_name(graph, root: Path = ROOT) -> None:
    """A module that names another as a string ("vitpipe.data.cifar:Cifar10Source", loaded with
    importlib on demand) runs it too: add those imports to the graph."""
    for m in list(graph.modules):
        for node in ast.walk(ast.parse((root / module_file(m, root)).read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = node.value.split(":")[0]
                if named != m and named in graph.modules:
                    graph.add_import(importer=m, imported=named)


def closure(modules: set[str], graph, root: Path = ROOT) -> set[str]:
    """The modules, what they import transitively, and every package __init__ that runs code."""
    out = set(modules)
    for m in modules:
        out |= graph.find_upstream_modules(m)
    for m in list(out):
        parts = m.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if runs_code(root / Path(*parts[:i]) / "__init__.py"):
                out.add(parent)
    # a package whose __init__ is only a docstring runs nothing of its own
    return {m for m in out if not ((root / Path(*m.split("."))).is_dir()
                                   and not runs_code(root / Path(*m.split(".")) / "__init__.py"))}


def stage_scripts(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (its script, its deps as written)."""
    out = {}
    for name, st in dvc_yaml["stages"].items():
        body = st.get("do", st)
        script = next(w for w in body["cmd"].split() if w.startswith("stages/") and w.endswith(".py"))
        out[name] = (script, [str(d) for d in body.get("deps", [])])
    return out


def covered(file: str, dep: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def package_files(folder: str, root: Path = ROOT) -> set[str]:
    """The modules of a folder that count for FOLDER_SHARE: its .py files, less an
    __init__.py that is only a docstring."""
    return {str(p.relative_to(root)) for p in (root / folder).rglob("*.py")
            if p.name != "__init__.py" or runs_code(p)}


def check(root: Path = ROOT, dvc_yaml: dict | None = None) -> list[StageCode]:
    dvc_yaml = dvc_yaml or yaml.safe_load((root / "dvc.yaml").read_text())
    sys.path.insert(0, str(root))
    try:
        graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)
    finally:
        sys.path.remove(str(root))
    add_imports_by_name(graph, root)
    out = []
    for stage, (script, deps) in stage_scripts(dvc_yaml).items():
        modules = closure(script_imports(root / script, graph), graph, root)
        files = {module_file(m, root) for m in modules} | {script}
        code_deps = [d for d in deps if d.startswith((f"{PACKAGE}/", f"{PACKAGE}.", "stages/"))]
        missing = sorted(f for f in files if not any(covered(f, d) for d in code_deps))
        too_broad = []
        for d in code_deps:
            used = [f for f in files if covered(f, d)]
            if not used:
                too_broad.append(f"{d} (the stage runs none of it)")
            elif (root / d).is_dir():
                share = len(used) / max(1, len(package_files(d, root)))
                if share < FOLDER_SHARE:
                    too_broad.append(f"{d} (the stage runs {len(used)} of its {len(package_files(d, root))} modules:"
                                     " list those files)")
        out.append(StageCode(stage, script, modules, files, code_deps, missing, too_broad))
    return out


def suggested_deps(sc: StageCode, root: Path = ROOT) -> list[str]:
    """Files, folded into their folder where the stage runs most of it."""
    by_folder: dict[str, list[str]] = {}
    for f in sorted(sc.files):
        by_folder.setdefault(str(Path(f).parent), []).append(f)
    deps = []
    for folder, files in sorted(by_folder.items()):
        if folder != PACKAGE and folder.startswith(PACKAGE) and len(files) / len(package_files(folder, root)) >= FOLDER_SHARE:
            deps.append(folder)
        else:
            deps.extend(files)
    return sorted(deps, key=lambda d: (not d.startswith("stages/"), d))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deps", action="store_true", help="print the code deps each stage should declare")
    args = ap.parse_args(argv)
    bad = 0
    for sc in check():
        if args.deps:
            print(f"{sc.stage}:\n" + "".join(f"  - {d}\n" for d in suggested_deps(sc)))
            continue
        for f in sc.missing:
            print(f"{sc.stage}: runs {f}, which its deps do not cover")
        for d in sc.too_broad:
            print(f"{sc.stage}: dep {d}")
        bad += bool(sc.missing or sc.too_broad)
    if not args.deps and not bad:
        print("every stage declares exactly the code it runs")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
