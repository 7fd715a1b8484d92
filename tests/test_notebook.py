"""notebooks/colab.ipynb: stored without outputs, and it runs headless here (nbclient) on the
micro config, outside Colab, on a CPU."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MICRO, ROOT, write_params

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{NOTEBOOK.name}: cells {dirty} have outputs; clear them before committing "
                       "(jupyter nbconvert --clear-output --inplace notebooks/colab.ipynb)")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_notebook_cells_are_short_steps():
    """Each step is one line of text and one code cell; the Colab-only parts check for Colab
    inside the cell, so the notebook runs anywhere as it is."""
    nb = json.loads(NOTEBOOK.read_text())
    cells = nb["cells"]
    steps = [c for c in cells if c["cell_type"] == "markdown" and re.match(r"\*\*\d\. ", "".join(c["source"]))]
    assert len(steps) == 6
    for c in steps:
        assert "\n" not in "".join(c["source"]).strip()
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert '"google.colab" in sys.modules' in code and "if not MIRROR and IN_COLAB:" in code
    assert "/kaggle/working" in code and "VITPIPE_NO_VENV" in code and "--device\", \"auto\"" in code
    assert "dvc\", \"exp\", \"run\"" in code and "VITPIPE_CHECKPOINT_MIRROR" in code
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "runtime disconnected" in text and "colab.research.google.com/github/" in text


def execute(start: Path, monkeypatch) -> tuple[list, float]:
    """Run the notebook headless with `start` as its folder; its code cells and the seconds."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.delenv("VITPIPE_CHECKPOINT_MIRROR", raising=False)     # conftest: own store, no mirror
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t = time.perf_counter()
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=240,
                            resources={"metadata": {"path": str(start)}}).execute()
    seconds = time.perf_counter() - t
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not any(o["output_type"] == "error" for o in c.outputs) for c in code)
    return code, seconds


def text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def check_cells(code) -> None:
    info, install, mirror, plan, run, results = code
    assert "python" in text(info) and "gpus" in text(info)
    assert "is installed in" in text(install)                       # this venv: nothing installed
    assert "not in Colab or Kaggle" in text(mirror)                 # the Drive mount skipped itself
    assert "fits as written: dvc exp run" in text(plan) and "train_scratch" in text(plan)
    assert "Ran experiment" in text(run) and "Running stage 'report'" in text(run)
    html = [o for o in results.outputs if o["output_type"] == "display_data" and "text/html" in o["data"]]
    assert html and "<iframe srcdoc=" in html[0]["data"]["text/html"] and "Headline" in html[0]["data"]["text/html"]
    assert "top1" in text(results) and "| Experiment" in text(results)   # dvc exp show, dvc metrics diff


@pytest.mark.slow
def test_notebook_runs_headless_on_the_micro_config(tmp_path, monkeypatch):
    """VITPIPE_NOTEBOOK_PARAMS selects the micro params, as CI does: every cell runs outside
    Colab, the Drive cell skips itself, the report cell shows the HTML, and the checkout the
    notebook is opened in is left untouched (the run happens in a fresh copy)."""
    # the checkout the notebook is opened in: a copy of this one, so the test can see that
    # nothing in it changes (other work may go on in the real one)
    start = tmp_path / "checkout"
    start.mkdir()
    for name in ("dvc.yaml", "stages", "vitpipe", "pyproject.toml", ".dvcignore", "params.yaml"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, start / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, start / name)

    def files():
        return {str(p.relative_to(start)): p.read_bytes() for p in start.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    before = files()
    micro = tmp_path / "micro.yaml"
    write_params(micro, MICRO)
    work = tmp_path / "work"
    monkeypatch.setenv("VITPIPE_NOTEBOOK_PARAMS", str(micro))
    monkeypatch.setenv("VITPIPE_NOTEBOOK_WORKDIR", str(work))

    code, seconds = execute(start, monkeypatch)
    assert seconds < 180, f"the notebook took {seconds:.0f} s on the micro config (budget: 3 min)"
    check_cells(code)
    assert f"running {micro} in {work}" in text(code[3])
    assert (work / "reports" / "report.html").exists()
    assert "vit_micro" in (work / "params.yaml").read_text()
    after = files()
    assert after == before, sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))


@pytest.mark.slow
def test_notebook_with_nothing_set_runs_the_checkouts_params(project, monkeypatch):
    """Nothing set, no GPU: the notebook runs the checkout it is opened in on its committed
    params.yaml, with `dvc exp run` (the embedded default in a real checkout; here the
    micro params, committed by the `project` fixture, so it takes a minute, not five)."""
    monkeypatch.delenv("VITPIPE_NOTEBOOK_PARAMS", raising=False)
    code, seconds = execute(project, monkeypatch)
    assert seconds < 180
    check_cells(code)
    assert "no GPU: the embedded default (params.yaml), on this CPU" in text(code[3])
    assert f"vitpipe checkout: {project}" in text(code[0])
    assert (project / "reports" / "report.html").exists()
    exps = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=project,
                          capture_output=True, text=True, check=True).stdout.split()
    assert len(exps) == 1
