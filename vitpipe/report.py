"""The report stage's work: the pipeline's metrics and series -> reports/report.md + figures.

Everything is read from the files the other stages wrote (metrics/, plots/, eval/,
data/prepared/, profile/), so the report can be rebuilt at any time without training.
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vitpipe.atomic import atomic_path, write_text  # noqa: E402

FIGURES = Path("reports/figures")


@dataclass
class Run:
    """One trained network: scratch, or a fine-tuned variant."""
    name: str            # "scratch" or the variant name
    algorithm: str       # "scratch (Alg. 1)" | "fine-tune (Alg. 2)"
    spec: dict
    train: dict          # metrics/train_scratch.json or metrics/finetune/<v>.json
    test: dict           # metrics/evaluate/<name>.json
    pretrain: dict       # metrics/pretrain/<v>.json ({} for scratch)
    curve: pd.DataFrame  # plots/.../train.tsv
    evals: pd.DataFrame  # plots/.../eval.tsv


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t") if path.exists() else pd.DataFrame()


def load_runs(doc: dict) -> list[Run]:
    runs = [Run("scratch", "scratch (Alg. 1)", doc["model"], _json(Path("metrics/train_scratch.json")),
                _json(Path("metrics/evaluate/scratch.json")), {},
                _tsv(Path("plots/train_scratch/train.tsv")), _tsv(Path("plots/train_scratch/eval.tsv")))]
    for name, spec in (doc.get("variants") or {}).items():
        runs.append(Run(name, "fine-tune (Alg. 2)", spec, _json(Path(f"metrics/finetune/{name}.json")),
                        _json(Path(f"metrics/evaluate/{name}.json")), _json(Path(f"metrics/pretrain/{name}.json")),
                        _tsv(Path(f"plots/finetune/{name}/train.tsv")), _tsv(Path(f"plots/finetune/{name}/eval.tsv"))))
    return runs


def same_network(a: dict, b: dict) -> bool:
    keys = ("arch", "patch", "dim", "depth", "heads", "mlp_ratio", "pool")
    return all(a.get(k) == b.get(k) for k in keys)


def _save(fig, name: str) -> str:
    path = FIGURES / name
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return f"figures/{name}"


def fig_curves(runs: list[Run]) -> str:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        if not r.curve.empty:
            smooth = r.curve["loss"].rolling(10, min_periods=1).mean()
            ax_loss.plot(r.curve["step"], smooth, label=f"{r.name} ({r.algorithm})")
        if not r.evals.empty:
            ax_acc.plot(r.evals["step"], 100 * r.evals["val_acc"], marker="o", ms=3, label=r.name)
    ax_loss.set(title="Training loss (10-step mean)", xlabel="optimizer step", ylabel="cross-entropy loss")
    ax_acc.set(title="Validation accuracy", xlabel="optimizer step", ylabel="top-1 accuracy (%)", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, "training_curves.png")


def fig_accuracy_vs_time(runs: list[Run]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in runs:
        if r.evals.empty:
            continue
        ax.plot(r.evals["elapsed_s"], 100 * r.evals["val_acc"], marker="o", ms=3, label=f"{r.name} (training only)")
        pre = r.pretrain.get("wall_time_s", 0.0) if r.pretrain.get("steps") else 0.0
        if pre:
            ax.plot(r.evals["elapsed_s"] + pre, 100 * r.evals["val_acc"], ls="--", alpha=0.6,
                    label=f"{r.name} (+{pre:.0f} s pretraining)")
    ax.set(title="Accuracy against wall time", xlabel="wall time (s)", ylabel="validation top-1 (%)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, "accuracy_vs_time.png")


def fig_params(runs: list[Run]) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3))
    names = [r.name for r in runs]
    params = [r.test.get("params", r.train.get("params", 0)) / 1e6 for r in runs]
    bars = ax.barh(names, params, color=["#888" if r.name == "scratch" else "#3a7" for r in runs])
    ax.bar_label(bars, labels=[f"{p:.2f} M" for p in params], fontsize=8, padding=3)
    ax.set(title="Parameters", xlabel="parameters (millions)")
    ax.margins(x=0.25)
    return _save(fig, "parameters.png")


def fig_patch_grid(prepared: Path, patches: dict[str, int]) -> str | None:
    """One training image per class, with each model's patch grid drawn over it."""
    x_path = prepared / "train_x.npy"
    if not x_path.exists() or not patches:
        return None
    x = np.load(x_path, mmap_mode="r")
    y = np.load(prepared / "train_y.npy")
    classes = json.loads((prepared / "meta.json").read_text())["classes"]
    shown = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)[:6]]
    size = x.shape[1]
    fig, axes = plt.subplots(len(patches), len(shown), figsize=(1.6 * len(shown), 1.7 * len(patches)), squeeze=False)
    for row, (who, p) in enumerate(patches.items()):
        for col, i in enumerate(shown):
            ax = axes[row][col]
            ax.imshow(x[i], interpolation="nearest", extent=(0, size, size, 0))
            for t in range(0, size + 1, p):
                ax.axhline(t, color="#f33", lw=0.6)
                ax.axvline(t, color="#f33", lw=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"class {classes[int(y[i])]}", fontsize=8)
        axes[row][0].set_ylabel(f"{who}\n{p}x{p} px\n{(size // p) ** 2} tokens", fontsize=8)
    fig.suptitle(f"What each ViT sees: {size}x{size} px images cut into patches", fontsize=10)
    return _save(fig, "patch_grid.png")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "(no commit)"
    except Exception:
        return "(not a git checkout)"


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


