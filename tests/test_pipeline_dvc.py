"""The pipeline through real `dvc` commands, on the micro params, in a temp git repo."""

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run, write_params

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = set()
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            paths.add(repo / out["path"])
    return sorted(paths)


def test_repro_exp_metrics_plots(project):
    repo = project
    first = run(DVC + ["repro"], repo)
    expected = {"download", "preprocess", "profile", "train_scratch", "evaluate_scratch", "report",
                *(f"{s}@{v}" for s in ("pretrain", "finetune", "evaluate") for v in ("vit_micro", "resnet18"))}
    assert ran_stages(first.stdout) == expected
    outs = declared_outputs(repo)
    assert outs and all(p.exists() for p in outs), [p for p in outs if not p.exists()]
    for p in outs:
        if p.is_file():
            assert p.stat().st_size > 0, p
    report = (repo / "reports/report.md").read_text()
    assert "vit_micro" in report and "resnet18" in report and "figures/training_curves.png" in report
    scratch = json.loads((repo / "metrics/evaluate/scratch.json").read_text())
    assert 0.0 <= scratch["top1"] <= 1.0 and scratch["test_images"] == 359

    # Everything up to date: a second repro runs nothing.
    second = run(DVC + ["repro"], repo)
    assert ran_stages(second.stdout) == set()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)

    # A patch change re-runs the scratch network, its evaluation and the report; nothing upstream.
    exp = run(DVC + ["exp", "run", "-S", "model.patch=8"], repo)
    assert ran_stages(exp.stdout) == {"train_scratch", "evaluate_scratch", "report"}
    diff = run(DVC + ["metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)
    assert "metrics/train_scratch.json" in changed and "params" in changed["metrics/train_scratch.json"]
    old, new = (changed["metrics/train_scratch.json"]["params"][k] for k in ("old", "new"))
    assert old != new  # patch 8 has a bigger patch embedding and fewer position embeddings

    run(DVC + ["plots", "show", "-o", "plots_html"], repo)
    page = (repo / "plots_html" / "index.html")
    assert page.exists() and "train_scratch" in page.read_text()

    # Editing one variant's params touches only that variant's stages (and the report). A dry
    # run cannot list evaluate@vit_micro yet: its input (the fine-tuned weights) changes only
    # when finetune@vit_micro has run.
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["variants"]["vit_micro"]["depth"] = 2
    write_params(repo / "params.yaml", doc)
    dry = run(DVC + ["repro", "--dry"], repo)
    assert ran_stages(dry.stdout) == {"pretrain@vit_micro", "finetune@vit_micro", "report"}
