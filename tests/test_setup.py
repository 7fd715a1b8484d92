"""scripts/setup.sh keeps a torch that is new enough (Colab's, Kaggle's, a container's), stops
on one that is too old, and installs the pinned build on a Python without torch: the CPU build
on a machine without a GPU, a CUDA build on one with a GPU (nvidia-smi lists it; a fake
nvidia-smi stands in for it here).

Most cases run it with VITPIPE_SETUP_DRY_RUN=1: it decides and prints the pip commands it
would run, and runs none (no network, no minutes of installing). The slow test runs it for
real in a venv that already holds a torch."""

import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # each test runs scripts/setup.sh against made-up pythons

ROOT = Path(__file__).resolve().parents[1]
MIN_TORCH = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
PINNED = re.search(r"TORCH_VERSION:-([0-9.]+)", (ROOT / "scripts/setup.sh").read_text()).group(1)


def project(tmp_path, *extra) -> Path:
    """A checkout holding what setup.sh reads: scripts/setup.sh, pyproject.toml (+ extra)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/setup.sh", repo / "scripts/setup.sh")
    for name in ("pyproject.toml", *extra):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(src, repo / name)
    return repo


def make_venv(path: Path, with_pip=False) -> Path:
    venv.EnvBuilder(with_pip=with_pip).create(path)
    return path / "bin" / "python"


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(out)


def see_this_torch(python: Path) -> None:
    """Make the venv of `python` see this interpreter's packages, torch included (what a
    runtime with a preinstalled torch looks like)."""
    (site_packages(python) / "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def fake_torch(python: Path, version: str, cuda: str | None = "-") -> None:
    """A torch that says `version`; with `cuda` (None: a CPU build) it has torch.version as
    real builds do, without it only __version__."""
    pkg = site_packages(python) / "torch"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        f"__version__ = {version!r}\n" + ("from . import version\n" if cuda != "-" else "")
    )
    if cuda != "-":
        (pkg / "version.py").write_text(f"cuda = {cuda!r}\nhip = None\n")


def machine(tmp_path, gpu: bool) -> str:
    """PATH of a machine with (or without) an NVIDIA GPU: a fake nvidia-smi that lists one
    GPU, or one that fails as it does where the driver finds no card."""
    bin_dir = tmp_path / ("gpu-bin" if gpu else "cpu-bin")
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\necho 'GPU 0: Tesla T4 (UUID: GPU-0)'\n"
        if gpu
        else "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\nexit 9\n"
    )
    smi.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


# pip with no index of its own (an ordinary machine), or with one (this machine, a company mirror)
PLAIN_PIP = {"PIP_CONFIG_FILE": os.devnull}
LOCAL_INDEX = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "file:///srv/wheels/simple"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def setup(repo: Path, dry=True, **env) -> subprocess.CompletedProcess:
    """Run the checkout's setup.sh as a user would, outside any activated venv."""
    base = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "VIRTUAL_ENV",
            "PYTHON",
            "VITPIPE_NO_VENV",
            "VITPIPE_UPGRADE_TORCH",
            "VITPIPE_TORCH_INDEX",
            "VITPIPE_EXTRAS",
        )
        and not (env.get("PIP_CONFIG_FILE") and k.startswith("PIP_"))
    }  # that pip config only
    return subprocess.run(
        ["bash", str(repo / "scripts/setup.sh")],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env={**base, "VITPIPE_SETUP_DRY_RUN": "1" if dry else "0", **env},
    )


def test_keeps_the_torch_of_this_python_without_a_venv(tmp_path):
    """Colab: VITPIPE_NO_VENV=1 installs into the runtime's Python and keeps its torch."""
    repo = project(tmp_path)
    p = setup(repo, VITPIPE_NO_VENV="1", PYTHON=sys.executable)
    assert p.returncode == 0, p.stderr
    build = f"cuda{torch.version.cuda}" if torch.version.cuda else "cpu"
    assert (
        f"setup: keeping the installed torch {torch.__version__}, {build} build (vitpipe needs torch >= {MIN_TORCH})"
        in p.stdout
    )
    assert f"installing into {sys.executable}" in p.stdout
    assert "install torch==" not in p.stdout
    assert re.search(r"would run: .* -m pip install -e \.\[test\] -c \S+", p.stdout)  # pinned to the kept torch
    assert not (repo / ".venv").exists()


