"""This machine as the cost model sees it: which device torch has (`current_device`,
`local_device`), the matmul peak it really reaches, and the MFU it reaches on a small ViT
(`calibrate_mfu`). It builds `vitpipe.costmodel` profiles; the cost model never imports it."""

from __future__ import annotations

import os
import time
from dataclasses import replace

from vitpipe import precisions
from vitpipe.costmodel.compute import flops
from vitpipe.costmodel.devices import ALIASES, Device, MiB, known_profile
from vitpipe.costmodel.devices import get_device as profile_by_name


def get_device(name: str) -> Device:
    """A profile by name: a listed card ('t4', 'a100-80', ...), a YAML file of a card,
    'local' (this machine, measured) or 'auto' (this machine's GPU as its listed profile,
    see `current_device`)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in ("auto", "local"):
        return profile_by_name(name)
    return current_device() if key == "auto" else local_device()


def profile_of(device) -> Device:
    """The profile of the torch device a run trains on: a CUDA card's listed profile with the
    memory it really has (a MIG slice, a 40 vs 80 GB part), or a measured one."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return local_device()
    return current_device(device.index or 0)


_LOCAL_CACHE: dict = {}


def current_device(index: int = 0) -> Device:
    """`--device auto`: this machine's GPU `index` as torch sees it, with its real name,
    memory and compute capability, and the peaks and MFU of the known profile of its family
    (a T4, an A100 40 or 80 GB, ...). A GPU with no known profile gets measured peaks
    (`local_device`); no GPU at all gives the local CPU profile."""
    import torch

    if not torch.cuda.is_available():
        return local_device()
    props = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    known = known_profile(props.name, props.total_memory)
    if known is None:
        return replace(local_device(), capability=capability)
    return replace(
        known,
        label=f"{props.name} (this GPU)",
        memory_bytes=props.total_memory,
        capability=capability,
        notes=f"profile {known.name}; {known.notes}".rstrip("; "),
    )


def local_device() -> Device:
    """This machine as a profile: a CUDA GPU if there is one, else the CPU with its available
    RAM. Peaks are measured (a matmul benchmark), so they are what torch really gets here."""
    if "dev" in _LOCAL_CACHE:
        return _LOCAL_CACHE["dev"]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fp32 = measure_matmul_flops("cuda", torch.float32)
        half = measure_matmul_flops("cuda", torch.bfloat16)
        bandwidth = measure_bandwidth("cuda")
        dev = Device(
            "local",
            f"{props.name} (this machine)",
            props.total_memory,
            {p.peak: half if p.autocast else fp32 for p in precisions.TABLE},
            bandwidth=bandwidth,
            sm_count=props.multi_processor_count,
            reserve_bytes=600 * MiB,
            measured={"matmul_fp32": fp32, "matmul_bf16": half, "bandwidth": bandwidth},
            capability=tuple(torch.cuda.get_device_capability(0)),
        )
    else:
        import psutil

        fp32 = measure_matmul_flops("cpu", torch.float32)
        bandwidth = measure_bandwidth("cpu")
        # no autocast speed-up is assumed on a CPU without bf16 matrix units; its cores are the SMs
        dev = Device(
            "local",
            f"CPU x{torch.get_num_threads()} threads (this machine)",
            psutil.virtual_memory().available,
            {p.peak: fp32 for p in precisions.TABLE},
            bandwidth=bandwidth,
            sm_count=torch.get_num_threads(),
            reserve_bytes=512 * MiB,
            measured={"matmul_fp32": fp32, "bandwidth": bandwidth},
        )
    _LOCAL_CACHE["dev"] = dev
    return dev


def measure_matmul_flops(device: str = "cpu", dtype=None, n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n matmul over ~`seconds`: the practical peak on this machine."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm = time.perf_counter()
    while time.perf_counter() - warm < seconds / 3:  # threads and clocks spin up first
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def measure_bandwidth(device: str = "cpu", mib: int = 64, seconds: float = 0.3) -> float:
    """Best bytes/s of a large tensor copy (read + write) over ~`seconds`: the memory
    bandwidth elementwise work gets here (the buffers are far bigger than the caches)."""
    import torch

    n = mib * MiB // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    dst.copy_(src)
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * 4 * n / best


# A small ViT that trains in ~0.1-0.5 s per step on two CPU cores
CALIBRATION_SPEC = {"arch": "vit", "patch": 4, "dim": 192, "depth": 4, "heads": 3, "mlp_ratio": 4.0}


def calibrate_mfu(
    spec: dict | None = None,
    image_size: int = 32,
    batch: int = 32,
    steps: int = 3,
    num_classes: int = 10,
    device: str | None = None,
    peak_flops: float | None = None,
    budget_s: float = 2.0,
) -> dict:
    """Train `spec` for a few steps here and compare the FLOP/s it achieved (analytic train
    FLOPs x img/s) with the measured matmul peak: the MFU this machine reaches on a ViT.
    Times up to `steps` steps, fewer if they take over `budget_s` (a busy machine).
    Returns {mfu, img_per_s, achieved_flops, peak_flops, ...}."""
    import torch

    from vitpipe.models import build_model, model_config

    spec = spec or CALIBRATION_SPEC
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(spec, num_classes, image_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # first step allocates optimizer state and warms kernels
    sync()
    t, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - t < budget_s):
        step()
        sync()
        done += 1
    seconds = time.perf_counter() - t
    img_per_s = done * batch / seconds
    cfg = model_config(spec, num_classes, image_size)
    train_flops = flops(cfg)["train"]
    achieved = img_per_s * train_flops
    peak = peak_flops or measure_matmul_flops(device, torch.float32)
    return {
        "mfu": achieved / peak,
        "img_per_s": img_per_s,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "train_flops_per_image": train_flops,
        "batch": batch,
        "steps": done,
        "seconds": seconds,
        "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "spec": dict(spec),
        "image_size": image_size,
        "num_classes": num_classes,
    }


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
