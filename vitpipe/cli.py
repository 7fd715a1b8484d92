"""`vitpipe plan MODEL ...`: will it fit, how should it be batched, how long will it take.
`vitpipe plan --params FILE`: the same for every training stage of a params file (a preset),
with the `dvc exp run -S` overrides that make it fit the device.
`vitpipe info`: what this machine has.
`vitpipe compare OLD [NEW]`: what changed between two revisions' results, noise-aware."""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys

from vitpipe.errors import ParamError, UserError

GiB = 2**30


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"vitpipe: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    from vitpipe.costmodel.compute import ATTENTION, OPTIMIZERS, PRECISIONS

    p = argparse.ArgumentParser(prog="vitpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="params, FLOPs, memory, fit, micro-batch plan and ETA")
    plan.add_argument("model", nargs="?",
                      help="vit_b16-style name, resnet18..152, or a timm ViT/ResNet name (or --params)")
    plan.add_argument("--params", metavar="FILE", default=None,
                      help="plan every training stage of a params file (params.yaml, presets/*.yaml), each "
                           "with its own batch, steps, optimizer and precision, and print the dvc exp run -S "
                           "overrides that make it fit --device (--batch/--precision/... are not used)")
    plan.add_argument("-S", "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="with --params: change the file as `dvc exp run -S` would before planning "
                           "(e.g. -S data.image_size=384); repeatable, and repeated in the printed command")
    plan.add_argument("--image-size", type=int, default=None,
                      help="pixels (default: a timm name's own, e.g. 384 for vit_small_patch32_384; else 224)")
    plan.add_argument("--batch", type=int, default=512, help="effective batch per optimizer step")
    plan.add_argument("--device", default="t4",
                      help="t4, v100-16, a100-80, h100-80, l4, local, ..., or auto: this machine's GPU "
                           "(its known profile with its real memory), else the local CPU")
    # choices are checked by the library, so an unknown value gets the one-line error
    plan.add_argument("--precision", default="fp32", help="/".join(PRECISIONS))
    plan.add_argument("--optimizer", default="adamw", help="/".join(OPTIMIZERS))
    plan.add_argument("--attention", default="sdpa", help="/".join(ATTENTION))
    plan.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    plan.add_argument("--num-classes", type=int, default=1000)
    plan.add_argument("--steps", type=int, default=10000, help="optimizer steps for the ETA")
    plan.add_argument("--devices", type=int, default=1,
                      help="devices of this kind available (over one or more machines): where the whole training "
                           "state does not fit one, shard it over them (FSDP)")
    plan.add_argument("--mfu", type=float, default=None,
                      help="model FLOPs utilisation; default: the device's, or calibrated for local")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    info = sub.add_parser("info", help="versions, CPU, RAM, GPU")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)

    compare = sub.add_parser("compare", help="what changed between two revisions' results, within the seeds' noise or not",
                             description="One table of the metrics that changed from OLD to NEW (default: the "
                                         "workspace): results first, a change inside the seeds' 95%% interval marked "
                                         "within noise; machine metrics (img/s, memory, wall time) last, apart.")
    compare.add_argument("old", metavar="OLD", help="git revision (commit, branch, tag, dvc experiment), e.g. HEAD~1")
    compare.add_argument("new", metavar="NEW", nargs="?", default=None, help="another revision (default: the workspace)")
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


