"""How the cost scales: parameters, FLOPs, activation memory, the peak at the reference's
batch, attention's share of the cost and the largest batch per device, over image size,
patch and ViT width/depth (Ti, S, B, L), with ResNet-18/50 beside them.

Every number comes from the compute model (`vitpipe.costmodel.compute` on `models.model_config`);
nothing is trained and no formula is repeated here. Entry points:

    tables = scaling_tables(setting)                  # dict of DataFrames
    figures = scaling_figures(out_dir, tables, relative_to=report_dir)
    lines = scaling_section(tables, figures)          # markdown lines
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from vitpipe.atomic import atomic_path  # noqa: E402
from vitpipe.costmodel import compute  # noqa: E402
from vitpipe.costmodel.devices import DEVICES, GiB, MiB, get_device  # noqa: E402
from vitpipe.models import ViTConfig, describe, family_of_config, model_config  # noqa: E402

IMAGE_SIZES = (32, 64, 128, 224, 384, 512)
PATCHES = (8, 16, 32)
VIT_SIZES = ("ti", "s", "b", "l")
RESNETS = ("resnet18", "resnet50")
# the reference's setting, as params.yaml `profile:` holds it (keys as analysis.profile_setting)
REFERENCE_SETTING = {
    "batch": 512,
    "precision": "fp32",
    "optimizer": "adamw",
    "attention": "sdpa",
    "device": "t4",
    "num_classes": 100,
}
MAX_TOKENS = 2**22  # the crossover search gives up here (a 2048 x 2048 patch grid)
MAX_BATCH = 2**31
FOCUS, CNN = "ViT-B/16", "ResNet-50"  # the pair the verdicts quote
LOW, HIGH = (64, 128), (224, 512)  # resolution steps the scaling law reads
DPI = 100


# ---------------------------------------------------------------------------------------
# The models of the sweep


def network_name(arch: str) -> str:
    """'ViT-B/16', 'ResNet-50': the registry's name without the resolution."""
    return describe({"arch": arch}, 224).split(" @")[0]


def sweep_archs() -> list[str]:
    return [f"vit_{s}{p}" for s in VIT_SIZES for p in PATCHES] + list(RESNETS)


def _setting(setting: dict | None) -> dict:
    s = {**REFERENCE_SETTING, **{k: v for k, v in (setting or {}).items() if v is not None}}
    return {k: s[k] for k in REFERENCE_SETTING}


# ---------------------------------------------------------------------------------------
# Searches over the compute model


def largest_batch(cfg, device, precision="fp32", optimizer="adamw", attention="sdpa") -> int:
    """The largest batch whose training peak (+ slack and context, as `compute.plan` decides)
    fits `device`; 0 if not even one image does. Memory grows with the batch: double, then bisect."""

    def fits(batch):
        peak = compute.memory(cfg, batch, precision, optimizer, attention)["peak"]
        return compute.required_bytes(peak, device) <= device.memory_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, 2 * hi
    if hi > MAX_BATCH:
        return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@dataclass(frozen=True)
class AnyTokens(ViTConfig):
    """A ViT at any number of patches, not only a square grid, so the compute model can be
    read at every token count. The image side follows (patch x sqrt(patches))."""

    patches: int = 1

    @property
    def num_patches(self) -> int:
        return self.patches


def at_tokens(cfg: ViTConfig, tokens: int) -> AnyTokens:
    patches = tokens - cfg.prefix_tokens
    fields = {**cfg.__dict__, "image_size": round(cfg.patch * math.sqrt(patches)), "patches": patches}
    return AnyTokens(**fields)


def attention_share(cfg: ViTConfig, tokens: int, of: str, precision="fp32", attention="sdpa") -> float:
    """Attention's share of the forward FLOPs (`of="flops"`) or of the saved activation bytes
    (`of="bytes"`) of `cfg` at `tokens` tokens."""
    return compute.attention_split(at_tokens(cfg, tokens), precision, attention)[f"{of}_share"]


