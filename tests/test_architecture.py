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
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
            "--no-cache",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


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
        assert {
            "vitpipe/data/prepared_store.py",
            "vitpipe/models/registry.py",
            "vitpipe/hardware/precision.py",
            "vitpipe/checkpoints/format.py",
        } <= by_stage[stage].files
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


# ---------------------------------------------------------------------------------------
# dvc.yaml's code deps and plots are written by `scripts/stage_code.py --write`


def test_dvc_yaml_is_what_write_makes_of_it():
    """Fails when a stage's imports changed and `python scripts/stage_code.py --write` was not
    run (or a generated line was edited by hand)."""
    stage_code = load_stage_code()
    assert stage_code.written(ROOT) == (ROOT / "dvc.yaml").read_text(), (
        "dvc.yaml is stale: run `python scripts/stage_code.py --write` and commit it"
    )


def copy_tree(dst: Path) -> Path:
    for folder in ("vitpipe", "stages"):
        shutil.copytree(ROOT / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "stage_code.py", dst / "scripts")
    shutil.copy(ROOT / "dvc.yaml", dst)
    return dst


def stage_code_cli(root: Path, *args) -> subprocess.CompletedProcess:
    """scripts/stage_code.py of the tree at `root`, on that tree (a process of its own: this
    one has imported the vitpipe of the repository)."""
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "stage_code.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )


def test_write_after_a_new_import_updates_exactly_the_stages_that_run_it(tmp_path):
    """A training module that imports one more module: --write adds it to the deps of the three
    training stages and to no other stage, and keeps every line that is not a code dep."""
    root = copy_tree(tmp_path)
    loop = root / "vitpipe" / "training" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _maps():\n    from vitpipe.evaluation import attention_maps\n")
    before = (root / "dvc.yaml").read_text()
    assert stage_code_cli(root).returncode == 1  # the check sees the stale deps
    r = stage_code_cli(root, "--write")
    assert r.returncode == 0 and "rewritten" in r.stdout, r.stdout + r.stderr
    after = (root / "dvc.yaml").read_text()
    old, new = yaml.safe_load(before)["stages"], yaml.safe_load(after)["stages"]

    def deps(stage):
        return stage.get("do", stage)["deps"]

    assert {name for name in old if deps(old[name]) != deps(new[name])} == {"pretrain", "train_scratch", "finetune"}
    for name in ("pretrain", "train_scratch", "finetune"):
        assert any(d in ("vitpipe/evaluation/attention_maps.py", "vitpipe/evaluation") for d in deps(new[name])), name
    # every other line as it was: the only lines added or removed are code deps
    removed, added = (
        set(before.splitlines()) - set(after.splitlines()),
        set(after.splitlines()) - set(before.splitlines()),
    )
    assert all(line.strip().removeprefix("- ").startswith("vitpipe/") for line in removed | added), removed | added
    assert stage_code_cli(root).returncode == 0  # every stage declares what it runs
    assert "already as written" in stage_code_cli(root, "--write").stdout  # a second --write changes nothing


def test_write_puts_back_a_plot_edited_by_hand(tmp_path):
    root = copy_tree(tmp_path)
    text = (root / "dvc.yaml").read_text()
    edited = text.replace("          y: val_acc\n", "          y: val_loss\n", 1)
    assert edited != text
    (root / "dvc.yaml").write_text(edited)
    assert "rewritten" in stage_code_cli(root, "--write").stdout
    assert (root / "dvc.yaml").read_text() == text
