"""How much data a ViT needs: the pipeline at several `data.train_fraction`s, as DVC experiments.

    python scripts/data_sweep.py --fractions 0.1 0.3 1.0

Like is compared with like: the ViT from scratch against the CNN from scratch, the fine-tuned
ViT against the fine-tuned CNN. For each fraction (smallest first) it runs two experiments in
the workspace: `dvc exp run -S data.train_fraction=<f>` (the scratch ViT of `model:` and every
fine-tuned variant), then the same with `model:` swapped for the CNN variant's network (the
CNN from scratch, with the `train:` recipe; the fine-tuning stages come back from DVC's
run-cache). Download, preprocess and pretraining never run again: the val and test splits stay
whole. It reads each run's per-seed test top-1 and per-image predictions and writes

    reports/data_efficiency.json   per fraction and run: train images, test top-1 per seed,
                                   mean and 95% interval
    reports/data_efficiency.md     the curves, and the verdicts on the reference's conclusion
                                   (a ViT from scratch needs more data than a CNN) from the intervals
    reports/figures/data_efficiency.png

Intervals: with two or more seeds, the 95% t-interval over seeds (the differences paired by
seed); with one seed, the 95% Wilson interval of each accuracy and a paired bootstrap over the
test images for the differences (conditional on that one training run of each). The workspace
ends on the largest fraction's default-network results. The default `dvc repro` leaves this
out: it trains every run twice per fraction, too long for the 6-minute default on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path.cwd()
DVC = [sys.executable, "-m", "dvc"]
PARAMS = ROOT / "params.yaml"
VIT_ONLY = ("patch", "dim", "depth", "heads", "mlp_ratio", "pool")
LABELS = {"vit_scratch": "ViT from scratch", "cnn_scratch": "CNN from scratch",
          "vit_finetuned": "ViT fine-tuned", "cnn_finetuned": "CNN fine-tuned"}


def exp_run(sets: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run(DVC + ["exp", "run", *[x for s in sets for x in ("-S", s)]], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"dvc exp run {' '.join(sets)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    return p


def read_run(name: str, seeds: list[int]) -> dict:
    """Per seed: test top-1 and per-image correctness of one run as the workspace holds it."""
    from vitpipe import pipeline

    top1, correct = [], []
    for s in seeds:
        m = ROOT / pipeline.eval_metrics(name, s)
        top1.append(json.loads(m.read_text())["top1"] if m.exists() else None)
        pred = ROOT / pipeline.eval_dir(name, s) / pipeline.PREDICTIONS
        rows = pred.read_text().splitlines()[1:] if pred.exists() else []
        correct.append("".join("1" if a == b else "0" for a, b in (r.split(",") for r in rows)))
    return {"top1_by_seed": top1, "correct_by_seed": correct}


def train_images(doc: dict) -> dict:
    """Training images per run (scratch, each variant), from its first seed's metrics."""
    from vitpipe import pipeline

    images = {}
    for run in pipeline.run_names(doc):
        f = ROOT / pipeline.train_metrics(run, (doc.get("seeds") or [0])[0])
        m = json.loads(f.read_text()) if f.exists() else {}
        if "train_images" in m:
            images[run] = m["train_images"]
    return images


def run_fraction(fraction: float, doc: dict, cnn: str, twin: str, original: str) -> dict:
    """Both experiments of one share. Each starts from the original params.yaml: an experiment
    leaves its own params in the workspace, and the CNN one must not leak into the next share."""
    seeds = list(doc.get("seeds") or [0])
    frac = f"data.train_fraction={fraction:g}"
    PARAMS.write_text(original)
    p = exp_run([frac])
    point = {"fraction": fraction, "train_images": train_images(doc),
             "stages_run": sorted(set(re.findall(r"Running stage '([^']+)'", p.stdout))),
             "experiments": [m.group(1) for m in [re.search(r"Ran experiment\(s\): (\S+)", p.stdout + p.stderr)] if m],
             "runs": {"vit_scratch": read_run("scratch", seeds), "vit_finetuned": read_run(twin, seeds),
                      "cnn_finetuned": read_run(cnn, seeds)}}
    cnn_spec = {k: v for k, v in doc["variants"][cnn].items() if k not in ("source", "weights", "pretrain", "finetune")}
    swap = ([f"model.{k}={v}" for k, v in cnn_spec.items()] + [f"~model.{k}" for k in VIT_ONLY if k in doc["model"]]
            + [f"++model.twin={cnn}"])    # the CNN from scratch is the CNN variant's twin
    PARAMS.write_text(original)
    p = exp_run([frac, *swap])
    point["runs"]["cnn_scratch"] = read_run("scratch", seeds)
    point["stages_run"] = sorted(set(point["stages_run"]) | set(re.findall(r"Running stage '([^']+)'", p.stdout)))
    for r in point["runs"].values():
        r.update(interval(r))
    return point