def crossover_tokens(cfg: ViTConfig, of: str, precision="fp32", attention="sdpa") -> int | None:
    """The smallest token count at which attention's share of `of` reaches 50%, by bisection;
    None if it stays below up to MAX_TOKENS (sdpa keeps no t x t matrix: its share levels off)."""

    def share(t):
        return attention_share(cfg, t, of, precision, attention)

    lo, hi = cfg.prefix_tokens + 1, MAX_TOKENS
    if share(lo) >= 0.5:
        return lo
    if share(hi) < 0.5:
        return None
    while hi - lo > 1:  # share(lo) < 0.5 <= share(hi)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if share(mid) >= 0.5 else (mid, hi)
    return hi


def side_px(cfg: ViTConfig, tokens: int | None) -> float:
    """The square image side (px) that gives `tokens` tokens at the model's patch."""
    return float("nan") if tokens is None else cfg.patch * math.sqrt(tokens - cfg.prefix_tokens)


# ---------------------------------------------------------------------------------------
# Tables


def scaling_tables(setting: dict | None = None) -> dict[str, pd.DataFrame]:
    """The sweep, from the compute model. `setting`: batch, precision, optimizer, attention,
    device, num_classes (as `analysis.profile_setting` gives them; defaults: the reference's
    512, fp32, AdamW, sdpa, T4, 100 classes). Tables:
      cost       one row per network and image size: params, FLOPs, activations, peak, shares
      devices    the largest batch per network, image size and device profile
      crossover  per ViT: the token count where attention passes 50% of FLOPs / activations
      doubling   per network: how much each quantity grows per doubling of the image side
    """
    s = _setting(setting)
    cost = cost_table(s)
    return {
        "cost": cost,
        "devices": device_table(s),
        "crossover": crossover_table(s),
        "doubling": doubling_table(cost),
        "setting": pd.DataFrame([s]),
    }


def cost_table(s: dict) -> pd.DataFrame:
    device = get_device(s["device"])
    rows = []
    for arch in sweep_archs():
        for size in IMAGE_SIZES:
            cfg = model_config({"arch": arch}, s["num_classes"], size)
            vit = family_of_config(cfg).attention  # a ViT: tokens, patches, attention
            f = compute.flops(cfg)
            mem = compute.memory(cfg, s["batch"], s["precision"], s["optimizer"], s["attention"])
            row = {
                "arch": arch,
                "network": network_name(arch),
                "family": network_name(arch).split("/")[0],
                "patch": cfg.patch if vit else np.nan,
                "image_size": size,
                "tokens": cfg.tokens if vit else np.nan,
                "params": compute.param_counts(cfg)["total"],
                "forward_flops": f["forward"],
                "train_flops": f["train"],
                "activation_bytes": compute.activation_bytes(cfg, s["precision"], s["attention"]),
                "activation_bytes_eager": compute.activation_bytes(cfg, s["precision"], "eager"),
                "peak_bytes": mem["peak"],
                "required_bytes": compute.required_bytes(mem["peak"], device),
                "capacity_bytes": device.memory_bytes,
            }
            row["fits"] = row["required_bytes"] <= device.memory_bytes
            if vit:
                split = compute.attention_split(cfg, s["precision"], s["attention"])
                eager = compute.attention_split(cfg, s["precision"], "eager")
                row.update(
                    attention_flops_share=split["flops_share"],
                    attention_bytes_share=split["bytes_share"],
                    attention_bytes_share_eager=eager["bytes_share"],
                )
            rows.append(row)
    return pd.DataFrame(rows)


def device_table(s: dict) -> pd.DataFrame:
    rows = []
    for arch in sweep_archs():
        for size in IMAGE_SIZES:
            cfg = model_config({"arch": arch}, s["num_classes"], size)
            for name, dev in DEVICES.items():
                rows.append(
                    {
                        "arch": arch,
                        "network": network_name(arch),
                        "image_size": size,
                        "device": name,
                        "device_label": dev.label,
                        "max_batch": largest_batch(cfg, dev, s["precision"], s["optimizer"], s["attention"]),
                    }
                )
    return pd.DataFrame(rows)


