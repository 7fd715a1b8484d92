"""The report's figures: matplotlib PNGs drawn from analysis frames and the runs'
per-step series. Every figure has a title, axes with units and a legend; each run keeps
its colour across figures. Each function returns the figure's path relative to the report."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vitpipe.atomic import atomic_path  # noqa: E402
from vitpipe.costmodel import reference  # noqa: E402
from vitpipe.report.inputs import Run  # noqa: E402

SUBDIR = "figures"
DPI = 100
REF_COLOR, PRED_COLOR, MEAS_COLOR = "#c44e52", "#4c72b0", "#55a868"


class Figures:
    """Saves figures under <report dir>/figures and gives each run a fixed colour."""

    def __init__(self, report_dir: Path, runs: list[Run]):
        self.dir = Path(report_dir) / SUBDIR
        self.color = {r.name: plt.cm.tab10(i % 10) for i, r in enumerate(runs)}

    def save(self, fig, name: str) -> str:
        fig.tight_layout()
        with atomic_path(self.dir / name, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
        plt.close(fig)
        return f"{SUBDIR}/{name}"


def _grid(ax):
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)


# ---------------------------------------------------------------------------------------
# 1. Parameters


def parameters(f: Figures, t: pd.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    y = np.arange(len(t))
    bars = (
        ("exact (torchvision / timm)", t.exact / 1e6, PRED_COLOR),
        ("reference, printed", t.ref_printed_m, REF_COLOR),
        ("reference's formulas, with its fc head", t.formula / 1e6, "#dd8452"),
    )
    h = 0.27
    for i, (label, values, color) in enumerate(bars):
        ax.barh(y + (i - 1) * h, values, height=h, label=label, color=color)
    ax.set_yticks(y, t.network)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set(
        title="Parameters at 224 px, 1000 classes: exact against the reference's Table 1",
        xlabel="parameters (millions, log scale)",
    )
    _grid(ax)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    return f.save(fig, "parameters.png")


# ---------------------------------------------------------------------------------------
# 2. Memory


def memory(f: Figures, m: pd.DataFrame, setting: dict) -> str:
    fig, ax = plt.subplots(figsize=(8, 4.2))
    x = np.arange(len(m))
    w = 0.38
    ax.bar(x - w / 2, m.required_gib, width=w, color=PRED_COLOR, label="predicted need, whole batch at once")
    ax.bar(
        x + w / 2,
        m.checkpointing_required_gib,
        width=w,
        color=MEAS_COLOR,
        label="predicted need with activation checkpointing",
    )
    ref = m.dropna(subset=["ref_ratio"])
    cap = float(m.capacity_gib.iloc[0])
    ax.scatter(
        x[ref.index],
        ref.ref_ratio * cap,
        marker="D",
        s=50,
        color=REF_COLOR,
        zorder=3,
        label="reference's reading (its share of the T4)",
    )
    ax.axhline(cap, color="k", ls="--", lw=1, label=f"{setting['device']} capacity {cap:.1f} GiB")
    for xi, r in zip(x, m.itertuples()):
        plan = (
            "fits at once"
            if r.fits
            else (f"plan: micro-batch {r.micro_batch} x {r.accum_steps}" if r.micro_batch else "no plan fits")
        )
        ax.annotate(
            plan,
            (xi - w / 2, r.required_gib),
            ha="center",
            va="bottom",
            fontsize=8,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(x, m.network)
    ax.set_yscale("log")
    ax.set_ylim(top=float(m.required_gib.max()) * 3)
    ax.set(
        title=f"Training memory from scratch at {setting['image_size']} px, batch {setting['batch']}, "
        f"{setting['precision']}, {setting['optimizer']}",
        ylabel="memory needed (GiB, log scale)",
    )
    _grid(ax)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    return f.save(fig, "memory.png")


# ---------------------------------------------------------------------------------------
# 3. Time


SPLIT_COLORS = (
    ("compute_s", "compute-bound", PRED_COLOR),
    ("memory_s", "memory-bound", "#dd8452"),
    ("overhead_s", "kernel launches", "#8172b3"),
)


def time(f: Figures, eta: pd.DataFrame, thr: pd.DataFrame) -> str:
    """Left: the reference's schedule on each GPU profile, its ETA split into compute-bound,
    memory-bound and launch time, against the reference's printed ETA band. Right: measured
    against predicted training img/s on this machine."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.3, 1]})
    t = reference.TIME
    gpus = eta[eta.device != "local"].reset_index(drop=True)
    y = np.arange(len(gpus))
    left = np.zeros(len(gpus))
    for col, label, color in SPLIT_COLORS:
        part = (gpus.eta_h * gpus[col]).to_numpy()
        a.barh(y, part, left=left, color=color, label=f"{label} (time model)")
        left += part
    a.axvspan(
        t["eta_h_low"],
        t["eta_h_high"],
        color=REF_COLOR,
        alpha=0.25,
        label=f"reference's printed ETA on a T4 ({t['eta_h_low']:g}-{t['eta_h_high']:g} h)",
    )
    for yi, h in zip(y, gpus.eta_h):
        a.annotate(f"{h:,.1f} h", (h, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    a.set_yticks(y, gpus.device_label, fontsize=7)
    a.invert_yaxis()
    a.set_xlim(0, max(float(gpus.eta_h.max()), t["eta_h_high"]) * 1.15)
    a.set(
        title=f"The reference's schedule per GPU profile\n(ViT-B/32, {t['steps']:,} steps x {t['batch']}, "
        "its setting; this machine: §3's table)",
        xlabel="predicted time (hours)",
    )
    _grid(a)
    a.legend(fontsize=7, loc="lower right")

    x = np.arange(len(thr))
    w = 0.38
    b.bar(x - w / 2, thr.img_per_s, width=w, color=MEAS_COLOR, label="measured")
    b.bar(
        x + w / 2,
        thr.predicted_img_per_s.astype(float).fillna(0),
        width=w,
        color=PRED_COLOR,
        label="predicted (time model, this machine's measured peak and bandwidth)",
    )
    for xi, r in zip(x, thr.itertuples()):
        if r.measured_over_predicted == r.measured_over_predicted and r.measured_over_predicted is not None:
            b.annotate(
                f"{r.measured_over_predicted:.2f}x",
                (xi, max(r.img_per_s, r.predicted_img_per_s)),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
    b.set_xticks(x, thr.run, fontsize=8)
    b.margins(y=0.15)
    b.set(title="Training throughput on this machine\n(label: measured ÷ predicted)", ylabel="images per second")
    _grid(b)
    b.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1, frameon=False)
    return f.save(fig, "time.png")


# ---------------------------------------------------------------------------------------
# 4. Scratch against fine-tuning, and the training curves


def scratch_vs_finetune(f: Figures, runs: list[Run], num_classes: int | None) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in runs:
        e = r.evals
        if e.empty or "val_acc" not in e:
            continue
        c = f.color[r.name]
        lo, hi = band(r.evals_by_seed, e.step, "val_acc")
        if "elapsed_s" in e:
            a.plot(e.elapsed_s, 100 * e.val_acc, marker="o", ms=3, color=c, label=r.label)
            if lo is not None:
                a.fill_between(e.elapsed_s, 100 * lo, 100 * hi, color=c, alpha=0.15, lw=0)
            if r.pretrain_s:
                a.plot(
                    e.elapsed_s + r.pretrain_s,
                    100 * e.val_acc,
                    ls="--",
                    color=c,
                    alpha=0.6,
                    label=f"{r.name}, counting {r.pretrain_s:.0f} s of pretraining",
                )
        b.plot(e.step, 100 * e.val_acc, marker="o", ms=3, color=c, label=r.label)
        if lo is not None:
            b.fill_between(e.step, 100 * lo, 100 * hi, color=c, alpha=0.15, lw=0)
    seeds = max((len(r.evals_by_seed) for r in runs), default=1)
    fig.suptitle(f"Mean over {seeds} seeds" + (", band: ± one standard deviation" if seeds > 1 else ""), fontsize=10)
    a.set(
        title="Validation accuracy against wall time",
        xlabel="training wall time (s)",
        ylabel="validation top-1 (%)",
        ylim=(0, 100),
    )
    b.set(
        title="Validation accuracy against optimizer steps",
        xlabel="optimizer step",
        ylabel="validation top-1 (%)",
        ylim=(0, 100),
    )
    for ax in (a, b):
        if num_classes:
            ax.axhline(100 / num_classes, color="grey", ls=":", lw=1, label=f"chance ({100 / num_classes:.0f}%)")
        _grid(ax)
        ax.legend(fontsize=8, loc="best")
    return f.save(fig, "scratch_vs_finetune.png")


# column, title, y label, y scale, rolling mean over steps
CURVES = (
    ("loss", "Training loss (10-step mean)", "cross-entropy loss", "linear", 10),
    ("lr", "Learning rate schedule", "learning rate (log scale)", "log", 1),
    ("img_per_s", "Training throughput (5-step mean)", "images per second", "linear", 5),
    ("memory_mb", "Memory during training (RSS on CPU, allocator on GPU)", "memory (MiB)", "linear", 1),
)


def band(frames: list[pd.DataFrame], steps: pd.Series, col: str, smooth: int = 1):
    """(mean - sd, mean + sd) over seeds at `steps`, or (None, None) with fewer than 2 seeds."""
    series = [
        fr.set_index("step")[col].rolling(smooth, min_periods=1).mean()
        for fr in frames
        if not fr.empty and col in fr and "step" in fr
    ]
    if len(series) < 2:
        return None, None
    both = pd.concat(series, axis=1).reindex(steps.values)
    mean, sd = both.mean(axis=1).values, both.std(axis=1).values
    return mean - sd, mean + sd


def training_curves(f: Figures, runs: list[Run]) -> str:
    fig, axes = plt.subplots(2, 2, figsize=(12, 7))
    for ax, (col, title, ylabel, yscale, smooth) in zip(axes.flat, CURVES):
        drawn = False
        for r in runs:
            if r.curve.empty or col not in r.curve:
                continue
            y = r.curve[col].rolling(smooth, min_periods=1).mean()
            ax.plot(r.curve.step, y, color=f.color[r.name], label=r.label)
            lo, hi = band(r.curves, r.curve.step, col, smooth)
            if lo is not None:
                ax.fill_between(r.curve.step, lo, hi, color=f.color[r.name], alpha=0.15, lw=0)
            drawn = True
        ax.set(title=title + ("" if drawn else " (not logged)"), xlabel="optimizer step", ylabel=ylabel)
        if drawn:
            ax.set_yscale(yscale)
            ax.legend(fontsize=8)
        _grid(ax)
    return f.save(fig, "training_curves.png")


# ---------------------------------------------------------------------------------------
# 5. Variants


def variants(f: Figures, v: pd.DataFrame) -> str:
    """Accuracy (mean over seeds, 95% interval as error bars), training time (± one sd over
    seeds) and parameters. No memory panel: on a CPU the only reading is process RSS, which
    holds the interpreter and libraries and so cannot rank the networks (§2)."""
    acc_err = [
        (100 * (m - lo), 100 * (hi - m)) if not np.isnan(lo) else (0, 0)
        for m, lo, hi in zip(v.test_top1.astype(float), v.test_top1_lo.astype(float), v.test_top1_hi.astype(float))
    ]
    panels = (
        ("test_top1", "Test top-1 (mean, 95% CI)", "accuracy (%)", 100, np.array(acc_err).T if len(v) else None),
        ("train_s", "Training wall time (± sd)", "seconds", 1, v.train_s_sd.astype(float).fillna(0).values),
        ("params", "Parameters", "millions", 1e-6, None),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    colors = [f.color[n] for n in v.run]
    for ax, (col, title, unit, scale, err) in zip(axes, panels):
        values = v[col].astype(float) * scale
        bars = ax.bar(v.run, values, color=colors, yerr=err, capsize=4 if err is not None else 0)
        ax.bar_label(
            bars,
            labels=[
                ("–" if np.isnan(x) else f"{x:.2f}" if x < 10 else f"{x:,.1f}" if x < 1000 else f"{x:,.0f}")
                for x in values
            ],
            fontsize=8,
            padding=2,
        )
        ax.set(title=title, ylabel=unit)
        ax.margins(y=0.15)
        ax.tick_params(axis="x", labelsize=8)
        _grid(ax)
    handles = [plt.Rectangle((0, 0), 1, 1, color=f.color[n]) for n in v.run]
    fig.legend(handles, list(v.label), loc="lower center", ncol=len(v), fontsize=8, bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Runs side by side (scratch network and CNN baseline included)", fontsize=11)
    return f.save(fig, "variants.png")


# ---------------------------------------------------------------------------------------
# 6. The data


def patch_grid(f: Figures, prepared: Path, patches: dict[str, int], per_row: int = 6) -> str | None:
    """One training image per class, with each distinct patch size's grid drawn over it."""
    x_path = prepared / "train_x.npy"
    if not x_path.exists():
        return None
    x = np.load(x_path, mmap_mode="r")
    y = np.load(prepared / "train_y.npy")
    classes = json.loads((prepared / "meta.json").read_text())["classes"]
    shown = [int(np.flatnonzero(y == c)[0]) for c in np.unique(y)[:per_row]]
    size = x.shape[1]
    rows = [(None, "no patches (as a CNN sees it)")] + [
        (p, f"{', '.join(names)}\n{p}x{p} px patches\n{(size // p) ** 2} tokens")
        for p, names in sorted(_by_patch(patches).items())
    ]
    fig, axes = plt.subplots(len(rows), len(shown), figsize=(1.7 * len(shown), 1.8 * len(rows)), squeeze=False)
    for row, (p, label) in enumerate(rows):
        for col, i in enumerate(shown):
            ax = axes[row][col]
            ax.imshow(x[i], interpolation="nearest", extent=(0, size, size, 0))
            if p:
                for t in range(0, size + 1, p):
                    ax.axhline(t, color="#ff3030", lw=0.7)
                    ax.axvline(t, color="#ff3030", lw=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"class {classes[int(y[i])]}", fontsize=8)
        axes[row][0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"Training images ({size}x{size} px) and the patch grid each ViT cuts them into", fontsize=10)
    return f.save(fig, "patch_grid.png")


def _by_patch(patches: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, p in patches.items():
        out.setdefault(int(p), []).append(name)
    return out


def budget_curves(f: Figures, st) -> str | None:
    """Test top-1 against training steps per arm (studies/results/budget): mean and every seed."""
    import matplotlib.pyplot as plt

    if not st.budgets:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4))
    arms = sorted({arm for arm, _ in st.budgets})
    for arm in arms:
        pts = sorted((steps, s.record["runs"]) for (a, steps), s in st.budgets.items() if a == arm)
        xs = [x for x, _ in pts]
        means = [sum(r["test_top1"] for r in runs) / len(runs) for _, runs in pts]
        (line,) = ax.plot(xs, means, marker="o", label=arm)
        for x, runs in pts:
            ax.scatter([x] * len(runs), [r["test_top1"] for r in runs], color=line.get_color(), alpha=0.35, s=12)
    if st.equal_compute:
        r = st.equal_compute.record
        ax.scatter(
            [r["steps"]] * len(r["runs"]),
            [x["test_top1"] for x in r["runs"]],
            marker="s",
            color="k",
            label="scratch at equal compute",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log)")
    ax.set_ylabel("test top-1")
    ax.set_title("Test accuracy against budget (studies pipeline)")
    _grid(ax)
    ax.legend(fontsize=8)
    return f.save(fig, "budgets.png")
