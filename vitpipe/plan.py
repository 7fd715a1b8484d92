"""The planner: will a network fit a device, how should it be batched, how fast will it train
and infer, and how long will a params file's stages take there. `vitpipe plan` (vitpipe.cli)
parses the command line and prints what these functions return.

Times come from the time model (vitpipe.costmodel.steptime); over several devices a step is
the data-parallel split of the batch plus a ring all-reduce of the gradients over a link of
LINK_BYTES_PER_S (the communication model, stated once)."""

from __future__ import annotations

import re

from vitpipe.errors import ParamError, UserError

# A ring all-reduce moves 2 (n - 1) / n of the gradient bytes through each device's link; the
# link assumed is PCIe 4.0 x16 (~25 GB/s each way), the slowest common one: NVLink machines
# finish sooner, so over several devices the ETA is an upper bound.
LINK_BYTES_PER_S = 25e9


def check_devices(batch: int, devices: int) -> None:
    if devices > batch:
        raise UserError(
            f"--devices {devices} is more than --batch {batch}: each device needs at least one image "
            f"of the batch; use --devices <= {batch} or a larger --batch"
        )
    if batch % devices:
        raise UserError(
            f"--batch {batch} does not split evenly over --devices {devices}; "
            f"use a batch that is a multiple of {devices}"
        )


def allreduce_s(params: int, devices: int) -> float:
    """Seconds of one ring all-reduce of fp32 gradients over `devices` (0 on one)."""
    return 0.0 if devices <= 1 else 2 * (devices - 1) / devices * 4 * params / LINK_BYTES_PER_S


def plan_model(
    model: str,
    image_size=224,
    batch=512,
    device="t4",
    precision="fp32",
    optimizer="adamw",
    attention="sdpa",
    checkpointing=False,
    num_classes=1000,
    steps=10000,
    devices=1,
) -> dict:
    """The `vitpipe plan MODEL` answer as a dict (also what --json prints). The batch is split
    over `devices` (data parallel): each plans and times its share; `sharding`: replicate (DDP)
    or shard (FSDP) over them (vitpipe.costmodel.sharding.decide)."""
    from vitpipe.costmodel import compute, sharding
    from vitpipe.hardware import probe
    from vitpipe.models import describe, model_config, validate_spec

    for what, value in (
        ("--batch", batch),
        ("--num-classes", num_classes),
        ("--steps", steps),
        ("--image-size", image_size),
        ("--devices", devices),
    ):
        if value < 1:
            raise UserError(f"{what} must be a positive integer, got {value}")
    check_devices(batch, devices)
    spec = {"arch": model}
    try:
        validate_spec(spec, image_size, "model", image_size_key="--image-size")
    except ParamError as e:
        if e.key.endswith(".arch"):
            raise UserError(f"unknown model {model!r}; allowed: {e.allowed}") from None
        raise UserError(f"{model}: {e.allowed}") from None
    for what, value, allowed in (
        ("precision", precision, compute.PRECISIONS),
        ("optimizer", optimizer, compute.OPTIMIZERS),
        ("attention", attention, compute.ATTENTION),
    ):
        compute.check_choice(what, value, allowed)
    dev = probe.get_device(device)
    cfg = model_config(spec, num_classes, image_size)
    share = batch // devices
    est = compute.estimate(cfg, share, dev, precision, optimizer, attention, checkpointing, steps=steps)
    est["sharding"] = sharding.decide(cfg, batch, dev, devices, precision, optimizer, attention, checkpointing)
    sync = allreduce_s(est["params"], devices)
    step_s = est["step_s"] + sync
    est.update(
        batch=batch,
        batch_per_device=share,
        allreduce_s=sync,
        step_s=step_s,
        img_per_s=batch / step_s,
        train_img_per_s=batch / step_s,
        infer_img_per_s=est["infer_img_per_s"] * devices,
        eta_s=steps * step_s,
    )
    return {
        "model": model,
        "name": describe(spec, image_size),
        "image_size": image_size,
        "num_classes": num_classes,
        "devices": devices,
        **est,
    }


def plan_models(models, image_size=None, **kw) -> list[dict]:
    """`plan_model` for each of `models` (each at its own native size unless `image_size`)."""
    return [plan_model(m, native_image_size(m) if image_size is None else image_size, **kw) for m in models]


