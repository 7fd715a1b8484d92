#!/usr/bin/env bash
# Set up vitpipe in ./.venv: torch first, then the package and its test dependencies.
#
# torch: a Python that already has torch >= vitpipe's minimum (pyproject.toml: torch>=X) keeps
# it, whatever its build (the CUDA torch of Colab, Kaggle, an NGC container, a workstation), and
# says so; pip is told not to replace it. An older torch stops setup with one message. A Python
# without torch (a fresh .venv, CI) gets the pinned build, the CPU one from the local index
# (a plain `pip install torch` pulls several GB of CUDA wheels).
#
# Environment:
#   PYTHON=python3            the interpreter that makes .venv (or that is installed into)
#   VITPIPE_NO_VENV=1         install into $PYTHON itself, no .venv (Colab, Kaggle, containers)
#   VITPIPE_UPGRADE_TORCH=1   replace a torch older than the minimum by the pinned one
#   TORCH_VERSION, TORCHVISION_VERSION   the pinned build (2.14.1, 0.29.1)
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

# The minimum torch is the one pyproject.toml declares ("torch>=2.5").
MIN_TORCH=$(sed -n 's/^ *"torch>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
# "<torch.__version__> <pip's version, or -> <ok|old>" of the torch this Python imports,
# or nothing when it has none.
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
print(v, dist, "ok" if key(v) >= key(sys.argv[1]) else "old")
EOF
)

constraints=()
if [ -z "$HAVE" ]; then
  echo "setup: no torch in this Python: installing the pinned $TORCH_PIN, $TORCHVISION_PIN"
  pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
else
  read -r version dist verdict <<<"$HAVE"
  if [ "$verdict" = ok ]; then
    echo "setup: keeping the installed torch $version (vitpipe needs torch >= $MIN_TORCH)"
    if [ "$dist" != - ]; then
      # pip must not swap it for another build while resolving timm or torchvision
      cfile=$(mktemp)
      trap 'rm -f "$cfile"' EXIT
      echo "torch==$dist" >"$cfile"
      constraints=(-c "$cfile")
    fi
  elif [ "${VITPIPE_UPGRADE_TORCH:-0}" = 1 ]; then
    echo "setup: torch $version is older than vitpipe's minimum $MIN_TORCH: replacing it by $TORCH_PIN (VITPIPE_UPGRADE_TORCH=1)"
    pip_install "$TORCH_PIN" "$TORCHVISION_PIN"
  else
    echo "setup: error: torch $version in $("$py" -c 'import sys; print(sys.executable)') is older than vitpipe's minimum $MIN_TORCH; upgrade it (pip install -U torch torchvision, the build for your CUDA), or run again with VITPIPE_UPGRADE_TORCH=1 to install $TORCH_PIN" >&2
    exit 1
  fi
fi

pip_install -e ".[test]" ${constraints[@]+"${constraints[@]}"}
if [ "$DRY" = 1 ]; then
  echo "setup: dry run: nothing installed"
  exit 0
fi
"$py" -c "import torch, timm, dvc; print(f'vitpipe ready: torch {torch.__version__}, timm {timm.__version__}')"
