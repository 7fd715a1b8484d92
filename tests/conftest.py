import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# A params.yaml small enough that the whole pipeline runs in about a minute on 2 CPU cores.
MICRO = {
    "seeds": [0],
    "data": {
        "dataset": "digits",
        "archive": None,
        "url": None,
        "md5": "default",
        "image_size": 16,
        "split": {"train": 0.7, "val": 0.1, "test": 0.2},
        "train_fraction": 1.0,
        "seed": 0,
        "workers": 1,
    },
    "model": {"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0},
    "train": {
        "steps": 6,
        "batch_size": 16,
        "micro_batch": 8,
        "optimizer": "adamw",
        "lr": 0.001,
        "weight_decay": 0.05,
        "warmup_steps": 2,
        "label_smoothing": 0.1,
        "grad_clip": 1.0,
        "precision": "fp32",
        "checkpoint_every": 3,
        "eval_every": 3,
    },
    "pretrain": {
        "classes": 4,
        "images_per_class": 8,
        "steps": 4,
        "batch_size": 8,
        "micro_batch": 8,
        "lr": 0.001,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "eval_every": 2,
        "seed": 0,
    },
    "finetune": {
        "steps": 6,
        "batch_size": 16,
        "micro_batch": 8,
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 0.01,
        "weight_decay": 0.0,
        "warmup_steps": 2,
        "grad_clip": 1.0,
        "checkpoint_every": 3,
        "eval_every": 3,
    },
    "variants": {
        "vit_micro": {
            "arch": "vit",
            "patch": 4,
            "dim": 32,
            "depth": 1,
            "heads": 2,
            "mlp_ratio": 2.0,
            "source": "fractal",
            "weights": None,
        },
        "resnet18": {"arch": "resnet18", "source": "fractal", "weights": None},
    },
    "evaluate": {"batch_size": 64, "latency_batches": 1},
    "profile": {
        "models": ["vit_b16", "resnet18"],
        "image_size": 224,
        "batch_size": 512,
        "num_classes": 100,
        "device": "t4",
        "precision": "fp32",
        "optimizer": "adamw",
        "schedule_steps": 10000,
    },
}

# studies/: what the report stage depends on (the studies pipeline itself is not copied)
PROJECT_FILES = (
    "dvc.yaml",
    "stages",
    "vitpipe",
    "pyproject.toml",
    ".dvcignore",
    "weights",
    "studies/params.yaml",
    "studies/dvc.lock",
)


def copy_project_files(dest: Path, names=PROJECT_FILES) -> Path:
    """This checkout's `names` (files and folders, bytecode left out) copied into `dest`."""
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    return dest


def write_params(path: Path, doc: dict) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def run(cmd, cwd, check=True, timeout=600, env=None):
    """Run a command; on failure show its output in the assertion."""
    # dvc.yaml says `python`: make that this interpreter, venv activated or not.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    p = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PATH": path, **(env or {})}
    )
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture
def one_thread():
    """One torch thread: deterministic, and far faster than two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def checkpoint_store(tmp_path, monkeypatch):
    """Every test gets its own checkpoint store (never the user's ~/.cache) and no mirror."""
    store = tmp_path / "checkpoint-store"
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(store))
    monkeypatch.delenv("VITPIPE_CHECKPOINT_MIRROR", raising=False)
    monkeypatch.delenv("VITPIPE_CHECKPOINT_KEEP", raising=False)
    return store


def store_steps(store: Path) -> list[int]:
    """Every checkpoint step in a store (all runs), from the manifests."""
    import json

    steps = []
    for m in Path(store).glob("*/step-*.json"):
        try:
            steps.append(json.loads(m.read_text())["step"])
        except (OSError, ValueError, KeyError):
            pass  # being replaced right now
    return sorted(steps)


def make_project(repo: Path, params: dict = MICRO, env: dict | None = None) -> Path:
    """A fresh git + DVC repo at `repo` holding the project's code and `params`, committed."""
    repo.mkdir(parents=True)
    copy_project_files(repo)
    write_params(repo / "params.yaml", params)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.com"],
        ["git", "config", "user.name", "test"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        run(cmd, repo, env=env)
    return repo


@pytest.fixture
def project(tmp_path):
    """A fresh git + DVC repo holding the project's code and the micro params."""
    return make_project(tmp_path / "repo")


DVC = [sys.executable, "-m", "dvc"]


def copy_project(src: Path, dst: Path) -> Path:
    """A copy of a git + DVC repo (workspace, git, DVC cache and run-cache) that DVC treats as
    its own: DVC's per-repo temp state (.dvc/tmp) is left behind, so nothing points back."""

    def skip(folder, names):
        return ["tmp"] if Path(folder).name == ".dvc" else []

    shutil.copytree(src, dst, symlinks=True, ignore=skip)
    return dst


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory):
    """The micro project after its first `dvc repro` (results not committed) and that repro's
    stdout, built once per session: the end-to-end tests that start from a reproduced project
    copy it (`reproduced`) instead of each training everything again."""
    root = tmp_path_factory.mktemp("reproduced")
    env = {"VITPIPE_CHECKPOINT_DIR": str(root / "store")}
    repo = make_project(root / "repo", env=env)
    first = run(DVC + ["repro"], repo, env=env)
    return repo, first.stdout


@pytest.fixture
def reproduced(tmp_path, reproduced_template):
    """This test's own copy of the reproduced micro project."""
    return copy_project(reproduced_template[0], tmp_path / "repo")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """data/ of the micro params (digits at 16 px), prepared once per session."""
    from vitpipe.data.prepare import prepare
    from vitpipe.data.sources import get_source
    from vitpipe.params import data_params

    root = tmp_path_factory.mktemp("prepared")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = data_params(MICRO)
        get_source(cfg.dataset).fetch(cfg, cfg.raw_dir)
        prepare(cfg)
    finally:
        os.chdir(cwd)
    return root / "data"
