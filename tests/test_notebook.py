"""notebooks/colab.ipynb: stored without outputs, and it runs headless here (nbclient) on the
micro config, outside Colab, on a CPU: first opened in a checkout and lost mid-study, then on a
new runtime that clones REPO_URL and shares only the checkpoint mirror with the first."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, PROJECT_FILES, ROOT, copy_project_files, make_project, write_params

NOTEBOOK = ROOT / "notebooks" / "colab.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [
        i
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{NOTEBOOK.name}: cells {dirty} have outputs; clear them before committing "
        "(jupyter nbconvert --clear-output --inplace notebooks/colab.ipynb)"
    )
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
    assert "/kaggle/working" in code and "VITPIPE_NO_VENV" in code and '--device", "auto"' in code
    assert 'dvc", "exp", "run"' in code and "VITPIPE_CHECKPOINT_MIRROR" in code
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "runtime disconnected" in text and "colab.research.google.com/github/" in text
    assert "session limit" in text and "restored the finished run" in text
    # what a real session needs: the package alone, the quota and what happens at it, another GPU later
    assert '"VITPIPE_EXTRAS": ""' in code and "VITPIPE_EXTRAS=" in text
    assert "30 GPU hours a week" in text and "not guaranteed" in text and "GPU quota ran out" in text
    assert "A later session on another GPU" in text and "notebook-study.json" in code


def test_the_repository_url_is_one_field_at_the_top():
    """The first code cell is a Colab form with REPO_URL alone; the text above it says to set
    it and that VITPIPE_REPO_URL overrides it."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    first = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    field = "".join(cells[first]["source"])
    assignments = [line for line in field.splitlines() if not line.startswith("#")]
    assert assignments == ['REPO_URL = "https://github.com/OWNER/vitpipe"  #@param {type:"string"}']
    above = "".join("".join(c["source"]) for c in cells[:first])
    assert "`REPO_URL`" in above and "VITPIPE_REPO_URL" in above


