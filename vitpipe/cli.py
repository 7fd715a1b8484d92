"""`vitpipe plan MODEL ...`: will it fit, how should it be batched, how long will it take.
`vitpipe plan --params FILE`: the same for every training stage of a params file (a preset),
with the `dvc exp run -S` overrides that make it fit the device.
`vitpipe info`: what this machine has.
`vitpipe compare OLD [NEW]`: what changed between two revisions' results, noise-aware."""

from __future__ import annotations

import argparse
import json
import platform
import sys

from vitpipe.errors import UserError

GiB = 2**30


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"vitpipe: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """argparse's errors in the one-line form of every other error (no usage block above it)."""

    def error(self, message):
        self.exit(2, f"vitpipe: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from vitpipe.costmodel.compute import ATTENTION, OPTIMIZERS, PRECISIONS

    p = OneLineParser(prog="vitpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser(
        "plan",
        help="params, FLOPs, memory, fit, micro-batch plan, img/s and ETA",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    plan.add_argument(
        "model",
        nargs="*",
        help="vit_b16-style name, resnet18..152, convnext_tiny.., or a timm ViT/ResNet name; "
        "several give one table (or --params)",
    )
    plan.add_argument(
        "--params",
        metavar="FILE",
        default=None,
        help="plan every training stage of a params file (params.yaml, presets/*.yaml), each "
        "with its own batch, steps, optimizer and precision, and print the dvc exp run -S "
        "overrides that make it fit --device (--batch/--precision/... are not used)",
    )
    plan.add_argument(
        "-S",
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --params: change the file as `dvc exp run -S` would before planning "
        "(e.g. -S data.image_size=384); repeatable, and repeated in the printed command",
    )
    plan.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="pixels (default: a timm name's own, e.g. 384 for vit_small_patch32_384; else 224)",
    )
    plan.add_argument("--batch", type=int, default=512, help="effective batch per optimizer step")
    plan.add_argument(
        "--device",
        default="t4",
        help="t4, p100, v100-16, l4, a10g, a100-80, h100-80, h200, rtx3090, local, auto (this "
        "machine's GPU as its known profile with its real memory, else the local CPU), or "
        "FILE.yaml: your own card (keys as in vitpipe/costmodel/devices.yaml)",
    )
    # choices are checked by the library, so an unknown value gets the one-line error
    plan.add_argument("--precision", default="fp32", help="/".join(PRECISIONS))
    plan.add_argument("--optimizer", default="adamw", help="/".join(OPTIMIZERS))
    plan.add_argument("--attention", default="sdpa", help="/".join(ATTENTION))
    plan.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    plan.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    plan.add_argument("--steps", type=int, default=10000, help="optimizer steps for the ETA")
    plan.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices of this kind (over one or more machines): the batch is split over them "
        "(data parallel, gradients all-reduced); where the whole training state does not fit "
        "one, it is sharded (FSDP)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON (a list for several models)")
    plan.set_defaults(func=cmd_plan)

    info = sub.add_parser("info", help="versions, CPU, RAM, GPU")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    compare = sub.add_parser(
        "compare",
        help="what changed between two revisions' results, within the seeds' noise or not",
        description="One table of the metrics that changed from OLD to NEW (default: the "
        "workspace): results first, a change inside the seeds' 95%% interval marked "
        "within noise; machine metrics (img/s, memory, wall time) last, apart.",
    )
    compare.add_argument("old", metavar="OLD", help="git revision (commit, branch, tag, dvc experiment), e.g. HEAD~1")
    compare.add_argument(
        "new", metavar="NEW", nargs="?", default=None, help="another revision (default: the workspace)"
    )
    compare.add_argument("--md", action="store_true", help="a markdown table")
    compare.set_defaults(func=cmd_compare)

    from vitpipe.checkpoints import cli as checkpoints_cli

    checkpoints_cli.add_parser(sub)
    return p


def cmd_compare(args) -> int:
    from vitpipe.report.compare import compare

    print(compare(args.old, args.new, markdown=args.md))
    return 0


# ---------------------------------------------------------------------------------------
# plan


def cmd_plan(args) -> int:
    from vitpipe import plan

    if args.params:
        if args.model:
            raise UserError("give a MODEL or --params FILE, not both")
        r = plan.plan_params(args.params, args.device, sets=args.sets)
        print(json.dumps(r, indent=2) if args.json else format_params_plan(r))
        return 0
    if not args.model:
        raise UserError("vitpipe plan needs a MODEL (e.g. vit_b16), several, or --params FILE")
    if args.sets:
        raise UserError(f"-S {args.sets[0]} changes a params file: use it with --params FILE")
    rows = plan.plan_models(
        args.model,
        args.image_size,
        batch=args.batch,
        device=args.device,
        precision=args.precision,
        optimizer=args.optimizer,
        attention=args.attention,
        checkpointing=args.checkpointing,
        num_classes=args.num_classes,
        steps=args.steps,
        devices=args.devices,
    )
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=2))
    else:
        print(format_plan(rows[0]) if len(rows) == 1 else format_models_table(rows))
    return 0