def test_keeps_a_torch_that_the_venv_already_holds(tmp_path):
    repo = project(tmp_path)
    python = make_venv(repo / ".venv")
    see_this_torch(python)
    p = setup(repo)
    assert p.returncode == 0, p.stderr
    assert f"setup: keeping the installed torch {torch.__version__}" in p.stdout
    assert "install torch==" not in p.stdout


@pytest.mark.parametrize("old", ["2.1.2+cu118", "1.13.1"])
def test_a_torch_older_than_the_minimum_stops_with_one_message(tmp_path, old):
    repo = project(tmp_path)
    python = make_venv(repo / ".venv")
    fake_torch(python, old)
    p = setup(repo)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"setup: error: torch {old} in ")
    assert f"older than vitpipe's minimum {MIN_TORCH}" in lines[0] and "VITPIPE_UPGRADE_TORCH=1" in lines[0]
    assert "would run" not in p.stdout


def test_an_old_torch_is_replaced_only_when_asked(tmp_path):
    repo = project(tmp_path)
    python = make_venv(repo / ".venv")
    fake_torch(python, "2.0.1")
    p = setup(repo, VITPIPE_UPGRADE_TORCH="1")
    assert p.returncode == 0, p.stderr
    assert f"replacing it by torch=={PINNED}" in p.stdout
    assert re.search(rf"install torch=={PINNED}(\+cpu)? torchvision==", p.stdout)  # +cpu: no GPU here


def test_a_python_without_torch_gets_the_pinned_build(tmp_path):
    """A clean clone (CI's .ci/run): a fresh .venv, no torch, the pinned install as before."""
    repo = project(tmp_path)
    p = setup(repo)
    assert (repo / ".venv/bin/python").exists()
    assert p.returncode == 0, p.stderr
    assert "no torch in this Python" in p.stdout
    install = [line for line in p.stdout.splitlines() if "would run" in line]
    assert re.search(rf"install torch=={PINNED}(\+cpu)? torchvision==", install[0])
    assert install[1].endswith("install -e .[test]")  # no constraint on a new torch


def test_a_new_enough_fake_torch_is_kept(tmp_path):
    """The version check reads torch.__version__ (the build a runtime really imports)."""
    repo = project(tmp_path)
    python = make_venv(repo / ".venv")
    fake_torch(python, f"{MIN_TORCH}.0+cu121")
    p = setup(repo)
    assert p.returncode == 0, p.stderr
    assert f"keeping the installed torch {MIN_TORCH}.0+cu121, unknown build" in p.stdout
    assert "install torch==" not in p.stdout


def torch_install(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if "would run" in line and "torch==" in line]
    assert len(lines) == 1, p.stdout
    return lines[0]


# the CPU index labels its Linux x86-64 wheels +cpu; setup pins the label there
CPU = "+cpu" if (platform.system(), platform.machine()) == ("Linux", "x86_64") else ""


def test_a_cpu_machine_gets_the_cpu_build(tmp_path):
    """No GPU and pip with no index of its own: PyTorch's CPU index, not PyPI's CUDA wheels;
    also where nvidia-smi exists but finds no card."""
    repo = project(tmp_path)
    for path in (os.environ["PATH"], machine(tmp_path, gpu=False)):
        p = setup(repo, PATH=path, **PLAIN_PIP)
        assert torch_install(p).endswith(
            f"install torch=={PINNED}{CPU} torchvision==0.29.1{CPU} --index-url {CPU_INDEX}"
        )
        assert f"the CPU build from {CPU_INDEX}: no GPU here" in p.stdout


def extra_index_pip(tmp_path) -> dict:
    """A pip config that adds indexes beside PyPI (this machine's kind: a local wheel house as
    extra-index-url and find-links) and replaces none."""
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nextra-index-url = file:///srv/wheels/simple\nfind-links = /srv/wheels/files\n")
    return {"PIP_CONFIG_FILE": str(conf)}


def test_a_cpu_machine_whose_pip_adds_indexes_gets_the_cpu_build(tmp_path):
    """Indexes pip adds beside PyPI are not a site's own wheel house: without a GPU the CPU
    build, pinned by its label so that an extra index's CUDA wheel of that version cannot win."""
    repo = project(tmp_path)
    p = setup(repo, PATH=machine(tmp_path, gpu=False), **extra_index_pip(tmp_path))
    assert torch_install(p).endswith(f"install torch=={PINNED}{CPU} torchvision==0.29.1{CPU} --index-url {CPU_INDEX}")
    assert f"the CPU build from {CPU_INDEX}: no GPU here" in p.stdout


