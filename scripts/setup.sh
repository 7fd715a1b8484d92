#!/usr/bin/env bash
# Set up vitpipe in ./.venv: torch first, then the package and its test dependencies.
#
# torch: a Python that already has torch >= vitpipe's minimum (pyproject.toml: torch>=X) keeps
# it, whatever its build (the CUDA torch of Colab, Kaggle, an NGC container, a workstation), and
# says so; pip is told not to replace it. The one exception is a CPU-only build on a machine
# with an NVIDIA GPU (nvidia-smi lists one): it is replaced by the pinned build from the GPU
# index (below). An older torch stops setup with one message. A Python without torch (a fresh
# .venv, CI) gets the pinned build, from the index that gives this machine the right build:
#
#   VITPIPE_TORCH_INDEX set    that index (--index-url), e.g. https://download.pytorch.org/whl/cpu
#                              for the CPU build or .../whl/cu126 for a CUDA 12.6 build
#   a GPU (nvidia-smi -L)      pip's own index: PyPI's Linux torch is a CUDA build
#   no GPU, pip's index-url    that index, as configured (pip config list: a replaced index-url):
#   replaced                   a site that serves its own wheels
#   no GPU, otherwise          the CPU build, torch==X+cpu from https://download.pytorch.org/whl/cpu
#                              (a plain `pip install torch` on Linux pulls several GB of CUDA wheels),
#                              whatever indexes pip adds (extra-index-url, find-links: they sit
#                              beside PyPI, whose torch is the CUDA build). Where that index cannot
#                              be reached (a machine with PyPI or a local wheel house only), pip's
#                              own indexes serve the pinned version instead, and setup says so.
#
# The last line says which build was installed (CPU or CUDA), read from torch itself; a warning
# line follows whenever the build and the machine disagree (a CPU build with a GPU, a CUDA build
# without one).
#
# Environment:
#   PYTHON=python3            the interpreter that makes .venv (or that is installed into)
#   VITPIPE_NO_VENV=1         install into $PYTHON itself, no .venv (Colab, Kaggle, containers)
#   VITPIPE_UPGRADE_TORCH=1   replace a torch older than the minimum by the pinned one
#   VITPIPE_TORCH_INDEX=URL   the wheel index torch and torchvision come from (see above)
#   TORCH_VERSION, TORCHVISION_VERSION   the pinned build (2.14.1, 0.29.1)
#   VITPIPE_EXTRAS=test       vitpipe's extras to install (pyproject.toml); empty: the package
#                             alone, what a run needs (the notebook), without the test tools
#   VITPIPE_SETUP_DRY_RUN=1   decide and print the pip commands, run none (tests/test_setup.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${VITPIPE_SETUP_DRY_RUN:-0}
TORCH_PIN="torch==${TORCH_VERSION:-2.14.1}"
TORCHVISION_PIN="torchvision==${TORCHVISION_VERSION:-0.29.1}"

pip_install() {   # pip_install ARGS...: run it, or show it in a dry run
  if [ "$DRY" = 1 ]; then echo "setup: would run: $py -m pip install $*"; else "$py" -m pip install -q "$@"; fi
}

if [ "${VITPIPE_NO_VENV:-0}" = 1 ]; then
  py=$PY
  echo "setup: installing into $("$py" -c 'import sys; print(sys.executable)') (VITPIPE_NO_VENV=1, no .venv)"
else
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  py=.venv/bin/python
  if [ "$DRY" != 1 ]; then "$py" -m pip install -q --upgrade pip >/dev/null; fi
fi

CPU_INDEX=https://download.pytorch.org/whl/cpu
# The CPU index labels its Linux x86-64 wheels +cpu: pinning the label keeps an extra index's
# CUDA wheel of the same version out. (Its wheels for other platforms carry no label.)
CPU_LABEL=
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then CPU_LABEL=+cpu; fi
# The minimum torch is the one pyproject.toml declares ("torch>=2.5").
MIN_TORCH=$(sed -n 's/^ *"torch>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
# "<torch.__version__> <pip's version, or -> <ok|old> <build>" of the torch this Python
# imports, or nothing when it has none. build: cuda<X.Y>, rocm<X.Y>, cpu, or unknown.
HAVE=$("$py" - "$MIN_TORCH" <<'EOF' 2>/dev/null || true
import re, sys
try:
    import torch
except Exception:
    sys.exit(0)
def key(v):
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])
v = str(torch.__version__)
try:   # the version pip knows it by (a wheel may say 2.5.1 where torch says 2.5.1+cu121)
    from importlib.metadata import version
    dist = version("torch")
except Exception:
    dist = "-"
built = getattr(torch, "version", None)
if getattr(built, "cuda", None):
    build = f"cuda{built.cuda}"
elif getattr(built, "hip", None):
    build = f"rocm{built.hip}"
elif built is not None or v.endswith("+cpu"):
    build = "cpu"
else:
    build = "unknown"
print(v, dist, "ok" if key(v) >= key(sys.argv[1]) else "old", build)
EOF
)

# A GPU: nvidia-smi is there and lists one (a driver without a card lists none and fails).
GPU=0
if command -v nvidia-smi >/dev/null 2>&1; then
  case "$(nvidia-smi -L 2>/dev/null || true)" in GPU*) GPU=1 ;; esac
fi