def crossover_table(s: dict) -> pd.DataFrame:
    rows = []
    for arch in [a for a in sweep_archs() if a.startswith("vit")]:
        cfg = model_config({"arch": arch}, s["num_classes"], 224)
        row = {
            "arch": arch,
            "network": network_name(arch),
            "dim": cfg.dim,
            "depth": cfg.depth,
            "heads": cfg.heads,
            "patch": cfg.patch,
        }
        for key, of, attention in (
            ("flops", "flops", s["attention"]),
            ("bytes_eager", "bytes", "eager"),
            ("bytes_sdpa", "bytes", "sdpa"),
        ):
            t = crossover_tokens(cfg, of, s["precision"], attention)
            row[f"{key}_tokens"] = t
            row[f"{key}_px"] = side_px(cfg, t)
            row[f"{key}_share_at_max"] = attention_share(cfg, MAX_TOKENS, of, s["precision"], attention)
        rows.append(row)
    return pd.DataFrame(rows)


QUANTITIES = (
    "tokens",
    "params",
    "forward_flops",
    "train_flops",
    "activation_bytes",
    "activation_bytes_eager",
    "peak_bytes",
)


def doubling_table(cost: pd.DataFrame) -> pd.DataFrame:
    """Per network and pair of neighbouring image sizes: the factor by which each quantity
    grows per doubling of the side, (v2 / v1) ** (1 / log2(s2 / s1)), read from `cost`."""
    rows = []
    for network, g in cost.sort_values("image_size").groupby("network", sort=False):
        g = g.set_index("image_size")
        sizes = list(g.index)
        pairs = list(zip(sizes, sizes[1:])) + [p for p in (LOW, HIGH) if p not in zip(sizes, sizes[1:])]
        for a, b in pairs:
            row = {"network": network, "from_px": a, "to_px": b}
            for q in QUANTITIES:
                v1, v2 = g.at[a, q], g.at[b, q]
                row[q] = (v2 / v1) ** (1 / math.log2(b / a)) if v1 and v1 == v1 else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# Figures


def scaling_figures(
    out_dir: Path, tables: dict[str, pd.DataFrame] | None = None, relative_to: Path | None = None
) -> dict[str, str]:
    """Draw the section's PNGs into `out_dir`; returns {name: path}, relative to
    `relative_to` when given (the report's folder), so markdown can link them."""
    tables = tables or scaling_tables()
    out_dir = Path(out_dir)
    drawn = {
        "flops": _flops_figure,
        "memory": _memory_figure,
        "attention_share": _share_figure,
        "max_batch": _batch_figure,
    }
    paths = {}
    for name, draw in drawn.items():
        fig = draw(tables)
        path = out_dir / f"scaling_{name}.png"
        fig.tight_layout()
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
        plt.close(fig)
        paths[name] = str(path.relative_to(relative_to) if relative_to else path)
    return paths


def _color(network: str):
    order = ["ViT-Ti", "ViT-S", "ViT-B", "ViT-L", "ResNet-18", "ResNet-50"]
    return plt.cm.tab10(order.index(network.split("/")[0]))


def _style(network: str) -> dict:
    patch = network.split("/")[1] if "/" in network else None
    return {
        "color": _color(network),
        "marker": "o",
        "markersize": 3,
        "linestyle": {"8": ":", "32": "-.", None: "--"}.get(patch, "-"),
    }