def plan_model(model: str, image_size=224, batch=512, device="t4", precision="fp32",
               optimizer="adamw", attention="sdpa", checkpointing=False, num_classes=1000,
               steps=10000, mfu=None, devices=1) -> dict:
    """The `vitpipe plan` answer as a dict (also what --json prints); `sharding`: replicate (DDP)
    or shard (FSDP) over `devices` devices (vitpipe.costmodel.sharding.decide)."""
    from vitpipe.costmodel import compute
    from vitpipe.hardware import probe
    from vitpipe.models import describe, model_config, validate_spec

    for what, value in (("--batch", batch), ("--num-classes", num_classes), ("--steps", steps),
                        ("--image-size", image_size), ("--devices", devices)):
        if value < 1:
            raise UserError(f"{what} must be a positive integer, got {value}")
    spec = {"arch": model}
    try:
        validate_spec(spec, image_size, "model", image_size_key="--image-size")
    except ParamError as e:
        if e.key.endswith(".arch"):
            raise UserError(f"unknown model {model!r}; allowed: {e.allowed}") from None
        raise UserError(f"{model}: {e.allowed}") from None
    for what, value, allowed in (("precision", precision, compute.PRECISIONS),
                                 ("optimizer", optimizer, compute.OPTIMIZERS),
                                 ("attention", attention, compute.ATTENTION)):
        compute.check_choice(what, value, allowed)
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")
    dev = probe.get_device(device)
    calibration = None
    if mfu is None and dev.name == "local":
        calibration = probe.calibrate_mfu(peak_flops=dev.peak_flops["fp32"])
        mfu = calibration["mfu"]
    cfg = model_config(spec, num_classes, image_size)
    est = compute.estimate(cfg, batch, dev, precision, optimizer, attention, checkpointing,
                           steps=steps, mfu=mfu)
    if calibration:
        est["mfu_source"], est["mfu_basis"] = "calibrated here", "measured"
        est["mfu_note"] = (f"MFU {mfu:.3f} measured on this machine (a small fp32 ViT step against its matmul "
                           f"peak), applied to the {precision} peak")
    from vitpipe.costmodel import sharding

    est["sharding"] = sharding.decide(cfg, batch, dev, devices, precision, optimizer, attention, checkpointing)
    return {"model": model, "name": describe(spec, image_size), "image_size": image_size,
            "num_classes": num_classes, "devices": devices, **est}


def native_image_size(model: str) -> int:
    """A timm name ends in its resolution (vit_small_patch32_384); short names do not (224)."""
    m = re.search(r"_(\d+)$", model.split(".")[0])
    return int(m.group(1)) if m else 224


def cmd_plan(args) -> int:
    if args.params:
        if args.model:
            raise UserError("give a MODEL or --params FILE, not both")
        r = plan_params(args.params, args.device, mfu=args.mfu, sets=args.sets)
        print(json.dumps(r, indent=2) if args.json else format_params_plan(r))
        return 0
    if not args.model:
        raise UserError("vitpipe plan needs a MODEL (e.g. vit_b16) or --params FILE")
    if args.sets:
        raise UserError(f"-S {args.sets[0]} changes a params file: use it with --params FILE")
    r = plan_model(args.model, native_image_size(args.model) if args.image_size is None else args.image_size, args.batch, args.device, args.precision,
                   args.optimizer, args.attention, args.checkpointing, args.num_classes,
                   args.steps, args.mfu, args.devices)
    print(json.dumps(r, indent=2) if args.json else format_plan(r))
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
        return (f"{short}; FSDP over {n} x {dev} fits: micro-batch {sh['micro_batch']} x {sh['accum_steps'] // n} "
                f"per device x {n} devices = {r['batch']} (state {_gb(sh['state_bytes_per_device'])} GiB per device, "
                f"needs {_gb(sh['per_device_required_bytes'])} GiB): set parallel: fsdp, micro_batch: "
                f"{sh['micro_batch']}, nproc x nnodes = {n}")
    fewest = (f"; FSDP fits over {sh['fewest_devices']} x {dev} (--devices {sh['fewest_devices']})"
              if sh["fewest_devices"] else "")
    return f"{short}{fewest}: or try --checkpointing, bf16/fp16, sgd or a bigger device"