# Where the pinned torch comes from: TORCH_INDEX (pip arguments) and TORCH_FROM (words).
# CPU_BUILD=1: the CPU build from CPU_INDEX, with pip's own indexes as the fallback.
TORCH_INDEX=()
CPU_BUILD=0
if [ -n "${VITPIPE_TORCH_INDEX:-}" ]; then
  TORCH_INDEX=(--index-url "$VITPIPE_TORCH_INDEX")
  TORCH_FROM="from $VITPIPE_TORCH_INDEX (VITPIPE_TORCH_INDEX)"
elif [ "$GPU" = 1 ]; then
  TORCH_FROM="from pip's index (PyPI's Linux torch is a CUDA build): this machine has a GPU"
# only a replaced index-url is a site's own wheel house (`.index-url=`, not extra-index-url)
elif configured=$(grep -m 1 -E '[.]index-url=' <<<"$("$py" -m pip config list 2>/dev/null || true)"); then
  TORCH_FROM="from the index pip is configured with ($configured); no GPU here: set VITPIPE_TORCH_INDEX=$CPU_INDEX for PyTorch's CPU build"
else
  CPU_BUILD=1
  TORCH_INDEX=(--index-url "$CPU_INDEX")
  TORCH_PIN+=$CPU_LABEL
  TORCHVISION_PIN+=$CPU_LABEL
  TORCH_FROM="the CPU build from $CPU_INDEX: no GPU here (no nvidia-smi that lists one)"
fi

constraints=()
install_torch() {   # install_torch [PIP ARGS...]: the pinned torch + torchvision from TORCH_INDEX
  if pip_install "$@" "$TORCH_PIN" "$TORCHVISION_PIN" ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"}; then
    return 0
  elif [ "$CPU_BUILD" != 1 ]; then
    return 1
  fi
  # PyTorch's CPU index is out of reach (or lacks the pin): pip's own indexes serve the pinned
  # version, whichever build they hold; the final check says which it was
  echo "setup: warning: could not install $TORCH_PIN from $CPU_INDEX; installing ${TORCH_PIN%+cpu} from pip's own indexes instead (on Linux PyPI's is the CUDA build, several GB)"
  pip_install "$@" "${TORCH_PIN%+cpu}" "${TORCHVISION_PIN%+cpu}"
}
if [ -z "$HAVE" ]; then
  echo "setup: no torch in this Python: installing the pinned $TORCH_PIN, $TORCHVISION_PIN, $TORCH_FROM"
  install_torch
else
  read -r version dist verdict build <<<"$HAVE"
  if [ "$verdict" = ok ] && [ "$GPU" = 1 ] && [ "$build" = cpu ]; then
    echo "setup: torch $version is a CPU build and this machine has a GPU: replacing it by $TORCH_PIN, $TORCH_FROM"
    install_torch --force-reinstall
  elif [ "$verdict" = ok ]; then
    echo "setup: keeping the installed torch $version, $build build (vitpipe needs torch >= $MIN_TORCH)"
    if [ "$dist" != - ]; then
      # pip must not swap it for another build while resolving timm or torchvision
      cfile=$(mktemp)
      trap 'rm -f "$cfile"' EXIT
      echo "torch==$dist" >"$cfile"
      constraints=(-c "$cfile")
    fi
  elif [ "${VITPIPE_UPGRADE_TORCH:-0}" = 1 ]; then
    echo "setup: torch $version is older than vitpipe's minimum $MIN_TORCH: replacing it by $TORCH_PIN (VITPIPE_UPGRADE_TORCH=1), $TORCH_FROM"
    install_torch
  else
    echo "setup: error: torch $version in $("$py" -c 'import sys; print(sys.executable)') is older than vitpipe's minimum $MIN_TORCH; upgrade it (pip install -U torch torchvision, the build for your CUDA), or run again with VITPIPE_UPGRADE_TORCH=1 to install $TORCH_PIN" >&2
    exit 1
  fi
fi

EXTRAS=${VITPIPE_EXTRAS-test}
pip_install -e ".${EXTRAS:+[$EXTRAS]}" ${constraints[@]+"${constraints[@]}"}
if [ "$DRY" = 1 ]; then
  echo "setup: dry run: nothing installed"
  exit 0
fi
# What was really installed, from torch itself (an index may serve another build than asked).
ready=$("$py" - <<'EOF'
import dvc, timm, torch
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if torch.version.hip else "CPU"
print(f"vitpipe ready: torch {torch.__version__} ({build} build), timm {timm.__version__}")
EOF
)
echo "$ready"
case "$ready" in *"(CPU build)"*) built=cpu ;; *) built=gpu ;; esac
if [ "$GPU" = 1 ] && [ "$built" = cpu ]; then
  echo "setup: warning: this machine has a GPU but torch is a CPU build; set VITPIPE_TORCH_INDEX to the index of your CUDA version (e.g. https://download.pytorch.org/whl/cu126) and run again"
elif [ "$GPU" = 0 ] && [ "$built" = gpu ]; then
  echo "setup: warning: torch is a GPU build and this machine has no GPU: it runs on the CPU, from a venv several GB larger than the CPU build's; for the CPU build remove .venv and run again with VITPIPE_TORCH_INDEX=$CPU_INDEX (or a mirror of it that this machine reaches)"
fi
