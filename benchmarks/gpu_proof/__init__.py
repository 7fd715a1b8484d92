"""One command that proves every GPU path of vitpipe on the first GPU that comes along, inside
a short lease: at most 8 minutes on an H100-class card, by its own budget, at most 8 files brought back.

    python3 benchmarks/gpu_proof --out gpu_proof               # on an NVIDIA GPU: <= 480 s
    python3 benchmarks/gpu_proof --out gpu_proof --cpu-dry-run # the same harness on CPU, tiny models

On a lent GPU machine (its own python3, torch and timm; no DVC, no install), from the
checkout, with a wall-clock stop of its own around the harness's budget:

    timeout -s INT 570 python3 benchmarks/gpu_proof --out "$OUT/gpu_proof"

(SIGINT at 570 s, inside a 600 s call: the harness kills its steps and still writes its four
files). Work files go to /dev/shm where it has 8 GiB free.

Needs only what a stock PyTorch image has (torch, timm, numpy, pyyaml, pytest; nvidia-ml-py
if present): no DVC, no network, no install; it finds vitpipe in the checkout. `--out`
receives gpu_proof.json (every number, rewritten before and after every step),
gpu_proof.md (the summary), console.log and logs.tar.gz (every step's log). Each step runs
in its own process group under its own time limit, within --budget; killing the harness
(SIGTERM, SIGINT, SIGHUP) kills every step process, and a step process dies with it even
when it is SIGKILLed.

  orchestrator    the steps in order, limits, signals, the outputs
  child           one step's process: its Recorder; the probe (machine, SDPA backend, TF32, clocks, power)
  step_gpu_tests  1 the gpu-marked pytest tests (pytest_plugin records each as it finishes)
  step_throughput 2 bare loop vs fit, alternating repeats, compile off/on, MFU vs datasheet and measured peak
  step_memory     3 predicted vs measured peak through fit: B/32, B/16, B/8; precisions, optimizers, checkpointing
  step_oom        4 an overflowing micro-batch gets the plan message; then the plan runs
  step_telemetry  5 NVML utilisation, memory and power in the metrics
  step_resume     6 SIGKILL mid-run, resume, compare: fp32 deterministic bit-exact; bf16 within a tolerance
  step_sharded    7 FSDP on a process group of one: DCP checkpoint, SIGKILL, bit-exact resume; ResNet; compile per unit
  step_precision  8 bf16 only where native, auto, fp16 + grad scaler
  summary         the targets, the markdown
"""

from gpu_proof.common import STEPS, TARGETS  # noqa: F401
from gpu_proof.step_gpu_tests import collect_test_events  # noqa: F401
from gpu_proof.summary import markdown, summarise  # noqa: F401
