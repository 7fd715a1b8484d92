"""Predicted vs measured for the compute model, on whatever machine this runs:

1. activation bytes vs what autograd saves (CPU, saved_tensors_hooks, each storage once);
2. on an NVIDIA GPU: peak vs torch.cuda.max_memory_allocated for ViT-B/32, B/16, B/8;
3. img/s: calibrate the MFU on one small ViT, predict other small ViTs, measure them.

    python benchmarks/compute_memory.py          # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitpipe.costmodel import compute  # noqa: E402
from vitpipe.hardware import probe  # noqa: E402
from vitpipe.models import build_model, model_config  # noqa: E402

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  " + "  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def bench_saved():
    cases = [
        ({"arch": "vit", "patch": 4, "dim": 192, "depth": 4, "heads": 3, "mlp_ratio": 4.0}, 32, 8),
        ({"arch": "vit", "patch": 8, "dim": 256, "depth": 2, "heads": 4, "mlp_ratio": 4.0, "pool": "avg"}, 64, 4),
        ({"arch": "resnet18"}, 64, 4),
        ({"arch": "resnet50"}, 64, 2),
        ({"arch": "convnext_atto"}, 64, 4),
        ({"arch": "convnext_tiny"}, 64, 2),
    ]
    rows = []
    for spec, size, batch in cases:
        torch.manual_seed(0)
        model = build_model(spec, 10, size).train()
        cfg = model_config(spec, 10, size)
        vit = compute.family_of_config(cfg).attention
        for precision in ("fp32", "bf16"):
            for attention, ckpt in (("sdpa", False), ("eager", False), ("sdpa", True)) if vit else (("sdpa", False),):
                if vit:
                    model.set_grad_checkpointing(ckpt)
                    for b in model.blocks:
                        b.attn.fused_attn = attention == "sdpa"
                got = compute.measure_saved_bytes(model, torch.randn(batch, 3, size, size), precision)
                want = compute.step_saved_total(cfg, batch, precision, attention, ckpt, device_type="cpu")
                rows.append(
                    (
                        spec["arch"] if spec["arch"] != "vit" else f"vit d{spec['dim']}/{spec['patch']}",
                        size,
                        batch,
                        precision,
                        (attention + (" ckpt" if ckpt else "")) if vit else "-",
                        want,
                        got,
                        f"{want / got:.4f}",
                    )
                )
    table(
        "saved tensors (bytes) on CPU", ("model", "px", "batch", "prec", "attn", "predicted", "measured", "ratio"), rows
    )


def bench_cuda():
    if not torch.cuda.is_available():
        print("\nno CUDA GPU: skipped peak vs torch.cuda.max_memory_allocated")
        return
    rows = []
    for arch, batch in (("vit_b32", 128), ("vit_b16", 32), ("vit_b8", 8)):
        for precision in ("fp32", "bf16"):
            spec = {"arch": arch}
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            model = build_model(spec, 100, 224).cuda().train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            y = torch.randint(0, 100, (batch,), device="cuda")
            half = HALF.get(precision)
            for i in range(2):
                if i == 1:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=half or torch.bfloat16, enabled=half is not None):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
            got = torch.cuda.max_memory_allocated() - base
            want = compute.memory(model_config(spec, 100, 224), batch, precision)["peak"]
            rows.append((arch, batch, precision, f"{want / 2**30:.3f}", f"{got / 2**30:.3f}", f"{want / got:.3f}"))
            del model, opt, x, y, loss
    table(
        f"peak GiB on {torch.cuda.get_device_name(0)}",
        ("model", "batch", "prec", "predicted", "max_allocated", "ratio"),
        rows,
    )


def bench_time():
    calib = probe.calibrate_mfu()
    print(
        f"\ncalibrated on {calib['spec']['dim']}-dim ViT: MFU {calib['mfu']:.3f} "
        f"({calib['img_per_s']:.1f} img/s, matmul peak {calib['peak_flops'] / 1e9:.0f} GFLOP/s)"
    )
    rows = []
    for spec, size, batch in (
        ({"arch": "vit", "patch": 4, "dim": 256, "depth": 6, "heads": 4, "mlp_ratio": 4.0}, 32, 32),
        ({"arch": "vit", "patch": 8, "dim": 384, "depth": 4, "heads": 6, "mlp_ratio": 4.0}, 64, 32),
        ({"arch": "vit", "patch": 4, "dim": 128, "depth": 8, "heads": 4, "mlp_ratio": 2.0}, 32, 64),
    ):
        r = probe.calibrate_mfu(spec, image_size=size, batch=batch, steps=3, peak_flops=calib["peak_flops"])
        cfg = model_config(spec, 10, size)
        want = compute.throughput(compute.flops(cfg)["train"], probe.local_device(), "fp32", calib["mfu"])
        # local_device's peak is measured again; rescale to the calibration's peak
        want *= calib["peak_flops"] / probe.local_device().peak("fp32")
        rows.append(
            (
                f"vit d{spec['dim']} L{spec['depth']} /{spec['patch']}",
                size,
                batch,
                f"{want:.1f}",
                f"{r['img_per_s']:.1f}",
                f"{want / r['img_per_s']:.3f}",
            )
        )
    table(
        "training img/s on this machine (MFU calibrated once, then predicted)",
        ("model", "px", "batch", "predicted", "measured", "ratio"),
        rows,
    )


if __name__ == "__main__":
    t = time.perf_counter()
    bench_saved()
    bench_cuda()
    bench_time()
    print(f"\n({time.perf_counter() - t:.0f} s)")