def interval(run: dict) -> dict:
    """Mean and 95% interval of one run's test top-1: over seeds, or Wilson with one seed."""
    from vitpipe.report import stats

    tops = [t for t in run["top1_by_seed"] if t is not None]
    ci = stats.over_seeds(tops)
    if ci.n >= 2:
        return {"mean": ci.mean, "ci95_lo": ci.lo, "ci95_hi": ci.hi, "interval": f"t over {ci.n} seeds"}
    c = run["correct_by_seed"][0] if run["correct_by_seed"] else ""
    lo, hi = stats.wilson(c.count("1"), len(c)) if c else (None, None)
    return {"mean": ci.mean if ci.n else None, "ci95_lo": lo, "ci95_hi": hi, "interval": "Wilson, one seed"}


def difference(points: list[dict], terms: list[tuple[int, str, int]]) -> tuple[str, str]:
    """A signed sum of accuracies (point index, run, sign) with its 95% interval and verdict
    on 'the sum is > 0': seed-paired t-interval with >= 2 seeds, else a paired bootstrap over
    the test images. Returns (the interval's text, the verdict word)."""
    from vitpipe.report import stats

    seeds = [len(points[i]["runs"][r]["top1_by_seed"]) for i, r, _ in terms]
    if min(seeds) >= 2:
        per_seed = [sum(sign * points[i]["runs"][r]["top1_by_seed"][s] for i, r, sign in terms)
                    for s in range(min(seeds))]
        d = stats.over_seeds(per_seed)
        v = stats.verdict(d)
        return f"{100 * d.mean:+.1f} points; {v.why}", v.word
    vectors = [[c == "1" for c in points[i]["runs"][r]["correct_by_seed"][0]] for i, r, _ in terms]
    mean, lo, hi = stats.bootstrap_sum(vectors, [sign for _, _, sign in terms])
    word = stats.HOLDS if lo > 0 else stats.DOES_NOT_HOLD if hi <= 0 else stats.INCONCLUSIVE
    return (f"{100 * mean:+.1f} points; 95% paired bootstrap interval over the test images {100 * lo:+.1f} to "
            f"{100 * hi:+.1f} (one seed)"), word


def verdict(points: list[dict]) -> list[str]:
    """The reference's conclusion, decided from the intervals: from scratch a ViT loses more
    accuracy than a CNN when data shrinks; and, like for like, where each family stands."""
    lo, hi = 0, len(points) - 1
    f_lo, f_hi = points[lo]["fraction"], points[hi]["fraction"]
    text, word = difference(points, [(hi, "vit_scratch", 1), (lo, "vit_scratch", -1),
                                     (hi, "cnn_scratch", -1), (lo, "cnn_scratch", 1)])
    lines = [f"- From {f_hi:g} to {f_lo:g} of the training data, the ViT from scratch loses more accuracy than the "
             f"CNN from scratch by {text}: 'a ViT from scratch needs more data than a CNN' **{word}**."]
    for kind in ("scratch", "finetuned"):
        text, word = difference(points, [(lo, f"vit_{kind}", 1), (lo, f"cnn_{kind}", -1)])
        lines.append(f"- At {f_lo:g} of the data, ViT minus CNN, both {'from scratch' if kind == 'scratch' else 'fine-tuned'}: "
                     f"{text}: 'the ViT beats the CNN' **{word}**.")
    text, word = difference(points, [(lo, "vit_finetuned", 1), (lo, "cnn_finetuned", -1),
                                     (lo, "vit_scratch", -1), (lo, "cnn_scratch", 1)])
    lines.append(f"- At {f_lo:g} of the data, pretraining narrows the ViT's gap to the CNN (fine-tuned gap minus scratch "
                 f"gap) by {text}: 'pretraining closes the gap' **{word}**.")
    return lines


