"""What the hardware is doing while training: memory, GPU utilisation and power.

A daemon thread samples NVML (through nvidia-ml-py's `pynvml`) once a second when an NVIDIA
GPU is present; on any other machine it samples the process RSS only. Nothing here ever
raises into the training loop: no NVML means fewer columns, not an error or a warning.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch


def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no driver, no GPU, no library: CPU fallback
        return None, None


class Sampler:
    def __init__(self, device: torch.device, interval_s: float = 1.0):
        self.device, self.interval_s = device, interval_s
        self.process = psutil.Process()
        index = (device.index or 0) if device.type == "cuda" else None
        self.nvml, self.handle = _nvml_handle(index) if index is not None else (None, None)
        self.latest: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self._util_sum, self._util_n = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vitpipe-telemetry")

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2 * self.interval_s)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> dict[str, float]:
        s = {"rss_mb": self.process.memory_info().rss / 2**20}
        if self.handle is not None:
            try:
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
                mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
                s["gpu_util_pct"] = float(util.gpu)
                s["gpu_mem_used_mb"] = mem.used / 2**20
                s["gpu_mem_total_mb"] = mem.total / 2**20
                s["gpu_power_w"] = self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
                self._util_sum += s["gpu_util_pct"]
                self._util_n += 1
            except Exception:
                pass
        self.latest = s
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, v), v)
        return s

    def step_memory_mb(self) -> float:
        """The memory column of the step log: CUDA allocator peak on GPU, RSS on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.latest.get("rss_mb", 0.0)

    def summary(self) -> dict[str, float]:
        out = {"peak_rss_mb": round(self.peak.get("rss_mb", 0.0), 1)}
        if self.device.type == "cuda":
            out["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if self._util_n:
            out["mean_gpu_util_pct"] = round(self._util_sum / self._util_n, 1)
            out["peak_gpu_mem_used_mb"] = round(self.peak["gpu_mem_used_mb"], 1)
            out["peak_gpu_power_w"] = round(self.peak["gpu_power_w"], 1)
        return out


def now() -> float:
    return time.perf_counter()