FAKE_PYTHON = r"""#!/usr/bin/env bash
# A venv's python that installs nothing: it logs each call, fails `pip install` from PyPI's CPU
# index unless FAKE_CPU_INDEX=up, and reports the build the last install would have given.
echo "$*" >>"$FAKE_LOG"
here=$(dirname "$0")
case "$1 $2 $3" in
  "- "*) script=$(cat)
         case "$script" in *"vitpipe ready"*)
           if [ -e "$here/cpu-installed" ]; then echo "vitpipe ready: torch 2.14.1+cpu (CPU build), timm 1.0"
           else echo "vitpipe ready: torch 2.14.1+cu130 (CUDA 13.0 build), timm 1.0"; fi ;;
         esac ;;
  "-m pip config") printf '%s
' "$FAKE_PIP_CONFIG" ;;
  "-m pip install") case "$*" in
                      *whl/cpu*) [ "${FAKE_CPU_INDEX:-down}" = up ] || exit 1; touch "$here/cpu-installed" ;;
                      *torch==*) rm -f "$here/cpu-installed" ;;
                    esac ;;
esac
exit 0
"""


def fake_venv(repo: Path) -> Path:
    python = repo / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return repo / "pip.log"


@pytest.mark.parametrize("cpu_index", ["up", "down"])
def test_without_a_gpu_setup_ends_with_the_cpu_build_or_a_warning(tmp_path, cpu_index):
    """Not a dry run: a fake venv python stands in for pip. The pip config adds an index and
    there is no GPU. With PyTorch's CPU index reachable the CPU build is installed, no
    warning; where it is not (this machine: PyPI and a local wheel house only) the pinned
    version comes from pip's own indexes, and setup says twice that the build is not the
    machine's: when it falls back, and after the final check."""
    repo = project(tmp_path)
    log = fake_venv(repo)
    p = setup(
        repo,
        dry=False,
        PATH=machine(tmp_path, gpu=False),
        FAKE_LOG=str(log),
        FAKE_CPU_INDEX=cpu_index,
        FAKE_PIP_CONFIG="global.extra-index-url='file:///srv/wheels/simple'\n:env:.find-links='/srv/wheels'",
        **extra_index_pip(tmp_path),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    installs = [line for line in log.read_text().splitlines() if line.startswith("-m pip install -q torch")]
    assert installs[0] == f"-m pip install -q torch=={PINNED}{CPU} torchvision==0.29.1{CPU} --index-url {CPU_INDEX}"
    last = p.stdout.strip().splitlines()
    if cpu_index == "up":
        assert len(installs) == 1 and last[-1] == "vitpipe ready: torch 2.14.1+cpu (CPU build), timm 1.0"
        assert "warning" not in p.stdout
    else:
        assert installs[1] == f"-m pip install -q torch=={PINNED} torchvision==0.29.1"  # pip's own indexes
        assert f"setup: warning: could not install torch=={PINNED}{CPU} from {CPU_INDEX}" in p.stdout
        assert last[-2] == "vitpipe ready: torch 2.14.1+cu130 (CUDA 13.0 build), timm 1.0"
        assert last[-1].startswith("setup: warning: torch is a GPU build and this machine has no GPU")
        assert f"VITPIPE_TORCH_INDEX={CPU_INDEX}" in last[-1]


def test_a_gpu_machine_with_a_cpu_build_is_warned(tmp_path):
    """The CPU index asked for by name on a machine with a GPU: installed as asked, and said."""
    repo = project(tmp_path)
    log = fake_venv(repo)
    p = setup(
        repo,
        dry=False,
        PATH=machine(tmp_path, gpu=True),
        FAKE_LOG=str(log),
        FAKE_PIP_CONFIG="",
        FAKE_CPU_INDEX="up",
        VITPIPE_TORCH_INDEX=CPU_INDEX,
        **PLAIN_PIP,
    )
    assert p.returncode == 0, p.stderr
    assert (
        p.stdout.strip().splitlines()[-1].startswith("setup: warning: this machine has a GPU but torch is a CPU build")
    )


def test_extras_choose_what_is_installed_with_vitpipe(tmp_path):
    """The notebook installs the package alone (VITPIPE_EXTRAS=): no test tools in Colab's Python."""
    repo = project(tmp_path)
    runs = setup(repo, VITPIPE_EXTRAS="", **PLAIN_PIP).stdout.splitlines()
    assert [line for line in runs if "would run" in line][-1].endswith("-m pip install -e .")
    runs = setup(repo, VITPIPE_EXTRAS="gs", **PLAIN_PIP).stdout.splitlines()
    assert [line for line in runs if "would run" in line][-1].endswith("-m pip install -e .[gs]")


def test_a_cpu_machine_whose_pip_has_an_index_uses_it_and_says_so(tmp_path):
    """This machine: pip serves torch from a configured index. That index is used as it is,
    and setup does not claim a CPU build it did not choose; it names the variable that would."""
    repo = project(tmp_path)
    p = setup(repo, PATH=machine(tmp_path, gpu=False), **LOCAL_INDEX)
    assert torch_install(p).endswith(f"install torch=={PINNED} torchvision==0.29.1")
    assert "from the index pip is configured with (:env:.index-url='file:///srv/wheels/simple')" in p.stdout
    assert f"set VITPIPE_TORCH_INDEX={CPU_INDEX} for PyTorch's CPU build" in p.stdout
    assert "the CPU build" not in p.stdout


@pytest.mark.parametrize("gpu", [False, True])
def test_vitpipe_torch_index_chooses_the_wheel_index(tmp_path, gpu):
    repo = project(tmp_path)
    index = "https://download.pytorch.org/whl/cu126"
    p = setup(repo, PATH=machine(tmp_path, gpu), VITPIPE_TORCH_INDEX=index, **LOCAL_INDEX)
    assert torch_install(p).endswith(f"install torch=={PINNED} torchvision==0.29.1 --index-url {index}")
    assert f"from {index} (VITPIPE_TORCH_INDEX)" in p.stdout


def test_a_gpu_machine_gets_pypis_cuda_build(tmp_path):
    repo = project(tmp_path)
    p = setup(repo, PATH=machine(tmp_path, gpu=True), **PLAIN_PIP)
    assert torch_install(p).endswith(f"install torch=={PINNED} torchvision==0.29.1")
    assert "PyPI's Linux torch is a CUDA build): this machine has a GPU" in p.stdout


def test_a_gpu_machine_keeps_its_cuda_torch_and_replaces_a_cpu_one(tmp_path):
    repo = project(tmp_path)
    python = make_venv(repo / ".venv")
    fake_torch(python, f"{MIN_TORCH}.1+cu124", cuda="12.4")
    p = setup(repo, PATH=machine(tmp_path, gpu=True), **PLAIN_PIP)
    assert p.returncode == 0, p.stderr
    assert f"keeping the installed torch {MIN_TORCH}.1+cu124, cuda12.4 build" in p.stdout
    assert "install torch==" not in p.stdout

    shutil.rmtree(site_packages(python) / "torch")
    fake_torch(python, f"{MIN_TORCH}.1+cpu", cuda=None)
    p = setup(repo, PATH=machine(tmp_path, gpu=True), **PLAIN_PIP)
    assert torch_install(p).endswith(f"install --force-reinstall torch=={PINNED} torchvision==0.29.1")
    assert f"torch {MIN_TORCH}.1+cpu is a CPU build and this machine has a GPU: replacing it" in p.stdout
    assert "keeping" not in p.stdout
    # the same CPU torch on a machine without a GPU is kept
    p = setup(repo, PATH=machine(tmp_path, gpu=False), **PLAIN_PIP)
    assert f"keeping the installed torch {MIN_TORCH}.1+cpu, cpu build" in p.stdout and "install torch==" not in p.stdout


@pytest.mark.slow
def test_setup_for_real_keeps_the_preinstalled_torch(tmp_path):
    """Really installs vitpipe into a venv that already sees a torch: nothing replaces it,
    and the final check passes."""
    repo = project(tmp_path, "vitpipe")
    python = make_venv(repo / ".venv", with_pip=True)
    see_this_torch(python)
    p = setup(repo, dry=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"keeping the installed torch {torch.__version__}" in p.stdout
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"  # said from what torch reports
    assert f"vitpipe ready: torch {torch.__version__} ({build} build)" in p.stdout
    where = subprocess.run(
        [python, "-c", "import torch, vitpipe; print(torch.__file__); print(vitpipe.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    assert where[0] == torch.__file__  # the same torch, not a new download
    assert where[1].startswith(str(repo))  # vitpipe from this checkout
    assert not list(site_packages(python).glob("torch-*.dist-info"))


def test_the_pr_workflow_installs_the_cpu_build():
    """CI runners have no GPU: the workflow asks for PyTorch's CPU index by name."""
    import yaml

    workflow = yaml.safe_load((ROOT / ".github/workflows/pr.yml").read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"] if "scripts/setup.sh" in s.get("run", "")]
    assert steps and all(s.get("env", {}).get("VITPIPE_TORCH_INDEX") == CPU_INDEX for s in steps)