def figure(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = [p["fraction"] for p in points]
    for ax, kind in zip(axes, ("scratch", "finetuned")):
        for fam, color in (("vit", "tab:blue"), ("cnn", "tab:orange")):
            r = f"{fam}_{kind}"
            mean = [100 * (p["runs"][r]["mean"] or 0) for p in points]
            err = [[100 * (p["runs"][r]["mean"] - p["runs"][r]["ci95_lo"]) if p["runs"][r]["ci95_lo"] is not None else 0
                    for p in points],
                   [100 * (p["runs"][r]["ci95_hi"] - p["runs"][r]["mean"]) if p["runs"][r]["ci95_hi"] is not None else 0
                    for p in points]]
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=4, color=color, label=LABELS[r])
        ax.set(xscale="log", xlabel="share of the training split used (log scale)",
               title=f"{'From scratch' if kind == 'scratch' else 'Fine-tuned'}: ViT against CNN", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("test top-1 (%), 95% interval")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def twin_and_cnn(doc: dict) -> tuple[str | None, str | None]:
    from vitpipe import model_specs

    variants = doc.get("variants") or {}
    cnn = next((v for v, s in variants.items() if str(s.get("arch", "")).startswith("resnet")), None)
    return model_specs.twin_name(doc), cnn


def markdown(points: list[dict]) -> list[str]:
    rows = ["| share of train | " + " | ".join(LABELS.values()) + " | stages run |",
            "| --- | " + " | ".join("---" for _ in LABELS) + " | --- |"]
    for p in points:
        cells = []
        for r in LABELS:
            v = p["runs"][r]
            cells.append(f"{100 * v['mean']:.1f}% [{100 * v['ci95_lo']:.1f}, {100 * v['ci95_hi']:.1f}]"
                         if v["ci95_lo"] is not None else (f"{100 * v['mean']:.1f}%" if v["mean"] is not None else "–"))
        rows.append(f"| {p['fraction']:g} ({p['train_images'].get('scratch', '?')} images) | {' | '.join(cells)} | "
                    f"{', '.join(p['stages_run'])} |")
    how = points[0]["runs"]["vit_scratch"]["interval"]
    return rows + ["", f"Test top-1, mean [95% interval: {how}]."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    args = ap.parse_args(argv)
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        print(f"vitpipe: error: --fractions {bad} must be in (0, 1]", file=sys.stderr)
        return 2
    original = PARAMS.read_text()
    doc = yaml.safe_load(original)
    twin, cnn = twin_and_cnn(doc)
    if cnn is None or twin is None:
        print("vitpipe: error: params.yaml needs a CNN variant (arch resnet*) and a variant with the `model:` network "
              "to compare like with like", file=sys.stderr)
        return 2
    try:
        points = [run_fraction(f, doc, cnn, twin, original) for f in sorted(set(args.fractions))]
    finally:
        PARAMS.write_text(original)
    exp_run([f"data.train_fraction={points[-1]['fraction']:g}"])    # the workspace ends on the default networks
    reports = ROOT / "reports"
    (reports / "data_efficiency.json").write_text(json.dumps(points, indent=2) + "\n")
    figure(points, reports / "figures" / "data_efficiency.png")
    shares = " ".join(f"{p['fraction']:g}" for p in points)
    md = ["# How much data a ViT needs", "", f"`python scripts/data_sweep.py --fractions {shares}`: two DVC experiments "
          f"per share of the training split (val and test whole): the default networks, and `model:` set to {cnn}'s "
          "network for the CNN from scratch.", "", *markdown(points), "",
          "![Accuracy against training data](figures/data_efficiency.png)", "", *verdict(points)]
    (reports / "data_efficiency.md").write_text("\n".join(md) + "\n")
    print(f"data_sweep: {len(points)} fractions -> reports/data_efficiency.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
