"""What the hardware is doing while training: memory, GPU utilisation and power.

A daemon thread samples the process RSS once a second and, when this process trains on an
NVIDIA GPU, NVML (nvidia-ml-py's `pynvml`): utilisation, memory used/total and power of
that GPU. Without NVML (no driver, no GPU, a CPU run) only the RSS is sampled: fewer
summary keys, never an error or a warning. Nothing here raises into the training loop.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch


def _nvml_handle(device: torch.device):
    """(pynvml, handle of `device`) or (None, None). The handle is looked up by UUID because
    CUDA and NVML number GPUs differently under CUDA_VISIBLE_DEVICES."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: CPU fallback
        return None, None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        return pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())
    except Exception:
        pass
    try:
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:
        return None, None


class Sampler:
    def __init__(self, device: torch.device, interval_s: float = 1.0):
        self.device, self.interval_s = device, interval_s
        self.process = psutil.Process()
        self.nvml, self.handle = _nvml_handle(device) if device.type == "cuda" else (None, None)
        self.latest: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vitpipe-telemetry")

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)
        if self.nvml is not None:
            try:
                self.nvml.nvmlShutdown()
            except Exception:
                pass

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> dict[str, float]:
        s = {"rss_mb": self.process.memory_info().rss / 2**20}
        if self.handle is not None:
            nv, h = self.nvml, self.handle
            # one query at a time: a GPU without power readout still reports the rest
            for key, read in (
                ("gpu_util_pct", lambda: float(nv.nvmlDeviceGetUtilizationRates(h).gpu)),
                ("gpu_mem_used_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20),
                ("gpu_mem_total_mb", lambda: nv.nvmlDeviceGetMemoryInfo(h).total / 2**20),
                ("gpu_power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
            ):
                try:
                    s[key] = read()
                except Exception:
                    pass
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, v), v)
            self._sum[k] = self._sum.get(k, 0.0) + v
            self._n[k] = self._n.get(k, 0) + 1
        self.latest = s  # one reference swap: the training thread always reads a whole sample
        return s

    def step_memory_mb(self) -> float:
        """The memory_mb column of the step log: CUDA allocator peak on GPU, RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.latest.get("rss_mb", 0.0)

    def live(self) -> dict[str, str]:
        """A few fields for the progress bar: what `nvidia-smi` would show, in the bar."""
        s = self.latest
        out = {"mem_mb": f"{self.step_memory_mb():.0f}"}
        if "gpu_util_pct" in s:
            out["gpu"] = f"{s['gpu_util_pct']:.0f}%"
        if "gpu_power_w" in s:
            out["W"] = f"{s['gpu_power_w']:.0f}"
        return out

    def summary(self) -> dict:
        """Flat metrics for the stage's JSON (this process's device; rank 0 under DDP)."""
        out = {"peak_rss_mb": round(self.peak.get("rss_mb", 0.0), 1)}
        if self.device.type == "cuda":
            out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            out["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(self.device) / 2**20, 1)
        if "gpu_util_pct" in self._n:
            out["mean_gpu_util_pct"] = round(self._sum["gpu_util_pct"] / self._n["gpu_util_pct"], 1)
        if "gpu_mem_used_mb" in self.peak:
            out["peak_gpu_mem_used_mb"] = round(self.peak["gpu_mem_used_mb"], 1)
        if "gpu_mem_total_mb" in self.peak:
            out["gpu_mem_total_mb"] = round(self.peak["gpu_mem_total_mb"], 1)
        if "gpu_power_w" in self._n:
            out["mean_gpu_power_w"] = round(self._sum["gpu_power_w"] / self._n["gpu_power_w"], 1)
            out["peak_gpu_power_w"] = round(self.peak["gpu_power_w"], 1)
        return out


def now() -> float:
    return time.perf_counter()
