"""How much data a ViT needs: the pipeline at several `data.train_fraction`s, as DVC experiments.

    python scripts/data_sweep.py --fractions 0.1 0.3 1.0

For each fraction (smallest first) it runs `dvc exp run -S data.train_fraction=<f>`
in the workspace: only the training stages, their evaluations and the report run (download and
preprocess do not: the val and test splits stay whole), and each fraction stays a named
experiment (`dvc exp show`). It then reads each experiment's metrics/summary.json and writes

    reports/data_efficiency.json   per fraction and run: train images, test top-1 mean and 95% CI
    reports/data_efficiency.md     the accuracy-versus-data curve and the verdict on the
                                   reference's conclusion, stated from the curves
    reports/figures/data_efficiency.png

The workspace ends on the largest fraction's results. The default `dvc repro` leaves this out:
it trains every run once per fraction, too long for the 6-minute default on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path.cwd()
DVC = [sys.executable, "-m", "dvc"]


def run_fraction(fraction: float) -> dict:
    p = subprocess.run(DVC + ["exp", "run", "-S", f"data.train_fraction={fraction:g}"], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"dvc exp run at data.train_fraction={fraction:g} failed:\n{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    summary = json.loads((ROOT / "metrics/summary.json").read_text())
    images = {}
    for f in (ROOT / "metrics").glob("*/**/seed-*.json"):
        m = json.loads(f.read_text())
        if "train_images" in m:
            images[f.parent.name if f.parent.name != "train_scratch" else "scratch"] = m["train_images"]
    runs = sorted({k.split(".")[0] for k in summary if k.endswith(".top1_mean") and "_minus_" not in k})
    named = re.search(r"Ran experiment\(s\): (\S+)", p.stdout + p.stderr)
    return {"fraction": fraction, "experiment": named.group(1) if named else None, "train_images": images,
            "stages_run": sorted(set(re.findall(r"Running stage '([^']+)'", p.stdout))),
            "top1": {r: {k: summary.get(f"{r}.top1_{k}") for k in ("mean", "ci95_lo", "ci95_hi")} for r in runs}}


def verdict(points: list[dict], cnn: str, vit_scratch: str, vit_tuned: str | None) -> list[str]:
    """The reference's conclusion, read off the curves: from scratch a ViT loses more accuracy
    than the CNN when data shrinks; pretraining narrows the gap to the CNN."""
    lo, hi = points[0], points[-1]

    def acc(p, r):
        return p["top1"].get(r, {}).get("mean")

    lines = []
    drop_vit, drop_cnn = acc(hi, vit_scratch) - acc(lo, vit_scratch), acc(hi, cnn) - acc(lo, cnn)
    more = drop_vit > drop_cnn
    lines.append(f"- From {hi['fraction']:g} to {lo['fraction']:g} of the training data, the ViT trained from scratch "
                 f"loses {100 * drop_vit:.1f} points and the CNN {100 * drop_cnn:.1f}: 'a ViT from scratch needs more "
                 f"data than a CNN' **{'holds' if more else 'does not hold'}** on these curves (means over seeds; the "
                 f"intervals are in the table).")
    if vit_tuned:
        gap_scratch, gap_tuned = acc(lo, cnn) - acc(lo, vit_scratch), acc(lo, cnn) - acc(lo, vit_tuned)
        closes = gap_tuned < gap_scratch
        lines.append(f"- At {lo['fraction']:g} of the data the CNN leads the scratch ViT by {100 * gap_scratch:.1f} points "
                     f"and the fine-tuned ViT by {100 * gap_tuned:.1f}: 'pretraining closes the gap' "
                     f"**{'holds' if closes else 'does not hold'}**"
                     + (f" (it narrows it by {100 * (gap_scratch - gap_tuned):.1f} points)." if closes else "."))
    return lines


def figure(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in points[0]["top1"]:
        xs = [p["fraction"] for p in points]
        mean = [100 * (p["top1"][r]["mean"] or 0) for p in points]
        ax.plot(xs, mean, marker="o", label=r)
        lo = [100 * (p["top1"][r]["ci95_lo"] if p["top1"][r]["ci95_lo"] is not None else p["top1"][r]["mean"])
              for p in points]
        hi = [100 * (p["top1"][r]["ci95_hi"] if p["top1"][r]["ci95_hi"] is not None else p["top1"][r]["mean"])
              for p in points]
        ax.fill_between(xs, [max(0, v) for v in lo], [min(100, v) for v in hi], alpha=0.15)
    ax.set(xscale="log", xlabel="share of the training split used (log scale)", ylabel="test top-1 (%)",
           title="Accuracy against training data (mean over seeds, band: 95% CI)", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    args = ap.parse_args(argv)
    bad = [f for f in args.fractions if not 0 < f <= 1]
    if bad:
        print(f"vitpipe: error: --fractions {bad} must be in (0, 1]", file=sys.stderr)
        return 2
    points = [run_fraction(f) for f in sorted(set(args.fractions))]
    import yaml

    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    variants = doc.get("variants") or {}
    cnn = next((v for v, s in variants.items() if str(s.get("arch", "")).startswith("resnet")), None)
    model = doc.get("model") or {}
    tuned = next((v for v, s in variants.items() if all(s.get(k) == model.get(k) for k in ("arch", "patch", "dim",
                                                                                             "depth", "heads"))), None)
    reports = ROOT / "reports"
    (reports / "data_efficiency.json").write_text(json.dumps(points, indent=2) + "\n")
    figure(points, reports / "figures" / "data_efficiency.png")
    rows = ["| share of train | runs: test top-1, mean [95% CI] | stages run |", "| --- | --- | --- |"]
    for p in points:
        cells = "; ".join(f"{r} {100 * v['mean']:.1f}%" + (f" [{100 * v['ci95_lo']:.1f}, {100 * v['ci95_hi']:.1f}]"
                                                          if v["ci95_lo"] is not None else "")
                          for r, v in p["top1"].items())
        rows.append(f"| {p['fraction']:g} ({p['train_images'].get('scratch', '?')} images) | {cells} | "
                    f"{', '.join(p['stages_run'])} |")
    shares = " ".join(f"{p['fraction']:g}" for p in points)
    md = ["# How much data a ViT needs", "", f"`python scripts/data_sweep.py --fractions {shares}`: one DVC experiment "
          "per share of the training split (val and test whole).", "", *rows, "",
          "![Accuracy against training data](figures/data_efficiency.png)", ""]
    md += verdict(points, cnn, "scratch", tuned) if cnn else ["- No CNN variant in params.yaml: nothing to compare."]
    (reports / "data_efficiency.md").write_text("\n".join(md) + "\n")
    print(f"data_sweep: {len(points)} fractions -> reports/data_efficiency.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