def native_image_size(model: str) -> int:
    """A timm name ends in its resolution (vit_small_patch32_384); short names do not (224)."""
    m = re.search(r"_(\d+)$", model.split(".")[0])
    return int(m.group(1)) if m else 224


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
    if precision == "auto":  # validate the rest; auto itself is resolved below
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


def plan_params(path, device="auto", sets=()) -> dict:
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
    seeds = len(doc.get("seeds") or [0])
    data = params.data_params(doc)
    size = data.image_size
    classes = dataset_classes(data.dataset)
    dev = probe.get_device(device)

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
        except ParamError:  # bf16 on a card without bf16 units: plan it in fp16 and say so
            precision, why = "fp16", f"{dev.label} has no bf16 units: fp16 with a grad scaler instead of emulated bf16"
        cfg = model_config(
            {k: v for k, v in spec.items() if k not in ("source", "weights", "pretrain", "finetune")}, n_classes, size
        )
        ckpt = bool(recipe.activation_checkpointing) and family_of_config(cfg).checkpointing
        est = compute.estimate(
            cfg, recipe.batch_size, dev, precision, recipe.optimizer, "sdpa", ckpt, steps=recipe.steps
        )
        need = compute.required_bytes(
            compute.memory(cfg, recipe.micro_batch, precision, recipe.optimizer, "sdpa", ckpt)["peak"], dev
        )
        as_written = need <= dev.memory_bytes
        micro = recipe.micro_batch if as_written else est["micro_batch"]
        row = {
            "stage": stage,
            "section": section,
            "variant": variant,
            "model": describe({k: v for k, v in spec.items() if k not in ("source", "weights")}, size),
            "num_classes": n_classes,
            "batch": recipe.batch_size,
            "steps": recipe.steps,
            "precision_requested": requested,
            "precision": precision,
            "precision_note": why,
            "checkpointing": ckpt,
            "optimizer": recipe.optimizer,
            "micro_batch_written": recipe.micro_batch,
            "micro_batch": micro,
            "accum_steps": recipe.batch_size // micro if micro else 0,
            "largest_micro_batch": est["micro_batch"],
            "required_bytes": (need if as_written else est["micro_required_bytes"]),
            "fits": bool(micro),
            "fits_as_written": as_written,
            "img_per_s": est["img_per_s"],
            "train_img_per_s": est["train_img_per_s"],
            "infer_img_per_s": est["infer_img_per_s"],
            "time_split": est["time_split"],
            "eta_s": est["eta_s"],
        }
        stages.append(row)
        if precision != requested and requested != "auto":
            k = key(section, variant, "precision") if own_precision else f"{section}.precision"
            if k not in precision_done:
                precision_done.add(k)
                overrides.append(f"{k}={precision}")
        if micro and micro != recipe.micro_batch:
            override(key(section, variant, "micro_batch"), micro, variant, section, "micro_batch")
    # a training stage runs once per seed; pretraining once (its own pretrain.seed)
    per_seed = sum(r["eta_s"] for r in stages if r["section"] != "pretrain")
    once = sum(r["eta_s"] for r in stages if r["section"] == "pretrain")
    one_seed = per_seed + once
    return {
        "params_file": str(path),
        "device": dev.name,
        "device_label": dev.label,
        "memory_bytes": dev.memory_bytes,
        "capability": list(dev.capability) if dev.capability else None,
        "peak_flops": dict(dev.peak_flops),
        "native_precision": precisions.native(dev),
        "basis": basis_line(dev),
        "fits": all(r["fits"] for r in stages),
        "stages": stages,
        "overrides": overrides,
        "seeds": seeds,
        "eta_one_seed_s": one_seed,
        "eta_s": once + per_seed * seeds,
    }


def basis_line(dev) -> str:
    """Where the times come from, in one line (the `--params` table's basis): a listed card's
    datasheet, or this machine's measured matmul peak and bandwidth."""
    bw = f", {dev.bandwidth / 1e9:,.0f} GB/s" if dev.bandwidth else ""
    if dev.measured:
        source = (
            f"{dev.label}'s measured fp32 matmul peak ({dev.peak('fp32') / 1e9:,.0f} GFLOP/s{bw}, "
            f"{dev.sm_count} {'SMs' if dev.kind == 'cuda' else 'threads'})"
        )
    else:
        source = f"{dev.label}'s datasheet ({dev.sm_count} SMs{bw})"
    return (
        "times: the time model (vitpipe/costmodel/steptime.py, fitted once to timm's RTX 3090 AMP training "
        f"table) on {source}"
    )