def format_plan(r: dict) -> str:
    comps = ", ".join(f"{k[len('params_'):]} {_m(v)}" for k, v in r.items()
                      if k.startswith("params_") and v)
    opt = {"adamw": "AdamW", "sgd": "SGD-momentum"}[r["optimizer"]]
    ckpt = ", checkpointing" if r["checkpointing"] else ""
    mem = (f"weights {_gb(r['weights_bytes'])} + grads {_gb(r['grads_bytes'])} + {opt} "
           f"{_gb(r['optimizer_bytes'])}"
           + (f" + half weights {_gb(r['autocast_weights_bytes'])}" if r["autocast_weights_bytes"] else "")
           + f" + activations {_gb(r['activations_bytes'])} + transient {_gb(r['transient_bytes'])}")
    cap = _gb(r["capacity_bytes"])
    if r["fits"]:
        fit = f"YES: needs {_gb(r['required_bytes'])} of {cap} GiB"
    else:
        fit = f"NO: needs {_gb(r['required_bytes'])} of {cap} GiB ({r['required_bytes'] / r['capacity_bytes']:.2f}x)"
    if r["micro_batch"]:
        plan = (f"micro-batch {r['micro_batch']} x {r['accum_steps']} accumulation steps = {r['batch']}"
                f" (needs {_gb(r['micro_required_bytes'])} GiB, {_gb(r['headroom_bytes'])} GiB headroom)")
    else:
        plan = sharded_plan(r)
    rows = [
        ("params", f"{_m(r['params'])}  ({comps})"),
        ("FLOPs / image", f"{r['forward_flops'] / 1e9:,.2f} G forward, {r['train_flops'] / 1e9:,.2f} G train step"),
        ("activations", f"{r['activation_bytes'] / 2**20:,.1f} MiB per image"),
        (f"memory @ {r['batch']}", f"{mem} = peak {_gb(r['peak_bytes'])} GiB"),
        ("fits at once?", fit),
        ("plan", plan),
        *([("parallel", f"ddp over {r['devices']} x {r['device']}: the whole state "
                        f"({_gb(r['sharding']['state_bytes_per_device'])} GiB) fits each device")]
          if r["devices"] > 1 and r["sharding"]["parallel"] == "ddp" else []),
        ("speed", f"{r['img_per_s']:,.1f} img/s (MFU {r['mfu']:.3f} {r['mfu_source']}, peak "
                  f"{r['peak_flops'] / 1e12:,.1f} TFLOP/s {r['precision']})"),
        ("ETA", f"{r['steps']:,} steps x {r['batch']} = {_duration(r['eta_s'])}"),
        ("MFU basis", f"{r['mfu_basis']}: {r['mfu_note']}"),
    ]
    attn = f", {r['attention']} attention" if r["attention_applies"] else ""
    head = (f"{r['name']} on {r['device_label']}: {r['precision']}, {opt}{attn}{ckpt}, "
            f"batch {r['batch']}, {r['num_classes']} classes")
    width = max(len(k) for k, _ in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])


# ---------------------------------------------------------------------------------------
# plan --params: every training stage of a params file on one device

def dataset_classes(dataset: str) -> int:
    """Classes of the dataset's head: the source's count, an image folder's from its prepared
    meta.json if there is one, else 1000 (the head is a small part of the memory anyway)."""
    from vitpipe import pipeline
    from vitpipe.data import sources

    return sources.class_count(dataset, pipeline.prepared_dir(dataset)) or 1000


def _recipe(doc: dict, section: str, variant: str | None):
    """The validated recipe, with `precision` as written (`auto` included, whether or not
    this version of params.py knows it yet)."""
    from vitpipe import params

    base = dict(doc.get(section) or {})
    override = dict(((doc.get("variants") or {}).get(variant) or {}).get(section) or {}) if variant else {}
    precision = override.get("precision", base.get("precision", "fp32"))
    if precision == "auto":              # validate the rest; auto itself is resolved below
        base["precision"] = "fp32"
        override.pop("precision", None)
    variants = {**(doc.get("variants") or {})}
    if variant:
        variants[variant] = {**variants[variant], section: override}
    recipe = params.train_params({**doc, section: base, "variants": variants}, section, variant)
    return recipe, precision, "precision" in (((doc.get("variants") or {}).get(variant) or {}).get(section) or {})


