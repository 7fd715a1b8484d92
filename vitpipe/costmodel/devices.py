"""Device profiles as data (`devices.yaml` beside this file: datasheet numbers only): memory,
dense matmul peak per precision as PyTorch runs it, memory bandwidth, SM count and L2 size.
A card that is not listed comes from the user's own YAML file with the same keys
(`load_device_file`). "This machine" (`local`, `auto`) is measured, not listed:
`vitpipe.hardware.probe` builds its profile. How fast a step runs on a profile is the time
model's business (`costmodel.steptime`); nothing here is fitted to a measurement."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vitpipe.errors import UserError

MiB, GiB, TFLOPS = 2**20, 2**30, 1e12
NATIVE_BF16 = (8, 0)  # compute capability of the first cards with bf16 tensor cores (Ampere)
TABLE = Path(__file__).with_name("devices.yaml")
PRECISION_KEYS = ("fp32", "tf32", "bf16", "fp16")
REQUIRED = {
    "name": "a short name (my-card)",
    "memory_gib": "GiB the card has (nvidia-smi total / 1024)",
    "peak_tflops": "a mapping {fp32: .., tf32: .., bf16: .., fp16: ..} of dense TFLOP/s",
    "memory_bandwidth_gbs": "GB/s of memory bandwidth",
    "sm_count": "streaming multiprocessors",
    "l2_mib": "MiB of L2 cache",
}
OPTIONAL = ("label", "capability", "reserve_mib", "notes", "aliases")
CUDA_RESERVE_MIB = 600  # CUDA context + cuBLAS/cuDNN handles, never available to tensors


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    memory_bytes: int  # what the allocator can hand out (nvidia-smi total)
    peak_flops: dict  # precision -> dense FLOP/s (no sparsity), as PyTorch runs it
    bandwidth: float = 0.0  # memory bytes/s
    sm_count: int = 1  # streaming multiprocessors (a CPU: cores)
    l2_bytes: int = 0
    reserve_bytes: int = 0  # never available to tensors: CUDA context, cuDNN/cuBLAS handles
    notes: str = ""
    measured: dict = field(default_factory=dict)
    capability: tuple | None = None  # CUDA compute capability (major, minor); None: a CPU

    def peak(self, precision: str) -> float:
        return self.peak_flops[precision]

    @property
    def kind(self) -> str:
        return "cpu" if self.capability is None else "cuda"

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor-core units: compute capability >= 8.0 (Ampere and later)."""
        return self.capability is not None and tuple(self.capability) >= NATIVE_BF16


def problems(entry: dict, where: str) -> list[str]:
    """Every way `entry` differs from the profile format, one line each (empty: valid)."""
    if not isinstance(entry, dict):
        return [f"{where}: a mapping of {', '.join(REQUIRED)}"]
    out = [f"{where}: missing {k}: {why}" for k, why in REQUIRED.items() if k not in entry]
    out += [
        f"{where}: unknown key {k!r}; allowed: {', '.join([*REQUIRED, *OPTIONAL])}"
        for k in entry
        if k not in REQUIRED and k not in OPTIONAL
    ]

    def positive(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

    for k in ("memory_gib", "memory_bandwidth_gbs", "sm_count", "l2_mib"):
        if k in entry and not positive(entry[k]):
            out.append(f"{where}: {k}: {entry[k]!r} is not a positive number ({REQUIRED[k]})")
    peaks = entry.get("peak_tflops")
    if "peak_tflops" in entry:
        if not isinstance(peaks, dict) or "fp32" not in peaks:
            out.append(f"{where}: peak_tflops: {REQUIRED['peak_tflops']} (fp32 at least)")
        else:
            out += [
                f"{where}: peak_tflops.{k}: {v!r} is not a positive number of TFLOP/s"
                for k, v in peaks.items()
                if k not in PRECISION_KEYS or not positive(v)
            ]
    cap = entry.get("capability")
    if cap is not None and not (isinstance(cap, list) and len(cap) == 2 and all(isinstance(c, int) for c in cap)):
        out.append(f"{where}: capability: {cap!r} is not [major, minor] (e.g. [8, 6])")
    return out


def from_entry(name: str, entry: dict) -> Device:
    """A validated YAML entry as a profile. A precision the card has no units for runs at its
    fp32 rate (emulated bf16, no tf32)."""
    peaks = {k: float(entry["peak_tflops"].get(k, entry["peak_tflops"]["fp32"])) * TFLOPS for k in PRECISION_KEYS}
    cap = entry.get("capability")
    return Device(
        name,
        str(entry.get("label") or name),
        int(entry["memory_gib"] * GiB),
        peaks,
        bandwidth=float(entry["memory_bandwidth_gbs"]) * 1e9,
        sm_count=int(entry["sm_count"]),
        l2_bytes=int(entry["l2_mib"] * MiB),
        reserve_bytes=int(entry.get("reserve_mib", CUDA_RESERVE_MIB) * MiB),
        notes=str(entry.get("notes", "")),
        capability=tuple(cap) if cap else (8, 0),
    )


def _load_table() -> dict[str, Device]:
    table = yaml.safe_load(TABLE.read_text())
    errors = [e for name, entry in table.items() for e in problems({"name": name, **entry}, f"{TABLE.name}:{name}")]
    if errors:
        raise UserError("; ".join(errors))
    return {name: from_entry(name, entry) for name, entry in table.items()}


DEVICES = _load_table()
ALIASES = {"v100": "v100-16", "a100": "a100-40", "h100": "h100-80", "3090": "rtx3090", "this": "local", "cpu": "local"}
LOCAL = ("local", "cpu", "this")


def device_names() -> list[str]:
    return [*DEVICES, "local", "auto", "FILE.yaml"]


def load_device_file(path: str | Path) -> Device:
    """A user's own card from a YAML file with the keys of devices.yaml (one entry, with
    `name`). Every problem is named, one line each, in one error."""
    path = Path(path)
    try:
        entry = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"--device {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"--device {path}: not YAML ({' '.join(str(e).split())[:120]})") from None
    errors = problems(entry, str(path))
    if errors:
        raise UserError("\n".join(errors) + f"\n(the format: {TABLE} lists every card the same way)")
    if entry.get("capability") is None:
        entry = {**entry, "capability": [8, 0]}
    return from_entry(str(entry["name"]), entry)


def get_device(name: str) -> Device:
    """A listed profile by name ('t4', 'a100-80', ...) or a YAML file (`*.yaml`). This machine
    ('local', 'auto') is measured by `vitpipe.hardware.probe.get_device`, which also takes
    every name here."""
    if str(name).endswith((".yaml", ".yml")):
        return load_device_file(name)
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DEVICES:
        raise UserError(
            f"unknown device {name!r}; allowed: {', '.join(device_names())} (aliases: {', '.join(ALIASES)})"
        )
    return DEVICES[key]


def known_profile(gpu_name: str, total_memory: int) -> Device | None:
    """The profile of a GPU that torch/NVML names `gpu_name` ("Tesla T4", "NVIDIA
    A100-SXM4-40GB", "NVIDIA GeForce RTX 3090"): its family by name, the size closest to its memory."""

    def family_word(d):
        return "3090" if d.name == "rtx3090" else d.name.split("-")[0]

    family = [
        d
        for d in DEVICES.values()
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(family_word(d))}(?![A-Za-z0-9])", gpu_name, re.IGNORECASE)
    ]
    if not family:
        return None
    return min(family, key=lambda d: abs(d.memory_bytes - total_memory))
