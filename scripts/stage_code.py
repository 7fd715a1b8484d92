"""Which vitpipe code each DVC stage runs, and whether dvc.yaml declares it.

A stage runs its script and every vitpipe module the script imports, directly or through
other modules, imports inside functions included (a static reading cannot know which are
called). Its `deps` must cover each of them, or a code change leaves `dvc status` clean and
DVC's run-cache hands back results of the old code. They must also stay narrow: a folder is
listed only where the stage imports most of it (at least FOLDER_SHARE of its modules), so an
edit to report code never marks a training stage changed.

    python scripts/stage_code.py           # per stage: what is missing or too broad (exit 1 if any)
    python scripts/stage_code.py --deps    # per stage: the code deps it should declare
    python scripts/stage_code.py --write   # rewrite the code deps (and dvc.yaml's plots), nothing else

It reads both pipelines: dvc.yaml (scripts in stages/) and studies/dvc.yaml (scripts in
studies/, run from the root: `wdir: ..`).

`--write` writes each stage's code deps (from the import graph) and its `plots:` (from the
pipeline manifest, vitpipe/pipeline.py) into dvc.yaml and keeps every other line as it is
(comments, params, outs, the data deps). tests/test_architecture.py fails when the committed
dvc.yaml differs from what `--write` makes of it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import grimp
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vitpipe"
FOLDER_SHARE = 2 / 3
PIPELINES = ("dvc.yaml", "studies/dvc.yaml")  # their stages' scripts: stages/*.py, studies/*.py
SCRIPT_DIRS = ("stages/", "studies/")


@dataclass
class StageCode:
    stage: str
    script: str
    modules: set[str]  # every vitpipe module it runs (dotted names)
    files: set[str]  # their files, relative to the root
    declared: list[str]  # the vitpipe/ and stages/ paths its deps list
    missing: list[str]  # files it runs that no dep covers
    too_broad: list[str]  # deps that cover nothing it runs, or a folder it uses little of


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
    out, todo = set(), set(modules)
    while todo:  # a package __init__ that runs code imports modules of its own: follow them too
        m = todo.pop()
        out.add(m)
        found = set(graph.find_upstream_modules(m))
        parts = m.split(".")
        found |= {
            ".".join(parts[:i]) for i in range(1, len(parts)) if runs_code(root / Path(*parts[:i]) / "__init__.py")
        }
        todo |= found - out
    # a package whose __init__ is only a docstring runs nothing of its own
    return {
        m
        for m in out
        if not ((root / Path(*m.split("."))).is_dir() and not runs_code(root / Path(*m.split(".")) / "__init__.py"))
    }


def stage_scripts(dvc_yaml: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (its script, its deps as written)."""
    out = {}
    for name, st in dvc_yaml["stages"].items():
        body = st.get("do", st)
        script = next(w for w in body["cmd"].split() if w.startswith(SCRIPT_DIRS) and w.endswith(".py"))
        out[name] = (script, [str(d) for d in body.get("deps", [])])
    return out