def apply_sets(doc: dict, sets) -> dict:
    """`doc` changed as `dvc exp run -S` changes params.yaml: KEY=VALUE (+KEY=, ++KEY= add a
    key), ~KEY removes one; VALUE is YAML (`32`, `fp16`, `[0, 1]`)."""
    import copy

    import yaml

    doc = copy.deepcopy(doc)
    for s in sets:
        key, eq, value = s.lstrip("+~").partition("=")
        if not key or (not eq) != s.startswith("~"):
            raise UserError(f"-S {s!r}: give KEY=VALUE (e.g. -S finetune.micro_batch=32) or ~KEY to remove one")
        *parents, last = key.split(".")
        node = doc
        for k in parents:
            node = node.setdefault(k, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise UserError(f"-S {s!r}: {key} is not inside a section of the params file")
        if s.startswith("~"):
            node.pop(last, None)
        else:
            node[last] = yaml.safe_load(value)
    return doc


def plan_params(path, device="auto", mfu=None, sets=()) -> dict:
    """Plan every training stage of the params file `path` on `device`: per stage the
    precision it will run with there, the micro-batch x accumulation that fits, the memory it
    needs and its ETA; and the `dvc exp run -S` overrides that make the file run there as
    planned (empty when it fits as written).

    A micro-batch that fits as written is kept (the file's author chose it); one that does not
    fit becomes the largest divisor of the batch that does. `precision: auto` and bf16 on a
    GPU without bf16 units are resolved by `vitpipe.hardware.precision.resolve`, as training
    resolves them; where it refuses bf16 (no bf16 units) the plan overrides it with fp16.

    `sets` (`-S KEY=VALUE`, as `dvc exp run -S`) change the file before it is planned; they
    lead the overrides. An override names the key where it acts: a variant's micro-batch as
    `variants.<v>.<section>.micro_batch` (added with `++` where the file has none), since a
    variant's key wins over its section's (`-S finetune.micro_batch=32` leaves a variant that
    says 512 at 512) and one value does not fit every model; a precision (the same for every
    stage) as the section's key, or the variant's where it has its own."""
    from vitpipe import model_specs, params
    from vitpipe.costmodel import compute
    from vitpipe.hardware import precision as precisions
    from vitpipe.hardware import probe
    from vitpipe.models import describe, family_of_config, model_config

    doc = apply_sets(params.read_yaml(path), sets)
    data = params.data_params(doc)
    size = data.image_size
    classes = dataset_classes(data.dataset)
    dev = probe.get_device(device)
    if mfu is None and dev.name == "local":
        mfu = probe.calibrate_mfu(peak_flops=dev.peak_flops["fp32"])["mfu"]

    jobs = [("train_scratch", "train", None, model_specs.model_spec(doc, size), classes)]
    for v in params.variant_names(doc):
        spec = model_specs.variant_spec(doc, v, size)
        if spec["source"] == "fractal":
            jobs.append((f"pretrain@{v}", "pretrain", v, spec, params.train_params(doc, "pretrain", v).classes))
        jobs.append((f"finetune@{v}", "finetune", v, spec, classes))

    stages, overrides = [], list(sets)
    variants = doc.get("variants") or {}

    def key(section, variant, name):
        if variant is None:
            return f"{section}.{name}"
        own = (variants.get(variant) or {}).get(section) or {}
        return f"variants.{variant}.{section}.{name}" if name in own else None

    def override(k, value, variant, section, name):
        # a key the file does not have yet is added with Hydra's `++` (dvc exp run -S)
        overrides.append(f"{k}={value}" if k else f"++variants.{variant}.{section}.{name}={value}")

    precision_done = set()
    for stage, section, variant, spec, n_classes in jobs:
        recipe, requested, own_precision = _recipe(doc, section, variant)
        try:
            precision = precisions.resolve(requested, dev, f"{section}.precision")
            why = f"auto = {precision} on {dev.label}" if requested == "auto" else ""
        except ParamError:   # bf16 on a card without bf16 units: plan it in fp16 and say so
            precision, why = "fp16", f"{dev.label} has no bf16 units: fp16 with a grad scaler instead of emulated bf16"
        cfg = model_config({k: v for k, v in spec.items() if k not in ("source", "weights", "pretrain", "finetune")},
                           n_classes, size)
        ckpt = bool(recipe.activation_checkpointing) and family_of_config(cfg).checkpointing
        est = compute.estimate(cfg, recipe.batch_size, dev, precision, recipe.optimizer, "sdpa", ckpt,
                               steps=recipe.steps, mfu=mfu)
        need = compute.required_bytes(
            compute.memory(cfg, recipe.micro_batch, precision, recipe.optimizer, "sdpa", ckpt)["peak"], dev)
        as_written = need <= dev.memory_bytes
        micro = recipe.micro_batch if as_written else est["micro_batch"]
        row = {"stage": stage, "section": section, "variant": variant,
               "model": describe({k: v for k, v in spec.items() if k not in ("source", "weights")}, size),
               "num_classes": n_classes, "batch": recipe.batch_size, "steps": recipe.steps,
               "precision_requested": requested, "precision": precision, "precision_note": why,
               "checkpointing": ckpt, "optimizer": recipe.optimizer,
               "micro_batch_written": recipe.micro_batch, "micro_batch": micro,
               "accum_steps": recipe.batch_size // micro if micro else 0,
               "largest_micro_batch": est["micro_batch"],
               "required_bytes": (need if as_written else est["micro_required_bytes"]),
               "fits": bool(micro), "fits_as_written": as_written,
               "img_per_s": est["img_per_s"], "eta_s": est["eta_s"]}
        stages.append(row)
        if precision != requested and requested != "auto":
            k = key(section, variant, "precision") if own_precision else f"{section}.precision"
            if k not in precision_done:
                precision_done.add(k)
                overrides.append(f"{k}={precision}")
        if micro and micro != recipe.micro_batch:
            override(key(section, variant, "micro_batch"), micro, variant, section, "micro_batch")
    return {"params_file": str(path), "device": dev.name, "device_label": dev.label,
            "memory_bytes": dev.memory_bytes, "capability": list(dev.capability) if dev.capability else None,
            "peak_flops": dict(dev.peak_flops), "native_precision": precisions.native(dev),
            "mfu": mfu if mfu is not None else dev.mfu,
            "fits": all(r["fits"] for r in stages), "stages": stages, "overrides": overrides,
            "eta_s": sum(r["eta_s"] for r in stages)}


def format_params_plan(r: dict) -> str:
    cap = r["capability"]
    peaks = ", ".join(f"{k} {v / 1e12:,.1f}" for k, v in r["peak_flops"].items())
    head = [f"{r['params_file']} on {r['device_label']}: {_gb(r['memory_bytes'])} GiB"
            + (f", compute capability {cap[0]}.{cap[1]}" if cap else "")
            + f", native precision {r['native_precision']}",
            f"  peak TFLOP/s: {peaks}; MFU {r['mfu']:.2f}"]
    rows = [("stage", "model", "precision", "micro x accum = batch", "needs GiB", "ETA")]
    for s in r["stages"]:
        prec = s["precision"] + ("*" if s["precision"] != s["precision_requested"] else "")
        if s["fits"]:
            mb = f"{s['micro_batch']} x {s['accum_steps']} = {s['batch']}"
            mb += "" if s["fits_as_written"] else f" (was {s['micro_batch_written']})"
            needs = _gb(s["required_bytes"])
        else:
            mb, needs = "does not fit at micro-batch 1", "-"
        rows.append((s["stage"], s["model"], prec, mb, needs, _duration(s["eta_s"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = head + ["  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip() for row in rows]
    notes = sorted({s["precision_note"] for s in r["stages"] if s["precision_note"]})
    lines += [f"  * {n}" for n in notes]
    lines.append(f"  total ETA {_duration(r['eta_s'])} (the compute model's estimate; evaluation not included)")
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

    info = {"python": platform.python_version(), "torch": version("torch"),
            "torchvision": version("torchvision"), "timm": version("timm"), "dvc": version("dvc"),
            "platform": platform.platform(), "cpu_cores": cpu_count(),
            "ram_total_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "ram_available_gb": round(psutil.virtual_memory().available / 1e9, 1),
            "gpus": gpu_info()}
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
                gpus.append({"name": name.decode() if isinstance(name, bytes) else name,
                             "memory_gb": round(mem.total / 1e9, 1),
                             "driver": _str(pynvml.nvmlSystemGetDriverVersion())})
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception:            # no driver / no library: ask torch instead
        pass
    try:
        import torch

        return [{"name": torch.cuda.get_device_name(i),
                 "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 1e9, 1)}
                for i in range(torch.cuda.device_count())]
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