def _m(n):
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n / 1e6:.3f} M"


def _gb(n):
    return f"{n / GiB:.2f}"


def _duration(s):
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def sharded_plan(r: dict) -> str:
    """The plan line where the whole state does not fit one device even at micro-batch 1."""
    sh, dev = r["sharding"], r["device"]
    short = f"DDP does not fit even at micro-batch 1 (short by {_gb(-r['headroom_bytes'])} GiB)"
    if sh["parallel"] == "fsdp":
        n = sh["nproc"]
        return (
            f"{short}; FSDP over {n} x {dev} fits: micro-batch {sh['micro_batch']} x {sh['accum_steps'] // n} "
            f"per device x {n} devices = {r['batch']} (state {_gb(sh['state_bytes_per_device'])} GiB per device, "
            f"needs {_gb(sh['per_device_required_bytes'])} GiB): set parallel: fsdp, micro_batch: "
            f"{sh['micro_batch']}, nproc x nnodes = {n}"
        )
    fewest = (
        f"; FSDP fits over {sh['fewest_devices']} x {dev} (--devices {sh['fewest_devices']})"
        if sh["fewest_devices"]
        else ""
    )
    return f"{short}{fewest}: or try --checkpointing, bf16/fp16, sgd or a bigger device"


def _split(split: dict) -> str:
    return (
        f"{split['compute_s']:.0%} compute-bound, {split['memory_s']:.0%} memory-bound, "
        f"{split['overhead_s']:.0%} kernel launches"
    )