def covered(file: str, dep: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def package_files(folder: str, root: Path = ROOT) -> set[str]:
    """The modules of a folder that count for FOLDER_SHARE: its .py files, less an
    __init__.py that is only a docstring."""
    return {str(p.relative_to(root)) for p in (root / folder).rglob("*.py") if p.name != "__init__.py" or runs_code(p)}


def check(root: Path = ROOT, dvc_yaml: dict | None = None, pipeline: str = "dvc.yaml") -> list[StageCode]:
    dvc_yaml = dvc_yaml or yaml.safe_load((root / pipeline).read_text())
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
        code_deps = [d for d in deps if is_code(d)]
        missing = sorted(f for f in files if not any(covered(f, d) for d in code_deps))
        too_broad = []
        for d in code_deps:
            used = [f for f in files if covered(f, d)]
            if not used:
                too_broad.append(f"{d} (the stage runs none of it)")
            elif (root / d).is_dir():
                share = len(used) / max(1, len(package_files(d, root)))
                if share < FOLDER_SHARE:
                    too_broad.append(
                        f"{d} (the stage runs {len(used)} of its {len(package_files(d, root))} modules:"
                        " list those files)"
                    )
        out.append(StageCode(stage, script, modules, files, code_deps, missing, too_broad))
    return out


def suggested_deps(sc: StageCode, root: Path = ROOT) -> list[str]:
    """Files, folded into their folder where the stage runs most of it."""
    by_folder: dict[str, list[str]] = {}
    for f in sorted(sc.files):
        by_folder.setdefault(str(Path(f).parent), []).append(f)
    deps = []
    for folder, files in sorted(by_folder.items()):
        if (
            folder != PACKAGE
            and folder.startswith(PACKAGE)
            and len(files) / len(package_files(folder, root)) >= FOLDER_SHARE
        ):
            deps.append(folder)
        else:
            deps.extend(files)
    return sorted(deps, key=lambda d: (not d.startswith(SCRIPT_DIRS), d))


def is_code(dep: str) -> bool:
    """A code dep: vitpipe's modules and the stage scripts (not studies/results, studies/models)."""
    return dep.startswith((f"{PACKAGE}/", f"{PACKAGE}.", "stages/")) or (
        dep.startswith("studies/") and dep.endswith(".py")
    )


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the block that starts below lines[start]: the lines indented deeper than
    `indent` (blank lines and comments inside it included, trailing ones not)."""
    end, i = start + 1, start + 1
    while i < len(lines):
        text = lines[i].strip()
        if text and not text.startswith("#"):
            if _indent(lines[i]) <= indent:
                break
            end = i + 1
        i += 1
    return end


def _stage_spans(lines: list[str]) -> dict[str, tuple[int, int, int]]:
    """stage name -> (first line of its body, end, the body's key indent) in dvc.yaml's lines;
    a foreach stage's body is its `do:` block."""
    top = next(i for i, line in enumerate(lines) if line.rstrip() == "stages:")
    spans = {}
    for i in range(top + 1, _block_end(lines, top, 0)):
        line = lines[i]
        if line.strip() and not line.lstrip().startswith("#") and _indent(line) == 2:
            name = line.strip().split(":")[0]
            end = _block_end(lines, i, 2)
            body, key_indent = i + 1, 4
            for j in range(i + 1, end):
                if lines[j].strip().startswith("do:") and _indent(lines[j]) == 4:
                    body, key_indent = j + 1, 6
            spans[name] = (body, end, key_indent)
    return spans


def _key_line(lines: list[str], start: int, end: int, indent: int, key: str) -> int | None:
    def is_key(text: str) -> bool:  # `deps:`, or `deps: &name` (a YAML anchor other stages reuse)
        return text == f"{key}:" or text.startswith(f"{key}: &")

    return next(
        (
            i
            for i in range(start, end)
            if _indent(lines[i]) == indent and is_key(lines[i].strip().split("#")[0].strip())
        ),
        None,
    )


def _with_code_deps(lines: list[str], start: int, end: int, indent: int, code: list[str]) -> list[str]:
    """The stage's lines with the code entries of its `deps:` replaced by `code`, in the place
    of the first one; its data deps (and their comments) stay where they are."""
    at = _key_line(lines, start, end, indent, "deps")
    if at is None:
        if any(lines[i].strip().startswith("deps: *") for i in range(start, end)):
            return lines  # `deps: *name`: the stage that defines the anchor writes them
        raise SystemExit(f"dvc.yaml: a stage at line {start} has no deps: list")
    stop = _block_end(lines, at, indent)
    items = lines[at + 1 : stop]
    entry = " " * (indent + 2) + "- "
    first = next(
        (k for k, line in enumerate(items) if line.startswith(entry) and is_code(line[len(entry) :].split()[0])),
        len(items),
    )
    kept = [line for line in items if not (line.startswith(entry) and is_code(line[len(entry) :].split()[0]))]
    before = sum(1 for line in items[:first] if line in kept)
    new = kept[:before] + [entry + d for d in code] + kept[before:]
    return lines[: at + 1] + new + lines[stop:]


def plots_lines(plots, indent: int) -> list[str]:
    """A stage's `plots:` block: each series kept in git (cache: false, a few KiB)."""
    if not plots:
        return []
    out = [" " * indent + "plots:"]
    for p in plots:
        out.append(" " * (indent + 2) + f"- {p.path}:")
        out += [" " * (indent + 6) + f"{k}: {v}" for k, v in {"cache": "false", **p.props}.items()]
    return out


def _with_plots(lines: list[str], start: int, end: int, indent: int, plots) -> list[str]:
    at = _key_line(lines, start, end, indent, "plots")
    new = plots_lines(plots, indent)
    if at is None:
        return lines[:end] + new + lines[end:]
    return lines[:at] + new + lines[_block_end(lines, at, indent) :]


def render(text: str, code: dict[str, list[str]], plots: dict[str, tuple] | None) -> str:
    """A pipeline file's text with each stage's code deps and plots replaced (stages from the
    last one up, so the line numbers of those above stay put); plots None: kept as written."""
    lines = text.split("\n")
    for name, (start, end, indent) in sorted(_stage_spans(lines).items(), key=lambda kv: -kv[1][0]):
        if plots is not None:
            lines = _with_plots(lines, start, end, indent, plots.get(name, ()))
            start, end, indent = _stage_spans(lines)[name]
        lines = _with_code_deps(lines, start, end, indent, code[name])
    return "\n".join(lines)


def written(root: Path = ROOT, pipeline_file: str = "dvc.yaml") -> str:
    """What `--write` makes of root/<pipeline_file>: code deps from the imports; dvc.yaml's
    plots from the pipeline manifest (the studies keep theirs as written)."""
    code = {sc.stage: suggested_deps(sc, root) for sc in check(root, pipeline=pipeline_file)}
    text = (root / pipeline_file).read_text()
    if pipeline_file != "dvc.yaml":
        return render(text, code, None)
    spec = importlib.util.spec_from_file_location("vitpipe_manifest", root / PACKAGE / "pipeline.py")
    pipeline = sys.modules["vitpipe_manifest"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(pipeline)
    plots = {s.name: s.plots for s in pipeline.stages()}
    return render(text, code, plots)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deps", action="store_true", help="print the code deps each stage should declare")
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps and plots")
    args = ap.parse_args(argv)
    if args.write:
        for name in (n for n in PIPELINES if (ROOT / n).exists()):
            before, after = (ROOT / name).read_text(), written(ROOT, name)
            if after != before:
                (ROOT / name).write_text(after)
            print(f"{name}: " + ("rewritten" if after != before else "already as written"))
        return 0
    bad = 0
    for sc in [sc for name in PIPELINES if (ROOT / name).exists() for sc in check(pipeline=name)]:
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
