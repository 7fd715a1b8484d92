"""One step's process: dispatch, the Recorder's final status, and the probe of the machine."""

from __future__ import annotations

import importlib
import os
import platform
import traceback
from pathlib import Path

from gpu_proof.common import GIB, MIB, MODES, Ctx, Recorder, Skipped


def child_main(args) -> int:
    rec = Recorder(Path(args.result))
    ctx = Ctx(dry=args.cpu_dry_run, work=Path(args.work), logs=Path(args.logs), cfg={}, limit=args.limit or 60.0)
    ctx.cfg = MODES[ctx.mode].get(args.child, {})
    fn = probe if args.child == "probe" else importlib.import_module(f"gpu_proof.step_{args.child}").run
    try:
        fn(rec, ctx)
    except Skipped as e:
        rec.data["status"], rec.data["reason"] = "skipped", str(e)
    except BaseException as e:  # noqa: BLE001 — recorded, the orchestrator goes on
        traceback.print_exc()
        rec.data["status"] = "failed"
        rec.data["reason"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
    else:
        bad = [c["name"] for c in rec.data["checks"] if not c["ok"]]
        rec.data["status"] = "failed" if bad else "passed"
        rec.data["reason"] = ("failed checks: " + "; ".join(bad)) if bad else ""
    rec.data["running"] = ""
    rec.save()
    return 0


def probe(rec: Recorder, ctx: Ctx):
    import numpy
    import timm
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
    }
    rec.set(**info)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu_name=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / GIB, 2),
            gpu_count=torch.cuda.device_count(),
        )
        rec.set(**info)
        info["environment"] = environment(torch.device("cuda", 0))
    rec.set(**info)


def environment(dev) -> dict:
    """What decides the numbers besides the code: attention kernel, TF32, clocks, power, and
    the CUDA context against the planner's allowance for it."""
    import torch

    env = {
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_version": torch.backends.cudnn.version(),
    }
    torch.zeros(1, device=dev)  # the context exists now; nothing else is allocated
    free, total = torch.cuda.mem_get_info(dev)
    env["cuda_context_mib"] = round((total - free - torch.cuda.memory_reserved(dev)) / MIB, 1)
    try:
        from gpu_proof.common import profile_of

        env["planner_reserve_mib"] = round(profile_of(dev).reserve_bytes / MIB, 1)
    except Exception as e:  # noqa: BLE001 — recorded, not fatal
        env["planner_reserve_mib"] = f"unknown ({type(e).__name__})"
    env["sdpa_backend"] = sdpa_backend(dev)
    env.update(nvml(dev))
    return env


def sdpa_backend(dev) -> str:
    """The kernel scaled_dot_product_attention runs for ViT-B/16's shapes in bf16, by name."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    try:
        q = torch.randn(8, 12, 197, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, q, q).sum().backward()
            torch.cuda.synchronize(dev)
        names = " ".join(e.name for e in prof.events()).lower()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__}: {str(e)[:80]})"
    for key, label in (
        ("flash", "flash"),
        ("cudnn", "cudnn"),
        ("fmha", "efficient (mem-efficient fmha)"),
        ("efficient", "efficient"),
        ("bmm", "math (bmm + softmax)"),
        ("gemm", "math (gemm + softmax)"),
    ):
        if key in names:
            return label
    return "unknown"


def nvml(dev) -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(dev.index or 0)
        out = {
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
            "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
            "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        }
        try:
            out["clock_throttle_reasons"] = pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(h)
        except Exception:  # noqa: BLE001 — newer drivers renamed it
            pass
        pynvml.nvmlShutdown()
        return out
    except Exception as e:  # noqa: BLE001
        return {"nvml": f"unavailable ({type(e).__name__})"}