def _log_axes(ax, ylabel: str):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(IMAGE_SIZES, [str(s) for s in IMAGE_SIZES])
    ax.minorticks_off()
    ax.set(xlabel="image side (px, log scale)", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")


def _guide(ax, x0, y0, power: int, label: str):
    """A dotted line through (x0, y0) growing as side**power: what quadratic and quartic look like."""
    xs = np.array([x0, IMAGE_SIZES[-1]], dtype=float)
    ax.plot(xs, y0 * (xs / x0) ** power, color="grey", linewidth=0.8, linestyle=(0, (1, 3)))
    ax.annotate(label, (xs[-1], y0 * (xs[-1] / x0) ** power), fontsize=7, color="grey", ha="right", va="bottom")


def _series(cost, network, column):
    g = cost[cost.network == network].sort_values("image_size")
    return g.image_size, g[column]


def _flops_figure(t):
    cost = t["cost"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    panels = (
        ("width and depth at patch 16", ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", *_cnns()]),
        ("patch size, ViT-B", ["ViT-B/8", "ViT-B/16", "ViT-B/32", "ResNet-50"]),
    )
    for ax, (title, networks) in zip(axes, panels):
        for n in networks:
            x, y = _series(cost, n, "forward_flops")
            ax.plot(x, y / 1e9, label=n, **_style(n))
        _log_axes(ax, "forward GFLOPs per image (log scale)")
        x0, y0 = _series(cost, "ViT-B/16", "forward_flops")
        _guide(ax, 32, y0.iloc[0] / 1e9 / 3, 2, "∝ side² (linear in tokens)")
        _guide(ax, 128, y0.iloc[2] / 1e9 * 3, 4, "∝ side⁴ (tokens²)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Forward FLOPs per image against image size (training step ≈ 3x)")
    return fig


def _cnns():
    return [network_name(a) for a in RESNETS]


def _memory_figure(t):
    cost, s = t["cost"], t["setting"].iloc[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for n in ["ViT-Ti/16", "ViT-B/16", "ViT-L/16", *_cnns()]:
        x, y = _series(cost, n, "activation_bytes")
        left.plot(x, y / MiB, label=f"{n}" + (f" ({s.attention})" if n.startswith("ViT") else ""), **_style(n))
    x, y = _series(cost, "ViT-B/16", "activation_bytes_eager")
    left.plot(
        x,
        y / MiB,
        label="ViT-B/16 (eager: keeps the t x t softmax)",
        color=_color("ViT-B"),
        marker="s",
        markersize=3,
        linestyle=(0, (5, 1)),
        alpha=0.7,
    )
    _log_axes(left, "activations saved per image (MiB, log scale)")
    left.set_title(f"Activation memory per image, {s.precision}", fontsize=10)
    left.legend(fontsize=7.5)
    for n in ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-B/32", *_cnns()]:
        x, y = _series(cost, n, "required_bytes")
        right.plot(x, y / GiB, label=n, **_style(n))
    capacity = cost.capacity_bytes.iloc[0] / GiB
    right.axhline(capacity, color="black", linewidth=1)
    right.annotate(
        f"{get_device(s.device).label}: {capacity:.1f} GiB", (IMAGE_SIZES[0], capacity), fontsize=8, va="bottom"
    )
    _log_axes(right, "memory needed to train (GiB, log scale)")
    right.set_title(f"Training at batch {s.batch}, {s.optimizer}: peak + 5% slack + CUDA context", fontsize=10)
    right.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(0, 0.93))
    fig.suptitle("Memory against image size")
    return fig


def _share_figure(t):
    s = t["setting"].iloc[0]
    cross = t["crossover"].set_index("network")
    fig, ax = plt.subplots(figsize=(10, 4.6))
    tokens = np.unique(np.geomspace(2, 2**15, 120).astype(int))
    for n in ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16"]:
        cfg = model_config({"arch": cross.at[n, "arch"]}, int(s.num_classes), 224)
        color = _color(n)
        for of, attention, style in (("flops", s.attention, "-"), ("bytes", "eager", "--"), ("bytes", "sdpa", ":")):
            y = [attention_share(cfg, int(k), of, s.precision, attention) for k in tokens]
            ax.plot(tokens, y, color=color, linestyle=style, linewidth=1.2)
        x = cross.at[n, "flops_tokens"]
        ax.plot([x], [0.5], marker="o", color=color, label=f"{n}: FLOPs 50% at {x:,.0f} tokens")
    ax.axhline(0.5, color="black", linewidth=0.8)
    ax.axvline(197, color="grey", linewidth=0.8)
    ax.annotate("224 px at patch 16 (197 tokens) ", (197, 0.93), fontsize=7, color="grey", ha="right")
    ax.set_xscale("log")
    ax.set(
        xlabel="tokens per image (log scale)",
        ylabel="attention's share (0 to 1)",
        ylim=(0, 1),
        title="Attention's share of the forward FLOPs and of the activation memory against tokens",
    )
    top = ax.secondary_xaxis(
        "top", functions=(lambda k: 16 * np.sqrt(np.maximum(k - 1, 0)), lambda px: (np.asarray(px) / 16) ** 2 + 1)
    )
    top.set_xticks([32, 64, 128, 224, 512, 1024, 2048], ["32", "64", "128", "224", "512", "1024", "2048"])
    top.set_xlabel("image side at patch 16 (px)")
    ax.grid(alpha=0.3, which="both")
    styles = [
        plt.Line2D([], [], color="black", linestyle="-", label="FLOPs (q·kᵀ and softmax·v)"),
        plt.Line2D([], [], color="black", linestyle="--", label=f"activations, eager attention ({s.precision})"),
        plt.Line2D([], [], color="black", linestyle=":", label=f"activations, fused sdpa ({s.precision})"),
    ]
    first = ax.legend(handles=styles, fontsize=8, loc="upper left")
    ax.add_artist(first)
    ax.legend(fontsize=8, loc="center left")
    return fig


def _batch_figure(t):
    d, s = t["devices"], t["setting"].iloc[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.15]})
    on = d[d.device == s.device]
    for n in ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-B/8", "ViT-B/32", *_cnns()]:
        g = on[on.network == n].sort_values("image_size")
        g = g[g.max_batch > 0]
        left.plot(g.image_size, g.max_batch, label=n, **_style(n))
    left.axhline(s.batch, color="black", linewidth=0.8)
    left.annotate(f" the reference's batch {s.batch}", (IMAGE_SIZES[0], s.batch), fontsize=8, va="top")
    _log_axes(left, "largest batch that fits (images, log scale)")
    left.set_title(f"On the {get_device(s.device).label}, {s.precision}, {s.optimizer}", fontsize=10)
    left.legend(fontsize=7.5)
    at = d[d.image_size == 224]
    grid = at.pivot(index="network", columns="device", values="max_batch")
    networks = [
        n
        for n in ["ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-L/16", "ViT-B/8", "ViT-B/32", "ViT-L/32", *_cnns()]
        if n in grid.index
    ]
    grid = grid.loc[networks, list(DEVICES)]
    image = right.imshow(np.log2(grid.clip(lower=1).to_numpy(float)), cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid.to_numpy()):
        right.text(
            j,
            i,
            f"{v:,}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if v < grid.to_numpy().max() / 8 else "black",
        )
    right.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, fontsize=8)
    right.set_yticks(range(len(grid.index)), grid.index, fontsize=8)
    right.set(xlabel="device profile", title="Largest batch at 224 px, per device (images)")
    bar = fig.colorbar(image, ax=right)
    bar.set_label("log2 of the largest batch")
    fig.suptitle("The largest training batch that fits")
    return fig


