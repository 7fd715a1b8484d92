"""The pipeline through real `dvc` commands, on the micro params, in a temp git repo."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DVC, run, write_params

pytestmark = pytest.mark.slow


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = set()
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            paths.add(repo / out["path"])
    return sorted(paths)


def changed_stages(repo: Path) -> set[str]:
    return set(json.loads(run(DVC + ["status", "--json"], repo).stdout))


def edit_line(repo: Path, folder: str, defines: str) -> Path:
    """Change one line of the function `defines` (the file under `folder` that defines it)."""
    path = next(p for p in (repo / folder).rglob("*.py") if f"def {defines}(" in p.read_text())
    text = path.read_text()
    path.write_text(text.replace(f"def {defines}(", f"def {defines}(  # edited\n        ", 1))
    return path


def assert_code_changes_rerun_what_runs_them(repo: Path) -> None:
    """What DVC's run-cache relies on: a code change marks every stage that runs the code, and
    nothing else. The augmentation and the model builder are training code; `vitpipe.cli`
    is run by no stage."""
    training = {
        "train_scratch@0",
        "pretrain@vit_micro",
        "pretrain@resnet18",
        "finetune@vit_micro-0",
        "finetune@resnet18-0",
    }
    for folder, function, also in (
        ("vitpipe/data", "shift_and_flip", set()),
        (
            "vitpipe/models",
            "build_model",
            {"evaluate_scratch@0", "evaluate@vit_micro-0", "evaluate@resnet18-0", "validate", "report"},
        ),
    ):
        path = edit_line(repo, folder, function)
        changed = changed_stages(repo)
        assert training | also <= changed, (function, changed)
        run(["git", "checkout", "--", str(path.relative_to(repo))], repo)
    edit_line(repo, "vitpipe", "cmd_plan")
    assert changed_stages(repo) == set()
    run(["git", "checkout", "--", "vitpipe"], repo)


def test_repro_exp_metrics_plots(reproduced_template, reproduced):
    repo, (_, first_stdout) = reproduced, reproduced_template  # the session's first `dvc repro`, copied
    expected = {
        "validate",
        "download",
        "preprocess",
        "profile",
        "train_scratch@0",
        "evaluate_scratch@0",
        "report",
        *(f"pretrain@{v}" for v in ("vit_micro", "resnet18")),
        *(f"{s}@{v}-0" for s in ("finetune", "evaluate") for v in ("vit_micro", "resnet18")),
    }
    assert ran_stages(first_stdout) == expected
    outs = declared_outputs(repo)
    assert outs and all(p.exists() for p in outs), [p for p in outs if not p.exists()]
    for p in outs:
        if p.is_file():
            assert p.stat().st_size > 0, p
    report = (repo / "reports/report.md").read_text()
    assert "vit_micro" in report and "resnet18" in report and "figures/training_curves.png" in report
    scratch = json.loads((repo / "metrics/evaluate/scratch/seed-0.json").read_text())
    assert 0.0 <= scratch["top1"] <= 1.0 and scratch["test_images"] == 359

    # Everything up to date: a second repro runs nothing.
    second = run(DVC + ["repro"], repo)
    assert ran_stages(second.stdout) == set()
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "baseline"], repo)
    assert_code_changes_rerun_what_runs_them(repo)

    # The scratch network's patch alone, with vit_micro named its fine-tuned twin: validate stops
    # on one line saying how to change both (the headline would be "not tested" otherwise).
    twin = "++model.twin=vit_micro"
    alone = run(DVC + ["exp", "run", "-S", twin, "-S", "model.patch=8"], repo, check=False)
    assert alone.returncode != 0 and ran_stages(alone.stdout) == {"validate"}
    assert "dvc exp run -S model.patch=8 -S variants.vit_micro.patch=8" in alone.stdout + alone.stderr
    run(["git", "checkout", "--", "params.yaml"], repo)
    # Both changed: the scratch network, the twin's pretraining and fine-tuning, their evaluations
    # and the report re-run, nothing upstream and nothing of resnet18; the headline stays tested.
    exp = run(DVC + ["exp", "run", "-S", twin, "-S", "model.patch=8", "-S", "variants.vit_micro.patch=8"], repo)
    assert ran_stages(exp.stdout) == {
        "validate",
        "train_scratch@0",
        "evaluate_scratch@0",
        "pretrain@vit_micro",
        "finetune@vit_micro-0",
        "evaluate@vit_micro-0",
        "report",
    }
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert summary.get("finetune_minus_scratch.verdict") not in (None, "not tested"), summary
    diff = run(DVC + ["metrics", "diff", "--json"], repo)
    changed = json.loads(diff.stdout)
    m = "metrics/train_scratch/seed-0.json"
    assert m in changed and "params" in changed[m]
    old, new = (changed[m]["params"][k] for k in ("old", "new"))
    assert old != new  # patch 8 has a bigger patch embedding and fewer position embeddings

    run(DVC + ["plots", "show", "-o", "plots_html"], repo)
    page = repo / "plots_html" / "index.html"
    assert page.exists() and "train_scratch" in page.read_text()

    # Editing one variant's params touches only that variant's stages (and the report). A dry
    # run cannot list evaluate@vit_micro yet: its input (the fine-tuned weights) changes only
    # when finetune@vit_micro has run.
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["variants"]["vit_micro"]["depth"] = 2
    write_params(repo / "params.yaml", doc)
    dry = run(DVC + ["repro", "--dry"], repo)
    assert ran_stages(dry.stdout) == {"validate", "pretrain@vit_micro", "finetune@vit_micro-0", "report"}


def test_seeds_each_their_own_run_and_the_report_gives_intervals(reproduced):
    """A second seed added with `dvc exp run -S` to a reproduced project runs that seed's stages
    only (the pretrained weights are shared); per-seed and aggregate metrics, intervals in the
    report."""
    repo = reproduced
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)
    second = run(DVC + ["exp", "run", "-S", "seeds=[0,1]"], repo)
    assert ran_stages(second.stdout) == {
        "validate",
        "train_scratch@1",
        "finetune@vit_micro-1",
        "finetune@resnet18-1",
        "evaluate_scratch@1",
        "evaluate@vit_micro-1",
        "evaluate@resnet18-1",
        "report",
    }
    for seed in (0, 1):
        per_seed = json.loads((repo / f"metrics/evaluate/vit_micro/seed-{seed}.json").read_text())
        assert 0 <= per_seed["top1"] <= 1
    summary = json.loads((repo / "metrics/summary.json").read_text())
    tops = [json.loads((repo / f"metrics/evaluate/scratch/seed-{s}.json").read_text())["top1"] for s in (0, 1)]
    assert summary["seeds"] == 2 and abs(summary["scratch.top1_mean"] - sum(tops) / 2) < 1e-4
    assert summary["scratch.top1_ci95_lo"] <= summary["scratch.top1_mean"] <= summary["scratch.top1_ci95_hi"]
    assert "finetune_minus_scratch.top1_ci95_lo" in summary
    report = (repo / "reports/report.md").read_text()
    assert "± " in report and "95% CI of the difference" in report and "seed-paired difference" in report


def test_a_local_weights_file_is_a_dependency_of_its_import(project):
    """`source: file` imports weights/<file>: a changed file re-runs that pretrain stage; a path
    outside weights/ is refused before anything runs (DVC could not see it change)."""
    import torch

    from vitpipe.models import build_model

    repo = project
    spec = {"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
    torch.manual_seed(0)
    torch.save(build_model(spec, 10, 16).state_dict(), repo / "weights/micro.pt")
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["variants"] = {"vit_file": {**spec, "source": "file", "weights": "weights/micro.pt"}}
    write_params(repo / "params.yaml", doc)
    first = run(DVC + ["repro", "pretrain@vit_file"], repo)
    assert ran_stages(first.stdout) == {"validate", "pretrain@vit_file"}
    assert "pretrain@vit_file" not in changed_stages(repo)
    torch.manual_seed(1)
    torch.save(build_model(spec, 10, 16).state_dict(), repo / "weights/micro.pt")
    assert "pretrain@vit_file" in changed_stages(repo)

    doc["variants"]["vit_file"]["weights"] = str(repo / "elsewhere.pt")
    write_params(repo / "params.yaml", doc)
    refused = run(DVC + ["repro", "pretrain@vit_file"], repo, check=False)
    assert refused.returncode != 0
    assert "variants.vit_file.weights" in refused.stderr and "a file under weights/" in refused.stderr


def test_a_convnext_variant_runs_end_to_end(project):
    """A third model family is a params change: ConvNeXt pretrained, fine-tuned, evaluated
    (Grad-CAM) and reported through `dvc exp run`."""
    repo = project
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["data"]["image_size"] = 32  # ConvNeXt downsamples by 32
    doc["variants"] = {"cnx": {"arch": "convnext_atto", "source": "fractal", "weights": None}}
    write_params(repo / "params.yaml", doc)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "convnext"], repo)
    exp = run(DVC + ["exp", "run"], repo)
    assert {"pretrain@cnx", "finetune@cnx-0", "evaluate@cnx-0", "report"} <= ran_stages(exp.stdout)
    scores = json.loads((repo / "metrics/evaluate/cnx/seed-0.json").read_text())
    assert 0.0 <= scores["top1"] <= 1.0 and scores["test_images"] == 359
    maps = np.load(repo / "eval/cnx/seed-0/attention.npz")
    assert str(maps["method"]).startswith("Grad-CAM") and float(maps["maps"].max()) > 0
    assert "cnx" in (repo / "reports/report.md").read_text()


def test_run_cache_restores_a_stage_whose_step_log_is_kept_in_git(tmp_path):
    """dvc.yaml keeps the training stages' step logs out of DVC's cache (`cache: false` plots, in
    git): the run-cache must still cover those stages. Params back to a value already run: the
    stage is not run again, and its uncached step log comes back with the cached weights."""
    run(["git", "init", "-q"], tmp_path)
    run(DVC + ["init", "-q"], tmp_path)
    (tmp_path / "params.yaml").write_text("lr: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  train:\n"
        "    cmd: python -c \"import yaml, time; lr = yaml.safe_load(open('params.yaml'))['lr']; "
        "open('model.txt', 'w').write(f'{lr} {time.time()}'); open('train.tsv', 'w').write(f'step\\tloss\\n1\\t{lr}\\n')\"\n"
        "    params: [lr]\n"
        "    outs: [model.txt]\n"
        "    plots:\n"
        "      - train.tsv:\n"
        "          cache: false\n"
        "          x: step\n"
        "          y: loss\n"
    )
    first = run(DVC + ["repro"], tmp_path)
    assert ran_stages(first.stdout) == {"train"}
    weights, log = (tmp_path / "model.txt").read_text(), (tmp_path / "train.tsv").read_text()
    (tmp_path / "params.yaml").write_text("lr: 2\n")
    assert ran_stages(run(DVC + ["repro"], tmp_path).stdout) == {"train"}
    assert (tmp_path / "train.tsv").read_text() != log
    (tmp_path / "params.yaml").write_text("lr: 1\n")
    back = run(DVC + ["repro"], tmp_path)
    assert ran_stages(back.stdout) == set() and "skipping run" in back.stdout, back.stdout
    assert (tmp_path / "model.txt").read_text() == weights and (tmp_path / "train.tsv").read_text() == log
