"""The profile stage's work: the analytic compute model (vitpipe.costmodel.compute) evaluated for the
full-size models of params.yaml `profile:` at the reference's setting, on every device
profile, next to the reference report's own figures and formulas. Analytic only: no
full-size forward pass, seconds on a laptop CPU (plus a ~2 s check of the time model here:
a small ViT trained on this machine, measured and predicted). Memory in GiB (2^30 bytes)."""

from __future__ import annotations

import csv
import io

from vitpipe.costmodel import compute, devices, reference
from vitpipe.errors import ParamError, UserError
from vitpipe.models import describe, family_of, model_config, validate_spec

GiB = 2**30
DEFAULTS = {"attention": "sdpa", "checkpointing": False, "mfu": None}


def validate(p: dict) -> dict:
    """Every profile.* value checked before any compute; returns it with defaults filled."""
    p = {**DEFAULTS, **p}
    for key in ("image_size", "batch_size", "num_classes", "schedule_steps"):
        v = p.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParamError(f"profile.{key}", v, "a positive integer")
    for key, allowed in (
        ("precision", compute.PRECISIONS),
        ("optimizer", compute.OPTIMIZERS),
        ("attention", compute.ATTENTION),
    ):
        if p[key] not in allowed:
            raise ParamError(f"profile.{key}", p[key], "one of: " + ", ".join(allowed))
    try:
        devices.get_device(p["device"]) if p["device"] not in devices.LOCAL else None
    except UserError:
        raise ParamError("profile.device", p["device"], "one of: " + ", ".join(devices.device_names())) from None
    if p["mfu"] is not None:  # times come from the time model now; the key stays readable as null
        raise ParamError(
            "profile.mfu",
            p["mfu"],
            "null (times come from the time model, vitpipe/costmodel/steptime.py, not from an assumed MFU)",
        )
    models = p.get("models")
    if not isinstance(models, list) or not models:
        raise ParamError("profile.models", models, "a non-empty list of model names or specs")
    specs = []
    for i, m in enumerate(models):
        spec = {"arch": m} if isinstance(m, str) else m
        validate_spec(spec, p["image_size"], f"profile.models[{i}]", image_size_key="profile.image_size")
        family = family_of(spec["arch"])
        if p["checkpointing"] and not family.checkpointing:
            raise ParamError("profile.checkpointing", True, f"false while profile.models has a {family.label}")
        specs.append(spec)
    p["specs"] = specs
    return p


def model_key(spec: dict) -> str:
    return str(spec.get("name") or spec["arch"])