def execute(start: Path, monkeypatch, failing=False) -> tuple[list, float]:
    """Run the notebook headless with `start` as its folder; its code cells after the
    REPO_URL field and the seconds. `failing`: a cell is expected to stop it."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    nb = nbformat.read(NOTEBOOK, as_version=4)
    t = time.perf_counter()
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(start)}}
    )
    if failing:
        with pytest.raises(nbclient.exceptions.CellExecutionError):
            client.execute()
    else:
        client.execute()
    seconds = time.perf_counter() - t
    code = [c for c in nb.cells if c.cell_type == "code"][1:]
    if not failing:
        assert all(not any(o["output_type"] == "error" for o in c.outputs) for c in code)
    return code, seconds


def text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream")


def check_cells(code, mirror_dir: Path) -> None:
    info, install, mirror, plan, run, results = code
    assert "python" in text(info) and "gpus" in text(info)
    assert "is installed in" in text(install)  # this venv: nothing installed
    assert f"checkpoints are mirrored to {mirror_dir}" in text(mirror)
    assert f"every finished training run is restored from {mirror_dir}" in text(plan)
    assert "fits as written: dvc exp run" in text(plan) and "train_scratch" in text(plan)
    assert re.search(r"about \d+\.\d h of training on CPU.*, 1 session\(s\) of 12 h at most", text(plan))
    assert "Ran experiment" in text(run) and "Running stage 'report'" in text(run)
    html = [o for o in results.outputs if o["output_type"] == "display_data" and "text/html" in o["data"]]
    assert html and "<iframe srcdoc=" in html[0]["data"]["text/html"] and "Headline" in html[0]["data"]["text/html"]
    assert "top1" in text(results) and "| Experiment" in text(results)  # dvc exp show, dvc metrics diff


@pytest.mark.parametrize(
    "url, said",
    [
        (
            None,
            "REPO_URL is not set ('https://github.com/OWNER/vitpipe' is the placeholder): set REPO_URL in the first cell",
        ),
        ("file:///nonexistent/vitpipe.git", "cannot clone REPO_URL 'file:///nonexistent/vitpipe.git' ("),
        ("NOT-VITPIPE", "is not vitpipe (no dvc.yaml and vitpipe/ in it): set REPO_URL in the first cell"),
    ],
)
def test_a_missing_or_wrong_repo_url_stops_with_one_line(tmp_path, monkeypatch, url, said):
    """Opened outside a checkout (a new Colab runtime), the notebook clones REPO_URL: the
    placeholder, a URL that does not clone and a repository that is not vitpipe each stop the
    first cell with one line that says what to set, and no later cell runs."""
    if url == "NOT-VITPIPE":
        other = tmp_path / "other"
        other.mkdir()
        (other / "README.md").write_text("not vitpipe\n")
        for cmd in (
            ["git", "init", "-q"],
            ["git", "add", "-A"],
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        ):
            subprocess.run(cmd, cwd=other, check=True)
        url = f"file://{other}"
    if url is None:
        monkeypatch.delenv("VITPIPE_REPO_URL", raising=False)
    else:
        monkeypatch.setenv("VITPIPE_REPO_URL", url)
    start = tmp_path / "runtime"
    start.mkdir()
    code, _ = execute(start, monkeypatch, failing=True)
    errors = [o for o in code[0].outputs if o["output_type"] == "error"]
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1, errors
    line = errors[0]["traceback"][0]
    assert line.startswith("vitpipe notebook: ") and said in line and "\n" not in line
    assert "VITPIPE_REPO_URL" in line and "e.g. https://github.com/<owner>/vitpipe" in line
    assert not (start / "vitpipe").exists()  # no half clone left for the next run
    assert all(not c.outputs for c in code[1:])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): the kernel, dvc and its stages."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def lose_the_machine(proc: subprocess.Popen) -> None:
    """SIGKILL the notebook's process and everything under it, as a vanishing VM does."""
    while True:
        pids = [proc.pid, *descendants(proc.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        if not descendants(proc.pid):
            return


RUN_NOTEBOOK = """
import sys, nbformat, nbclient
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": sys.argv[2]}}).execute()
"""


def checkout_copy(start: Path) -> Path:
    """The checkout the notebook is opened in: a copy of this one, so a test can see that
    nothing in it changes (other work may go on in the real one)."""
    start.mkdir()
    return copy_project_files(start, (*PROJECT_FILES, "params.yaml"))


def files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the processes to kill in /proc")
def test_a_new_runtime_continues_the_study_from_the_mirror(tmp_path, monkeypatch):
    """Two fresh "machines" (each its own checkpoint store and DVC cache) share one mirror
    folder. The first opens the notebook in a checkout with the micro params
    (VITPIPE_NOTEBOOK_PARAMS, as CI does: the run happens in a fresh copy, the checkout is left
    untouched) and is SIGKILLed, with everything under it, once two training runs have
    finished. The second is a new runtime that clones REPO_URL and runs all cells as published:
    every run that finished on the first comes back from the mirror, each said in one line,
    none trained again, and the study completes."""
    pytest.importorskip("nbclient")
    origin = make_project(tmp_path / "origin")  # the published repository: the micro params
    mirror = tmp_path / "drive" / "vitpipe-checkpoints"  # one folder both machines mount
    monkeypatch.setenv("VITPIPE_REPO_URL", f"file://{origin}")
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", str(mirror))
    monkeypatch.delenv("VITPIPE_NOTEBOOK_PARAMS", raising=False)  # the second machine runs as published
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])

    start = checkout_copy(tmp_path / "checkout")
    before = files(start)
    micro, work = tmp_path / "micro.yaml", tmp_path / "machine-1"
    write_params(micro, MICRO)
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_NOTEBOOK, str(NOTEBOOK), str(start)],
        env={
            **os.environ,
            "VITPIPE_CHECKPOINT_DIR": str(tmp_path / "store-1"),
            "VITPIPE_NOTEBOOK_PARAMS": str(micro),
            "VITPIPE_NOTEBOOK_WORKDIR": str(work),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    try:
        while len(list(mirror.glob("*/finished.json"))) < 2:
            assert proc.poll() is None, "the first machine's notebook ended before two training runs finished"
            assert time.monotonic() < deadline, "no two finished runs in the mirror after 5 minutes"
            time.sleep(0.2)
    finally:
        lose_the_machine(proc)
    assert "vit_micro" in (work / "params.yaml").read_text()  # the micro params, run in the copy
    after = files(start)
    assert after == before, sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
    finished = sorted(m.parent.name for m in mirror.glob("*/finished.json"))
    assert 2 <= len(finished) < 5  # 5 training runs in the micro study
    shutil.rmtree(work)  # its copy, DVC cache and store go with it
    shutil.rmtree(tmp_path / "store-1")

    second = tmp_path / "machine-2"
    second.mkdir()
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(second / "store"))
    code, seconds = execute(second, monkeypatch)
    assert seconds < 180, f"the second runtime took {seconds:.0f} s on the micro config"
    check_cells(code, mirror)
    run = text(code[4])
    restored = dict(re.findall(r"\[(\S+)\] restored the finished run (\w+) from ", run))
    assert sorted(restored.values()) == finished, run[-3000:]
    trained = set(re.findall(r"(?:^|[\r\n])(\S+@\S+|train_scratch@\d+): +\d+%\|", run))  # tqdm: a training bar
    assert trained and not trained & set(restored), (trained, restored)  # the rest trained; nothing twice
    clone = second / "vitpipe"
    assert f"vitpipe checkout: {clone}" in text(code[0])
    assert "no GPU: the embedded default (params.yaml), on this CPU" in text(code[3])
    assert (clone / "reports" / "report.html").exists()
    exps = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=clone,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(exps) == 1
    # Another GPU class's micro-batches restore the same runs: the fingerprint holds what
    # changes a run's numbers, not the split (tests/test_fingerprint.py, at the loop).
    assert len(list(mirror.glob("*/finished.json"))) == 5  # every run of the study, for the next runtime