def acc_at_step(evals: pd.DataFrame, step: int) -> float | None:
    if evals.empty:
        return None
    row = evals[evals["step"] <= step]
    return None if row.empty else float(row["val_acc"].iloc[-1])


def build(doc: dict, prepared: Path) -> str:
    import torch

    from vitpipe.models import describe

    FIGURES.mkdir(parents=True, exist_ok=True)
    image_size = doc["data"]["image_size"]
    meta = _json(prepared / "meta.json")
    runs = load_runs(doc)

    rows = []
    for r in runs:
        pre = r.pretrain
        rows.append({
            "run": r.name,
            "algorithm": r.algorithm,
            "network": describe(r.spec, image_size),
            "params": f"{r.test.get('params', r.train.get('params', 0)):,}",
            "pretraining": "–" if r.name == "scratch" else
            (f"{r.spec.get('source', 'fractal')}, {pre.get('steps', 0)} steps, {pre.get('wall_time_s', 0):.0f} s"),
            "steps": r.train.get("steps"),
            "train time (s)": r.train.get("wall_time_s"),
            "train img/s": r.train.get("img_per_s"),
            "test top-1": _pct(r.test.get("top1")),
            "test top-5": _pct(r.test.get("top5")),
            "infer img/s": r.test.get("infer_img_per_s"),
            "latency (ms)": r.test.get("latency_ms"),
        })
    table = pd.DataFrame(rows).to_markdown(index=False)

    scratch = runs[0]
    twins = [r for r in runs[1:] if same_network(r.spec, scratch.spec)]
    findings = []
    for t in twins:
        a, b = t.test.get("top1"), scratch.test.get("top1")
        if a is not None and b is not None:
            verdict = "beats" if a > b else "does not beat"
            findings.append(
                f"- **Same network, two algorithms.** `{t.name}` is the scratch network fine-tuned from "
                f"{t.spec.get('source', 'fractal')} pretraining: after {t.train.get('steps')} fine-tuning steps it "
                f"reaches **{_pct(a)}** test top-1; trained from scratch for {scratch.train.get('steps')} steps it "
                f"reaches **{_pct(b)}**. Fine-tuning {verdict} scratch training here "
                f"({100 * (a - b):+.1f} points).")
            steps = min(t.train.get("steps", 0), scratch.train.get("steps", 0))
            half = steps // 2
            va, vb = acc_at_step(t.evals, half), acc_at_step(scratch.evals, half)
            if va is not None and vb is not None:
                findings.append(f"- At step {half} (half-way) validation top-1 is {_pct(va)} fine-tuned against "
                                f"{_pct(vb)} from scratch: pretraining buys a head start, not only a final number.")
    if not twins:
        findings.append("- No variant has the scratch network's architecture, so scratch and fine-tuning are "
                        "compared across networks only (set a variant equal to `model:` to compare like for like).")
    cnn = [r for r in runs if str(r.spec.get("arch", "")).startswith("resnet")]
    for c in cnn:
        if c.test:
            findings.append(f"- CNN baseline `{c.name}` ({describe(c.spec, image_size)}): {_pct(c.test.get('top1'))} "
                            f"test top-1 with {c.test.get('params', 0) / 1e6:.2f} M parameters.")

    figs = {
        "curves": fig_curves(runs),
        "time": fig_accuracy_vs_time(runs),
        "params": fig_params(runs),
        "patches": fig_patch_grid(prepared, {"scratch": doc["model"].get("patch")} | {
            n: s.get("patch") for n, s in (doc.get("variants") or {}).items() if s.get("patch")}),
    }

    lines = [
        "# vitpipe report",
        "",
        f"Dataset **{meta.get('dataset', doc['data']['dataset'])}** at {image_size}x{image_size} px: "
        f"{meta.get('num_classes', '?')} classes, {', '.join(f'{k} {v}' for k, v in meta.get('sizes', {}).items())} "
        f"images ({meta.get('skipped_total', 0)} skipped). Every number below was measured by this run of the "
        f"pipeline; `dvc repro` rebuilds it, `dvc metrics diff` compares it with another commit.",
        "",
        "## Findings",
        "",
        *findings,
        "",
        "## Scratch (Algorithm 1) against fine-tuning (Algorithm 2)",
        "",
        table,
        "",
        "Train time is the stage's own training wall time (excluding model build and evaluation); "
        "pretraining time is listed separately because it is paid once per variant and reused by every fine-tuning run.",
        "",
        f"![Training curves]({figs['curves']})",
        "",
        f"![Accuracy against wall time]({figs['time']})",
        "",
        f"![Parameters]({figs['params']})",
        "",
    ]
    if figs["patches"]:
        lines += ["## The data, as each ViT sees it", "", f"![Patch grids]({figs['patches']})", ""]
    lines += [
        "## This run",
        "",
        f"- git revision {git_revision()}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"on {platform.machine()} with {torch.get_num_threads()} threads"
        + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        f"- total training time: {sum(r.train.get('wall_time_s', 0) + r.pretrain.get('wall_time_s', 0) for r in runs):.0f} s",
        f"- params: `model` {json.dumps(doc['model'])}; train {doc['train'].get('steps')} steps × batch "
        f"{doc['train'].get('batch_size')} ({doc['train'].get('optimizer')}, lr {doc['train'].get('lr')}); finetune "
        f"{doc['finetune'].get('steps')} steps × batch {doc['finetune'].get('batch_size')} "
        f"({doc['finetune'].get('optimizer')}, lr {doc['finetune'].get('lr')})",
        "",
    ]
    return "\n".join(lines)


def write_report(doc: dict, prepared: Path) -> Path:
    text = build(doc, prepared)
    out = Path("reports/report.md")
    write_text(out, text)
    return out