# ---------------------------------------------------------------------------------------
# The section


def scaling_section(
    tables: dict[str, pd.DataFrame], figures: dict[str, str], heading: str = "## How the cost scales"
) -> list[str]:
    """The section's markdown lines: each figure with its number, then the scaling law (one
    paragraph, read from `tables['doubling']`), then the tables at 224 px."""
    s = tables["setting"].iloc[0]
    lines = [
        heading,
        "",
        "Computed by the compute model (`vitpipe.costmodel.compute`, checked against FlopCounterMode and autograd "
        "by the tests), nothing trained. Image sizes "
        f"{', '.join(map(str, IMAGE_SIZES))} px; ViT Ti/S/B/L at patch 8/16/32; ResNet-18/50. "
        f"Training at batch {s.batch}, {s.precision}, {s.optimizer}, {s.attention} attention, "
        f"{s.num_classes} classes.",
        "",
    ]
    verdicts = {
        "flops": flops_verdict,
        "memory": memory_verdict,
        "attention_share": share_verdict,
        "max_batch": batch_verdict,
    }
    for name, verdict in verdicts.items():
        if name in figures:
            lines += [f"![{FIGURE_TITLES[name]}]({figures[name]})", ""]
        lines += [f"- {verdict(tables)}", ""]
    lines += [scaling_law(tables), ""]
    lines += [
        "**At 224 px** (the reference's image size):",
        "",
        _markdown(summary_at(tables, 224)),
        "",
        "**Where attention passes half of the cost** (tokens, and the square image side that gives "
        "them at the model's patch):",
        "",
    ]
    crossover, note = crossover_summary(tables)
    lines += [_markdown(crossover), ""] + ([note, ""] if note else [])
    return lines