def run(p: dict, local: devices.Device, calib: dict) -> tuple[dict, list[dict], list[dict]]:
    """The table for validated `p`. `local` is this machine's profile (measured peak and
    bandwidth) and `calib` a small ViT's measured training speed here
    (`vitpipe.hardware.probe.calibrate_mfu`): measuring is the caller's job, not the model's;
    the time model's prediction for the same run stands beside it."""
    predicted = local_prediction(local, calib)
    metrics = {
        "local_img_per_s": round(calib["img_per_s"], 2),
        "local_predicted_img_per_s": round(predicted, 2),
        "local_prediction_error": round(predicted / calib["img_per_s"] - 1, 3),
        "local_peak_gflops": round(local.peak("fp32") / 1e9, 1),
        "local_bandwidth_gbs": round(local.bandwidth / 1e9, 1),
    }
    table1 = {r["model"]: r for r in reference.reference_table(p["image_size"], p["num_classes"])}
    profiles = [devices.get_device(n) for n in devices.DEVICES] + [local]
    rows, device_rows = [], []
    for spec in p["specs"]:
        key = model_key(spec)
        cfg = model_config(spec, p["num_classes"], p["image_size"])
        common = dict(
            precision=p["precision"],
            optimizer=p["optimizer"],
            attention=p["attention"],
            checkpointing=p["checkpointing"],
            steps=p["schedule_steps"],
        )
        target = local if p["device"] in devices.LOCAL else devices.get_device(p["device"])
        e = compute.estimate(cfg, p["batch_size"], target, **common)
        seed = reference.seed_params(cfg)
        ref = table1.get(spec["arch"], {})
        ref_mem = reference.MEMORY.get(spec["arch"], {})
        row = {
            "model": key,
            "name": describe(spec, p["image_size"]),
            "device": e["device"],
            "image_size": p["image_size"],
            "batch": p["batch_size"],
            **{k: e[k] for k in e if k.startswith("params")},
            "seed_formula_params": seed["total"],
            "seed_formula_embed": seed["embed"],
            "seed_formula_blocks": seed["blocks"],
            "seed_formula_head": seed["head"],
            "seed_formula_error": seed["total"] / e["params"] - 1,
            "ref_table_total_m": ref.get("ref_total_m"),
            "ref_table_calculated_m": ref.get("ref_calculated_m"),
            "forward_gflops": e["forward_flops"] / 1e9,
            "train_gflops": e["train_flops"] / 1e9,
            "activation_mb_per_image": e["activation_bytes"] / 1e6,
            "weights_gib": e["weights_bytes"] / GiB,
            "grads_gib": e["grads_bytes"] / GiB,
            "optimizer_gib": e["optimizer_bytes"] / GiB,
            "autocast_weights_gib": e["autocast_weights_bytes"] / GiB,
            "activations_gib": e["activations_bytes"] / GiB,
            "transient_gib": e["transient_bytes"] / GiB,
            "peak_gib": e["peak_bytes"] / GiB,
            "required_gib": e["required_bytes"] / GiB,
            "capacity_gib": e["capacity_bytes"] / GiB,
            "fits": e["fits"],
            "micro_batch": e["micro_batch"],
            "accum_steps": e["accum_steps"],
            "headroom_gib": e["headroom_bytes"] / GiB,
            "img_per_s": e["img_per_s"],
            "infer_img_per_s": e["infer_img_per_s"],
            **{f"time_{k}": round(v, 4) for k, v in e["time_split"].items()},
            "mfu": e["mfu"],
            "mfu_basis": e["mfu_basis"],
            "mfu_source": e["mfu_note"],
            "eta_h": e["eta_s"] / 3600,
            "ref_memory_gb": ref_mem.get("used_gb") or ref_mem.get("needed_gb"),
            "ref_fits": ref_mem.get("fits"),
        }
        rows.append(row)
        metrics.update(
            {
                f"{key}.params": e["params"],
                f"{key}.forward_gflops": round(row["forward_gflops"], 3),
                f"{key}.train_gflops": round(row["train_gflops"], 3),
                f"{key}.activation_mb": round(row["activation_mb_per_image"], 3),
                f"{key}.peak_gib": round(row["peak_gib"], 3),
                f"{key}.fits": e["fits"],
                f"{key}.micro_batch": e["micro_batch"],
                f"{key}.accum_steps": e["accum_steps"],
                f"{key}.img_per_s": round(e["img_per_s"], 2),
                f"{key}.eta_h": round(row["eta_h"], 2),
            }
        )
        for dev in profiles:
            d = compute.estimate(cfg, p["batch_size"], dev, **common)
            device_rows.append(
                {
                    "model": key,
                    "device": dev.name,
                    "device_label": dev.label,
                    "capacity_gib": d["capacity_bytes"] / GiB,
                    "peak_gib": d["peak_bytes"] / GiB,
                    "required_gib": d["required_bytes"] / GiB,
                    "fits": d["fits"],
                    "micro_batch": d["micro_batch"],
                    "accum_steps": d["accum_steps"],
                    "headroom_gib": d["headroom_bytes"] / GiB,
                    "infer_img_per_s": d["infer_img_per_s"],
                    "mfu": d["mfu"],
                    "mfu_basis": d["mfu_basis"],
                    "mfu_source": d["mfu_note"],
                    "img_per_s": d["img_per_s"],
                    "eta_h": d["eta_s"] / 3600,
                }
            )
    return metrics, rows, device_rows


def local_prediction(local: devices.Device, calib: dict) -> float:
    """The time model's img/s for the run `calib` measured on this machine (fp32, AdamW)."""
    from vitpipe.costmodel import steptime
    from vitpipe.models import model_config

    cfg = model_config(calib["spec"], calib["num_classes"], calib["image_size"])
    return steptime.step_time(cfg, calib["batch"], local, "fp32", "sdpa", "adamw")["img_per_s"]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # ViT and ResNet components differ
    w = csv.DictWriter(buf, fieldnames=fields, restval="", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()
