"""The telemetry sampler: RSS everywhere, NVML where there is a GPU, silence where there is not."""

import sys
import types
import warnings

import pytest
import torch

from vitpipe.hardware import telemetry
from vitpipe.hardware.telemetry import Sampler


def test_cpu_fallback_is_silent(capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Sampler(torch.device("cpu"), interval_s=0.01) as s:
            for _ in range(1000):
                if s._n.get("rss_mb", 0) >= 3:
                    break
                torch.ones(1000).sum()
                __import__("time").sleep(0.005)
        summary = s.summary()
    assert s._n["rss_mb"] >= 2  # the thread ran
    assert summary == {"peak_rss_mb": summary["peak_rss_mb"]} and summary["peak_rss_mb"] > 0
    assert s.step_memory_mb() > 0 and s.live() == {"mem_mb": s.live()["mem_mb"]}
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def fake_pynvml(power=True, init_fails=False):
    m = types.ModuleType("pynvml")
    calls = {"shutdown": 0}

    def init():
        if init_fails:
            raise RuntimeError("NVML Shared Library Not Found")

    def power_usage(h):
        if not power:
            raise RuntimeError("Not Supported")
        return 250_000  # mW

    m.nvmlInit = init
    m.nvmlShutdown = lambda: calls.__setitem__("shutdown", calls["shutdown"] + 1)
    m.nvmlDeviceGetHandleByUUID = lambda uuid: "handle"
    m.nvmlDeviceGetHandleByIndex = lambda i: "handle"
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=87)
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=3 * 2**30, total=16 * 2**30)
    m.nvmlDeviceGetPowerUsage = power_usage
    m.calls = calls
    return m


@pytest.fixture
def fake_cuda(monkeypatch):
    """A 'cuda' device whose allocator stats are faked: the NVML paths run on a CPU machine."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2.5 * 2**30)
    return torch.device("cuda", 0)


def test_nvml_sampling_and_summary(monkeypatch, fake_cuda):
    nv = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with Sampler(fake_cuda, interval_s=60) as s:
        s.sample()
    m = s.summary()
    assert m["mean_gpu_util_pct"] == 87.0 and m["peak_gpu_mem_used_mb"] == 3072.0
    assert m["gpu_mem_total_mb"] == 16384.0 and m["mean_gpu_power_w"] == 250.0 and m["peak_gpu_power_w"] == 250.0
    assert m["peak_cuda_allocated_mb"] == 2048.0 and m["peak_cuda_reserved_mb"] == 2560.0
    assert s.step_memory_mb() == 2048.0
    assert s.live() == {"mem_mb": "2048", "gpu": "87%", "W": "250"}
    assert nv.calls["shutdown"] == 1


def test_gpu_without_power_readout_still_reports_the_rest(monkeypatch, fake_cuda):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(power=False))
    with Sampler(fake_cuda, interval_s=60) as s:
        pass
    m = s.summary()
    assert "mean_gpu_util_pct" in m and "peak_gpu_power_w" not in m and "W" not in s.live()


def test_no_nvml_library_or_driver_falls_back_quietly(monkeypatch, fake_cuda, capfd):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_fails=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Sampler(fake_cuda, interval_s=60) as s:
            pass
    assert s.handle is None and "mean_gpu_util_pct" not in s.summary()
    assert capfd.readouterr() == ("", "")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed at all
    assert telemetry._nvml_handle(fake_cuda) == (None, None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_real_nvml():
    dev = torch.device("cuda", 0)
    with Sampler(dev, interval_s=0.05) as s:
        x = torch.randn(4096, 4096, device=dev)
        for _ in range(50):
            x = x @ x / 64
        torch.cuda.synchronize()
    m = s.summary()
    assert m["gpu_mem_total_mb"] > 1000 and m["peak_gpu_mem_used_mb"] > 0 and "mean_gpu_util_pct" in m