FIGURE_TITLES = {
    "flops": "Forward FLOPs against image size",
    "memory": "Memory against image size",
    "attention_share": "Attention's share of the cost against tokens",
    "max_batch": "Largest batch that fits, per device",
}


def _row(tables, network, size):
    c = tables["cost"]
    return c[(c.network == network) & (c.image_size == size)].iloc[0]


def _factor(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:,.0f}"


def _x(v: float) -> str:
    return f"×{_factor(v)}"


def flops_verdict(t) -> str:
    a, b = HIGH
    vit_a, vit_b = _row(t, FOCUS, a), _row(t, FOCUS, b)
    cnn_a, cnn_b = _row(t, CNN, a), _row(t, CNN, b)
    return (
        f"From {a} to {b} px ({_x((b / a) ** 2)} the pixels) the forward FLOPs of {FOCUS} grow "
        f"{_x(vit_b.forward_flops / vit_a.forward_flops)}, from {vit_a.forward_flops / 1e9:,.1f} to "
        f"{vit_b.forward_flops / 1e9:,.1f} GFLOPs per image ({vit_b.train_flops / 1e9:,.0f} for a training "
        f"step), and those of {CNN} {_x(cnn_b.forward_flops / cnn_a.forward_flops)}, from "
        f"{cnn_a.forward_flops / 1e9:,.1f} to {cnn_b.forward_flops / 1e9:,.1f}."
    )


def memory_verdict(t) -> str:
    s = t["setting"].iloc[0]
    a, b = HIGH
    vit_a, vit_b = _row(t, FOCUS, a), _row(t, FOCUS, b)
    cost = t["cost"]
    fit = cost[(cost.image_size == a) & cost.fits].network.tolist()
    dev = get_device(s.device).label
    return (
        f"{FOCUS} saves {vit_a.activation_bytes / MiB:,.1f} MiB per image at {a} px and "
        f"{vit_b.activation_bytes / MiB:,.1f} MiB at {b} px with {s.attention} attention "
        f"({vit_a.activation_bytes_eager / MiB:,.1f} and {vit_b.activation_bytes_eager / MiB:,.1f} MiB if "
        f"the t x t softmax is kept, eager). Training it at batch {s.batch} and {a} px needs "
        f"{vit_a.required_bytes / GiB:,.1f} GiB (peak + slack + CUDA context), "
        f"{vit_a.required_bytes / vit_a.capacity_bytes:.2f}x the {dev}; of the sweep at {a} px, "
        f"{('only ' + _names(fit)) if fit else 'none'} {'fits' if len(fit) == 1 else 'fit'} at that batch."
    )


def share_verdict(t) -> str:
    c = t["crossover"].set_index("network")
    r = c.loc[FOCUS]
    at = _row(t, FOCUS, 224)
    sdpa = (
        f"does with fused sdpa attention at {r.bytes_sdpa_tokens:,.0f} tokens"
        if _found(r.bytes_sdpa_tokens)
        else "never does with fused sdpa attention, which keeps no t x t matrix: its share levels off at "
        f"{r.bytes_sdpa_share_at_max:.0%}"
    )
    widths = ", ".join(f"{n.split('/')[0]} {c.at[n, 'flops_tokens']:,.0f}" for n in c.index if n.endswith("/16"))
    eager = c.bytes_eager_tokens
    return (
        f"Attention (q·kᵀ and softmax·v) passes half of {FOCUS}'s forward FLOPs at "
        f"{r.flops_tokens:,.0f} tokens (a {r.flops_px:,.0f} px image at patch {r.patch:.0f}; at 224 px it is "
        f"{at.attention_flops_share:.1%}). The crossover grows with the width (tokens at patch 16: {widths}), "
        f"since the rest of a block costs ∝ tokens x width² and attention ∝ tokens² x width. Of the "
        f"activation memory, attention passes half at {r.bytes_eager_tokens:,.0f} tokens "
        f"({r.bytes_eager_px:,.0f} px) with eager attention ({eager.min():,.0f} to {eager.max():,.0f} tokens "
        f"across the sweep: the t x t probabilities per head against the rest per channel) and {sdpa}."
    )