def format_models_table(rows: list[dict]) -> str:
    """Several models on one device at one setting: one table."""
    r0 = rows[0]
    head = (
        f"on {r0['device_label']}: {r0['precision']}, {r0['optimizer']}, batch {r0['batch']}, "
        f"{r0['steps']:,} steps, {r0['num_classes']} classes"
    )
    table = [
        (
            "model",
            "params",
            "GFLOP/img",
            "peak GiB",
            "fits",
            "micro x accum",
            "train img/s",
            "infer img/s",
            "compute/memory/launch",
            "ETA",
        )
    ]
    for r in rows:
        mb = f"{r['micro_batch']} x {r['accum_steps']}" if r["micro_batch"] else "-"
        s = r["time_split"]
        table.append(
            (
                r["name"],
                _m(r["params"]),
                f"{r['forward_flops'] / 1e9:,.1f}",
                _gb(r["peak_bytes"]),
                "yes" if r["fits"] else ("micro" if r["micro_batch"] else "NO"),
                mb,
                f"{r['train_img_per_s']:,.1f}",
                f"{r['infer_img_per_s']:,.1f}",
                f"{s['compute_s']:.0%}/{s['memory_s']:.0%}/{s['overhead_s']:.0%}",
                _duration(r["eta_s"]),
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    lines = [head] + ["  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(
        lines
        + [
            "  times: the time model (vitpipe/costmodel/steptime.py); fits: yes whole, "
            "micro with accumulation, NO not even at micro-batch 1"
        ]
    )


def format_plan(r: dict) -> str:
    comps = ", ".join(f"{k[len('params_') :]} {_m(v)}" for k, v in r.items() if k.startswith("params_") and v)
    opt = {"adamw": "AdamW", "sgd": "SGD-momentum"}[r["optimizer"]]
    ckpt = ", checkpointing" if r["checkpointing"] else ""
    mem = (
        f"weights {_gb(r['weights_bytes'])} + grads {_gb(r['grads_bytes'])} + {opt} "
        f"{_gb(r['optimizer_bytes'])}"
        + (f" + half weights {_gb(r['autocast_weights_bytes'])}" if r["autocast_weights_bytes"] else "")
        + f" + activations {_gb(r['activations_bytes'])} + transient {_gb(r['transient_bytes'])}"
    )
    cap = _gb(r["capacity_bytes"])
    if r["fits"]:
        fit = f"YES: needs {_gb(r['required_bytes'])} of {cap} GiB"
    else:
        fit = f"NO: needs {_gb(r['required_bytes'])} of {cap} GiB ({r['required_bytes'] / r['capacity_bytes']:.2f}x)"
    if r["micro_batch"]:
        plan = (
            f"micro-batch {r['micro_batch']} x {r['accum_steps']} accumulation steps = {r['batch']}"
            f" (needs {_gb(r['micro_required_bytes'])} GiB, {_gb(r['headroom_bytes'])} GiB headroom)"
        )
    else:
        plan = sharded_plan(r)
    rows = [
        ("params", f"{_m(r['params'])}  ({comps})"),
        ("FLOPs / image", f"{r['forward_flops'] / 1e9:,.2f} G forward, {r['train_flops'] / 1e9:,.2f} G train step"),
        ("activations", f"{r['activation_bytes'] / 2**20:,.1f} MiB per image"),
        (f"memory @ {r['batch']}", f"{mem} = peak {_gb(r['peak_bytes'])} GiB"),
        ("fits at once?", fit),
        ("plan", plan),
        *(
            [
                (
                    "parallel",
                    f"ddp over {r['devices']} x {r['device']}: the whole state "
                    f"({_gb(r['sharding']['state_bytes_per_device'])} GiB) fits each device",
                )
            ]
            if r["devices"] > 1 and r["sharding"]["parallel"] == "ddp"
            else []
        ),
        (
            "speed",
            f"train {r['train_img_per_s']:,.1f} img/s, inference {r['infer_img_per_s']:,.1f} img/s"
            + ("" if r["fits"] or r["micro_batch"] else " (if it fitted)"),
        ),
        (
            "time split",
            _split(r["time_split"])
            + (
                f"; + all-reduce {r['allreduce_s'] * 1e3:,.1f} ms per step over {r['devices']} devices"
                if r["devices"] > 1
                else ""
            ),
        ),
        ("ETA", f"{r['steps']:,} steps x {r['batch']} = {_duration(r['eta_s'])}"),
        ("basis", r["mfu_note"]),
    ]
    attn = f", {r['attention']} attention" if r["attention_applies"] else ""
    head = (
        f"{r['name']} on {r['device_label']}: {r['precision']}, {opt}{attn}{ckpt}, "
        f"batch {r['batch']}, {r['num_classes']} classes"
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


# ---------------------------------------------------------------------------------------
# plan --params: every training stage of a params file on one device


def format_params_plan(r: dict) -> str:
    cap = r["capability"]
    peaks = ", ".join(f"{k} {v / 1e12:,.1f}" for k, v in r["peak_flops"].items())
    head = [
        f"{r['params_file']} on {r['device_label']}: {_gb(r['memory_bytes'])} GiB"
        + (f", compute capability {cap[0]}.{cap[1]}" if cap else "")
        + f", native precision {r['native_precision']}",
        f"  peak TFLOP/s: {peaks}",
        f"  {r['basis']}",
    ]
    rows = [("stage", "model", "precision", "micro x accum = batch", "needs GiB", "train img/s", "ETA")]
    for s in r["stages"]:
        prec = s["precision"] + ("*" if s["precision"] != s["precision_requested"] else "")
        if s["fits"]:
            mb = f"{s['micro_batch']} x {s['accum_steps']} = {s['batch']}"
            mb += "" if s["fits_as_written"] else f" (was {s['micro_batch_written']})"
            needs = _gb(s["required_bytes"])
        else:
            mb, needs = "does not fit at micro-batch 1", "-"
        rows.append((s["stage"], s["model"], prec, mb, needs, f"{s['img_per_s']:,.1f}", _duration(s["eta_s"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = head + ["  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    notes = sorted({s["precision_note"] for s in r["stages"] if s["precision_note"]})
    lines += [f"  * {n}" for n in notes]
    seeds = f" = {_duration(r['eta_one_seed_s'])} x {r['seeds']} seeds" if r["seeds"] > 1 else " (1 seed)"
    lines.append(f"  total ETA {_duration(r['eta_s'])}{seeds} (the time model's estimate; evaluation not included)")
    if not r["fits"]:
        lines.append("  NOT everything fits: set activation_checkpointing: true, or use a bigger GPU")
    elif r["overrides"]:
        lines.append("  to run it here: dvc exp run " + " ".join(f"-S '{o}'" for o in r["overrides"]))
    else:
        lines.append("  fits as written: dvc exp run")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# info


def machine_info() -> dict:
    from importlib import metadata

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    import psutil

    from vitpipe.hardware.probe import cpu_count

    info = {
        "python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "dvc": version("dvc"),
        "platform": platform.platform(),
        "cpu_cores": cpu_count(),
        "ram_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "ram_available_gb": round(psutil.virtual_memory().available / 1e9, 1),
        "gpus": gpu_info(),
    }
    return info


def gpu_info() -> list[dict]:
    """GPUs by NVML (name, memory, driver); torch.cuda if NVML is missing; [] if none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                gpus.append(
                    {
                        "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_gb": round(mem.total / 1e9, 1),
                        "driver": _str(pynvml.nvmlSystemGetDriverVersion()),
                    }
                )
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no library: ask torch instead
        pass
    try:
        import torch

        return [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1),
            }
            for i in range(torch.cuda.device_count())
        ]
    except Exception:
        return []


def _str(x):
    return x.decode() if isinstance(x, bytes) else x


def cmd_info(args) -> int:
    info = machine_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    gpus = "; ".join(f"{g['name']} {g['memory_gb']} GB" for g in info["gpus"]) or "none"
    for k, v in info.items():
        if k != "gpus":
            print(f"{k:<17} {v}")
    print(f"{'gpus':<17} {gpus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
