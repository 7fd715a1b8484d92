"""Two queued CPU experiments: `dvc queue start -j 2` against `-j 1`, with vitpipe's core
sharing on (the default) and off (VITPIPE_CORE_SHARE=0: each process takes every core).

In a temp git + DVC repo holding this project and a small config (digits at 16 px, a ViT
trained from scratch), it queues two experiments that differ only in the training seed
(so neither comes from the run-cache), starts the queue with N workers and times until both
finished. Each configuration gets fresh seeds. Prints seconds per configuration and the
ratio -j 1 / -j 2 (> 1: running both at once is faster).

    python benchmarks/queue_parallel.py            # about 3 minutes on 2 cores
    python benchmarks/queue_parallel.py --steps 600
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import MICRO, make_project  # noqa: E402  (the tests' micro config and project copy)

DVC = [sys.executable, "-m", "dvc"]


def sh(cmd, cwd, env):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout


def make_repo(root: Path, steps: int, env) -> Path:
    doc = yaml.safe_load(yaml.safe_dump(MICRO))
    doc["model"].update(dim=64, depth=2)
    doc["train"].update(steps=steps, checkpoint_every=100, eval_every=steps)
    repo = make_project(root / "repo", doc, env=env)
    sh(DVC + ["repro"], repo, env)  # everything but the queued train_scratch runs is then up to date
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "baseline"], repo, env)
    return repo


def queue_time(repo: Path, jobs: int, seeds, env) -> float:
    for seed in seeds:
        sh(DVC + ["exp", "run", "--queue", "-S", f"seeds=[{seed}]"], repo, env)
    t = time.perf_counter()
    sh(DVC + ["queue", "start", "-j", str(jobs)], repo, env)
    while True:
        status = sh(DVC + ["queue", "status"], repo, env)
        if not any(w in status for w in ("Queued", "Running")):
            break
        time.sleep(0.5)
    seconds = time.perf_counter() - t
    if "Failed" in status:
        raise SystemExit(f"a queued experiment failed:\n{status}")
    while "0 active, 0 idle" not in status:  # workers leave when the queue is empty
        time.sleep(0.5)
        status = sh(DVC + ["queue", "status"], repo, env)
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="training steps of each queued experiment")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            "VITPIPE_CHECKPOINT_DIR": str(Path(tmp) / "store"),
            "PYTHONWARNINGS": "ignore",
        }
        env.pop("OMP_NUM_THREADS", None)
        env.pop("VITPIPE_CHECKPOINT_MIRROR", None)
        repo = make_repo(Path(tmp), args.steps, env)
        print(f"{os.cpu_count()} cores; 2 queued experiments of {args.steps} train_scratch steps each", flush=True)
        results = {}
        seed = 100
        for share in ("1", "0"):
            for jobs in (1, 2):
                e = {**env, "VITPIPE_CORE_SHARE": share}
                results[(share, jobs)] = queue_time(repo, jobs, (seed, seed + 1), e)
                seed += 2
                print(
                    f"  core sharing {'on ' if share == '1' else 'off'}  -j {jobs}: {results[(share, jobs)]:6.1f} s",
                    flush=True,
                )
        on = results[("1", 1)] / results[("1", 2)]
        off = results[("0", 1)] / results[("0", 2)]
        print(f"-j 1 / -j 2: {on:.2f} with core sharing (> 1: -j 2 is faster), {off:.2f} without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