def batch_verdict(t) -> str:
    s = t["setting"].iloc[0]
    d = t["devices"]
    on = d[d.device == s.device].set_index(["network", "image_size"]).max_batch
    a, b = HIGH
    fits = sorted({n for (n, size), v in on.items() if size == a and v >= s.batch}, key=_sweep_order)
    return (
        f"On the {get_device(s.device).label}, the largest {FOCUS} batch is {on[FOCUS, a]:,} at {a} px and "
        f"{on[FOCUS, b]:,} at {b} px ({CNN}: {on[CNN, a]:,} and {on[CNN, b]:,}). At {a} px the reference's "
        f"batch of {s.batch} fits for {_names(fits) or 'none of the sweep'}."
    )


def _sweep_order(network: str) -> int:
    return [network_name(a) for a in sweep_archs()].index(network)


def _names(xs) -> str:
    xs = list(xs)
    return ", ".join(xs[:-1]) + f" and {xs[-1]}" if len(xs) > 1 else "".join(xs)


def _grows(f: float) -> str:
    """Words for a growth factor, for a plural subject: 'stay the same', 'double', 'quadruple'
    (within 3%), else 'grow ×f' or 'shrink ×f'."""
    for target, word in (
        (1, "stay the same"),
        (2, "double"),
        (4, "quadruple"),
        (8, "grow eightfold"),
        (16, "grow sixteenfold"),
    ):
        if abs(f / target - 1) < 0.03:
            return f"{word} ({_x(f)})"
    return f"grow {_x(f)}" if f > 1 else f"shrink {_x(f)}"


def _power(f: float) -> str:
    """The growth per doubling of the side as a power of the side: x4 is 'quadratic'."""
    p = math.log2(f)
    for target, word in ((0, "constant"), (1, "linear"), (2, "quadratic"), (4, "quartic")):
        if abs(p - target) < 0.1:
            return f"{word} in the side"
    return f"∝ side^{p:.1f}"


def scaling_law(t) -> str:
    """One paragraph: what each quantity does when the image side doubles, for FOCUS and CNN,
    at low resolution (an exact doubling) and at high resolution (per doubling), from `doubling`.
    Every factor and every word for it ('quadruple', 'quadratic') is read from the table."""
    dbl = t["doubling"].set_index(["network", "from_px", "to_px"])
    lo, hi = dbl.loc[(FOCUS, *LOW)], dbl.loc[(FOCUS, *HIGH)]
    cnn_lo, cnn_hi = dbl.loc[(CNN, *LOW)], dbl.loc[(CNN, *HIGH)]
    share_lo, share_hi = (_row(t, FOCUS, x).attention_flops_share for x in (LOW[0], HIGH[1]))
    on = t["devices"]
    dev = t["setting"].iloc[0].device
    batch = on[(on.device == dev) & (on.network == FOCUS)].set_index("image_size").max_batch
    shrink = (batch[HIGH[0]] / batch[HIGH[1]]) ** (1 / math.log2(HIGH[1] / HIGH[0])) if batch[HIGH[1]] else None
    tracks = abs(lo.forward_flops / lo.tokens - 1) < 0.05  # FLOPs follow the token count
    steeper = hi.forward_flops > lo.forward_flops * 1.05
    return (
        f"**The scaling law.** When the image side doubles, the pixels quadruple and so does a ViT's "
        f"patch grid. From {LOW[0]} to {LOW[1]} px the tokens of {FOCUS} {_grows(lo.tokens)}, its parameters "
        f"{_grows(lo.params)}, its forward FLOPs "
        f"{_grows(lo.forward_flops)}, its training FLOPs {_grows(lo.train_flops)} and its activations "
        f"{_grows(lo.activation_bytes)}: {'in step with the tokens' if tracks else 'not in step with the tokens'}, "
        f"{_power(lo.forward_flops)}. Between {HIGH[0]} and {HIGH[1]} px, per doubling, the FLOPs grow "
        f"{_x(hi.forward_flops)} ({_power(hi.forward_flops)}"
        f"{', faster: attention grows with tokens²' if steeper else ''}; its share of them rises from "
        f"{share_lo:.1%} at {LOW[0]} px to {share_hi:.1%} at {HIGH[1]} px), the activations "
        f"{_x(hi.activation_bytes)} with fused attention but {_x(hi.activation_bytes_eager)} when the t x t "
        f"softmax is kept (eager), and the training peak {_x(hi.peak_bytes)}; the largest batch on the "
        f"{dev.upper()} falls by a factor of {_factor(shrink) if shrink else '–'} per doubling. {CNN}'s "
        f"parameters {_grows(cnn_lo.params)}; its FLOPs {_grows(cnn_lo.forward_flops)} from {LOW[0]} to "
        f"{LOW[1]} px and grow {_x(cnn_hi.forward_flops)} per doubling between {HIGH[0]} and {HIGH[1]} px "
        f"({_power(cnn_hi.forward_flops)}), its activations {_x(cnn_hi.activation_bytes)}."
    )


