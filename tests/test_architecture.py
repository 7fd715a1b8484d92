"""The folder tree is the architecture, and dvc.yaml knows what each stage runs:
layers import downward only (import-linter's contract in pyproject.toml), no import circle
anywhere in vitpipe/, and each stage's deps cover every vitpipe module it runs and no more
(scripts/stage_code.py). Each check is also shown failing on a planted violation."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def load_stage_code():
    spec = importlib.util.spec_from_file_location("stage_code", ROOT / "scripts" / "stage_code.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["stage_code"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def cycles(graph) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = set()
                    while True:
                        m = stack.pop()
                        on.discard(m)
                        scc.add(m)
                        if m == node:
                            break
                    if len(scc) > 1:
                        out.append(scc)
    return out


def package_graph():
    return grimp.build_graph("vitpipe", exclude_type_checking_imports=True, cache_dir=None)


def test_layers_hold():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_a_planted_upward_import_breaks_the_layers(tmp_path):
    shutil.copytree(ROOT / "vitpipe", tmp_path / "vitpipe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    compute = tmp_path / "vitpipe" / "costmodel" / "compute.py"
    # the cost model asking the hardware probe: the circle this layout broke
    compute.write_text(compute.read_text() + "\n\ndef _probe():\n    from vitpipe.hardware import probe\n")
    r = lint_imports(tmp_path)
    assert r.returncode == 1, r.stdout
    assert "BROKEN" in r.stdout and "vitpipe.costmodel.compute -> vitpipe.hardware.probe" in r.stdout


def test_no_import_circle_anywhere():
    assert cycles(package_graph()) == []


def test_a_planted_circle_is_found():
    graph = package_graph()
    graph.add_import(importer="vitpipe.costmodel.devices", imported="vitpipe.hardware.precision")
    assert {"vitpipe.costmodel.devices", "vitpipe.hardware.precision"} <= set().union(*cycles(graph))


def test_every_stage_declares_the_code_it_runs():
    stage_code = load_stage_code()
    for sc in stage_code.check(ROOT):
        assert sc.missing == [], f"{sc.stage} runs code dvc.yaml does not declare: {sc.missing}"
        assert sc.too_broad == [], f"{sc.stage} declares more than it runs: {sc.too_broad}"
    by_stage = {sc.stage: sc for sc in stage_code.check(ROOT)}
    # what the issue found missing: the augmentation and the model builder are training code
    for stage in ("train_scratch", "finetune", "pretrain"):
        assert {"vitpipe/data/prepared_store.py", "vitpipe/models/registry.py",
                "vitpipe/hardware/precision.py", "vitpipe/checkpoints/format.py"} <= by_stage[stage].files
    # and stay narrow: no report code in training, no model code in the data stages
    assert not any(f.startswith("vitpipe/report") for f in by_stage["train_scratch"].files)
    assert not any(f.startswith("vitpipe/models") for f in by_stage["download"].files | by_stage["preprocess"].files)


def test_a_missing_or_too_broad_dep_is_found():
    stage_code = load_stage_code()
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = doc["stages"]["train_scratch"]["deps"]
    deps.remove("vitpipe/training")
    deps.append("vitpipe/report")
    sc = {s.stage: s for s in stage_code.check(ROOT, doc)}["train_scratch"]
    assert "vitpipe/training/loop.py" in sc.missing
    assert any(d.startswith("vitpipe/report ") for d in sc.too_broad)


def test_a_module_loaded_by_name_counts(tmp_path):
    """data sources are imported by name on demand: download still declares them."""
    stage_code = load_stage_code()
    by_stage = {s.stage: s for s in stage_code.check(ROOT)}
    assert {"vitpipe/data/cifar.py", "vitpipe/data/pets.py"} <= by_stage["download"].files


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_every_stage_script_is_a_stage(script):
    """A script under stages/ that dvc.yaml does not run would escape the check above."""
    assert f"stages/{script}" in (ROOT / "dvc.yaml").read_text()