def summary_at(t, size: int) -> pd.DataFrame:
    """One row per network at `size` px, formatted for the report."""
    c = t["cost"]
    c = c[c.image_size == size]
    d = t["devices"]
    s = t["setting"].iloc[0]
    on = d[(d.device == s.device) & (d.image_size == size)].set_index("network").max_batch
    return pd.DataFrame(
        {
            "network": c.network,
            "tokens": c.tokens.map(lambda v: "–" if v != v else f"{v:,.0f}"),
            "params": c.params.map(lambda v: f"{v / 1e6:,.1f}M"),
            "forward GFLOPs": c.forward_flops.map(lambda v: f"{v / 1e9:,.2f}"),
            "train GFLOPs": c.train_flops.map(lambda v: f"{v / 1e9:,.2f}"),
            f"activations MiB/img ({s.attention})": c.activation_bytes.map(lambda v: f"{v / MiB:,.1f}"),
            "activations MiB/img (eager)": c.activation_bytes_eager.map(lambda v: f"{v / MiB:,.1f}"),
            f"peak GiB @ {s.batch}": c.peak_bytes.map(lambda v: f"{v / GiB:,.1f}"),
            f"fits {s.device}?": c.fits.map({True: "yes", False: "no"}),
            f"largest batch on {s.device}": c.network.map(lambda n: f"{on[n]:,}"),
        }
    )


def crossover_summary(t) -> tuple[pd.DataFrame, str]:
    """The crossover table and a note. A column that never crosses for any network becomes the
    note's one sentence instead of a row of identical 'never' cells per network."""
    c = t["crossover"]

    def cell(tokens, px):
        return f"{tokens:,.0f} ({px:,.0f} px)" if _found(tokens) else f"never (up to {MAX_TOKENS:,} tokens)"

    df = pd.DataFrame(
        {
            "network": c.network,
            "width": c.dim.map(str),
            "depth": c.depth.map(str),
            "FLOPs": [cell(a, b) for a, b in zip(c.flops_tokens, c.flops_px)],
            "activations, eager": [cell(a, b) for a, b in zip(c.bytes_eager_tokens, c.bytes_eager_px)],
            "activations, sdpa": [
                cell(a, b) + ("" if _found(a) else f"; levels off at {m:.0%}")
                for a, b, m in zip(c.bytes_sdpa_tokens, c.bytes_sdpa_px, c.bytes_sdpa_share_at_max)
            ],
        }
    )
    if c.bytes_sdpa_tokens.map(_found).any():
        return df, ""
    share = c.bytes_sdpa_share_at_max
    note = (
        f"With fused sdpa attention, attention's share of the activations passes half for none of them (up to "
        f"{MAX_TOKENS:,} tokens; it levels off at {share.min():.0%} to {share.max():.0%})."
    )
    return df.drop(columns="activations, sdpa"), note


def _found(tokens) -> bool:
    return tokens is not None and not pd.isna(tokens)


def _markdown(df: pd.DataFrame) -> str:
    numeric = [df[c].astype(str).str.match(r"^[\d,.]+[MG]?$").all() for c in df.columns]
    return df.to_markdown(index=False, disable_numparse=True, colalign=["right" if n else "left" for n in numeric])
