"""Through real `dvc` commands: the run-cache covers every training stage, pushed results come
back in a fresh clone with `dvc repro --pull`, a lost machine's finished runs come back from the
mirror in a fresh clone and the one in flight resumes, and a killed --temp experiment resumes."""

import contextlib
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
import yaml
from conftest import MICRO, run, store_steps, write_params
from test_checkpoint_store import s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_resume import LONG, reference, wait_for  # noqa: F401  (fixtures)
from test_train import assert_identical, weights

pytestmark = pytest.mark.slow

DVC = [sys.executable, "-m", "dvc"]
TRAINING = {"train_scratch@0", "pretrain@vit_micro", "pretrain@resnet18", "finetune@vit_micro-0", "finetune@resnet18-0"}


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def restored(out: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' is cached - skipping run", out))


def dvc(args, repo, **kw):
    p = run(DVC + args, repo, **kw)
    return p.stdout + p.stderr


def test_returning_to_old_params_restores_every_training_stage_from_the_run_cache(reproduced, checkpoint_store):
    project = reproduced  # A: the micro params, reproduced
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "A"], project)
    b = dvc(["exp", "run", "-S", "train.steps=4", "-S", "finetune.steps=4", "-S", "pretrain.steps=2"], project)
    assert TRAINING <= ran(b)
    again = dvc(
        [
            "exp",
            "run",
            "-S",
            f"train.steps={MICRO['train']['steps']}",
            "-S",
            f"finetune.steps={MICRO['finetune']['steps']}",
            "-S",
            f"pretrain.steps={MICRO['pretrain']['steps']}",
        ],
        project,
    )
    assert not ran(again) & TRAINING, again  # no training stage ran ...
    assert TRAINING <= restored(again)  # ... each came back from the run-cache
    rows = (project / "plots/train_scratch/seed-0/train.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == list(range(1, MICRO["train"]["steps"] + 1))  # A's log, restored
    assert store_steps(checkpoint_store) == []  # and nothing trained: no checkpoint written
    assert run(DVC + ["status"], project).stdout.strip() == "Data and pipelines are up to date."


def test_pushed_results_come_back_in_a_fresh_clone_with_repro_pull(reproduced, tmp_path):
    """`dvc push` on one machine, `dvc repro --pull` in a fresh clone on another: every stage's
    outputs are pulled, none runs, and the clone's report is the very one pushed."""
    project = reproduced
    run(DVC + ["remote", "add", "-d", "shared", str(tmp_path / "remote")], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    dvc(["push"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models/scratch/seed-0/model.pt").exists()  # outputs live in DVC's cache, not in git
    out = dvc(["repro", "--pull"], clone, env={"VITPIPE_CHECKPOINT_DIR": str(tmp_path / "empty-store")})
    assert ran(out) == set(), out[-3000:]
    for output in ("reports/report.md", "models/scratch/seed-0/model.pt"):
        assert (clone / output).read_bytes() == (project / output).read_bytes()
    assert run(DVC + ["status"], clone).stdout.strip() == "Data and pipelines are up to date."


def _origin(project: Path, mirror_remote: str | None) -> Path:
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["train"].update(LONG)
    write_params(project / "params.yaml", doc)
    if mirror_remote:  # the S3 case: the project's default DVC remote is the mirror
        run(DVC + ["remote", "add", "-d", "store", mirror_remote[0]], project)
        run(DVC + ["remote", "modify", "store", "endpointurl", mirror_remote[1]], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "long training"], project)
    return project


def _mirror_manifests(kind: str, where, endpoint=None, pattern="step-*.json") -> list[dict]:
    """The manifests in the mirror (a folder, or the moto bucket) matching <fp>/<pattern>."""
    if kind == "folder":
        found = []
        for m in Path(where).glob(f"*/{pattern}"):
            try:
                found.append(json.loads(m.read_text()))
            except (OSError, ValueError):
                pass  # being written or replaced right now
        return found
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
    found = []
    for f in fs.glob(f"{where}/*/{pattern}", refresh=True) if fs.exists(where) else []:
        try:
            found.append(json.loads(fs.cat_file(f)))
        except FileNotFoundError:
            pass  # an older step's manifest, dropped between the listing and the read
    return found


def _mirror_steps(kind: str, where, endpoint=None) -> list[int]:
    return sorted(m["step"] for m in _mirror_manifests(kind, where, endpoint))


def _finished_stages(kind: str, where, endpoint=None) -> set[str]:
    return {m["stage"] for m in _mirror_manifests(kind, where, endpoint, "finished.json")}


PRETRAINS = ("pretrain@vit_micro", "pretrain@resnet18")
FIRST = [*PRETRAINS, "train_scratch@0"]


def _outputs(repo: Path, name: str) -> dict[str, bytes]:
    """A pretrain stage's outputs, byte for byte."""
    files = [
        repo / f"models/pretrained/{name}.pt",
        repo / f"metrics/pretrain/{name}.json",
        *sorted((repo / f"plots/pretrain/{name}").glob("*.tsv")),
    ]
    return {str(f.relative_to(repo)): f.read_bytes() for f in files}


def _stop_mid_run_with_a_mirrored_step(p, store: Path, kind: str, where, endpoint) -> None:
    """SIGSTOP the job's processes once train_scratch@0 has a local checkpoint past its first few
    steps, then let them on in 10 ms slices until the mirror holds a verified step of it (its
    second upload or later). The 150 steps take about a second and one look into the
    mirror up to one (S3), so a job left running while the test looks could finish first."""
    mid_way = wait_for(lambda: max(store_steps(store), default=0) >= 30, p)  # the pretrains have ≤ 4 steps
    if not mid_way:
        with contextlib.suppress(ProcessLookupError):  # still running: the wait timed out
            os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"train_scratch@0 never seen mid-way: {p.communicate()[0][-3000:]}")
    os.killpg(p.pid, signal.SIGSTOP)
    for _ in range(60):  # a slice trains a step or two: 60 should not reach the end from step 30
        if max(_mirror_steps(kind, where, endpoint), default=0) >= 6:
            return
        os.killpg(p.pid, signal.SIGCONT)
        time.sleep(0.01)
        os.killpg(p.pid, signal.SIGSTOP)
    raise AssertionError(f"the mirror held no step of train_scratch@0 after 60 slices; local {store_steps(store)}")


# The mirror as the DVC remote's S3 bucket (a folder mirror, as on Google Drive, is the
# notebook's: tests/test_notebook.py restores a study in a new runtime from one).
@pytest.mark.parametrize("kind", ["s3"])
def test_lost_machine_restores_finished_runs_and_resumes_in_a_fresh_clone(tmp_path, project, reference, kind, request):  # noqa: F811  (a fixture)
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        origin = _origin(project, (f"s3://{bucket}/dvc", endpoint))
        mirror, where = "dvc", f"{bucket}/dvc/vitpipe-checkpoints"
        os.environ.pop("AWS_ENDPOINT_URL")  # the clones know the endpoint from DVC's config only
        request.addfinalizer(lambda: os.environ.__setitem__("AWS_ENDPOINT_URL", endpoint))
    else:
        origin = _origin(project, None)
        mirror = where = str(tmp_path / "drive" / "vitpipe")
        endpoint = None
    # clone X on machine 1: killed once two training stages finished and the third is mid-way,
    # after the mirror holds a verified step of it
    x, store_x = tmp_path / "x", tmp_path / "store-x"
    run(["git", "clone", "-q", str(origin), str(x)], tmp_path)
    env = {"VITPIPE_CHECKPOINT_DIR": str(store_x), "VITPIPE_CHECKPOINT_MIRROR": mirror, "OMP_NUM_THREADS": "1"}
    # DVC orders independent stages its own way: two commands fix which one is in flight at the kill
    repro = " ".join(DVC + ["repro"])
    p = subprocess.Popen(
        ["sh", "-c", f"{repro} {' '.join(PRETRAINS)} && {repro} train_scratch@0"],
        cwd=x,
        start_new_session=True,
        env={**os.environ, **env, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _stop_mid_run_with_a_mirrored_step(p, store_x, kind, where, endpoint)
    os.killpg(p.pid, signal.SIGKILL)  # the runtime disconnects: dvc, the stage, its upload thread
    out_x = p.communicate()[0]
    in_mirror = max(_mirror_steps(kind, where, endpoint))
    assert 6 <= in_mirror < LONG["steps"], out_x[-3000:]
    assert _finished_stages(kind, where, endpoint) == set(PRETRAINS), out_x[-3000:]
    finished_x = {name: _outputs(x, name.split("@")[1]) for name in PRETRAINS}
    shutil.rmtree(x)  # the workspace and its DVC cache
    shutil.rmtree(store_x)
    # clone Y on machine 2: an empty local store and DVC cache, the same mirror
    y = tmp_path / "y"
    run(["git", "clone", "-q", str(origin), str(y)], tmp_path)
    env["VITPIPE_CHECKPOINT_DIR"] = str(tmp_path / "store-y")
    out = dvc(["repro", *FIRST], y, env=env)
    shown = f"s3://{where}" if kind == "s3" else where
    for name in PRETRAINS:  # restored, not trained: the very bytes, step logs and their timings included
        assert re.search(
            rf"^\[{name}\] restored the finished run [0-9a-f]{{16}} from mirror {re.escape(shown)}$", out, re.MULTILINE
        ), out[-3000:]
        assert _outputs(y, name.split("@")[1]) == finished_x[name]
    assert f"resuming from mirror {shown} at step " in out, out[-3000:]
    resumed_at = int(out.split("resuming from mirror ")[1].split(" at step ")[1].split("/")[0])
    assert resumed_at >= in_mirror
    assert_identical(reference, weights(y / "models/scratch/seed-0/model.pt"))
    assert _mirror_steps(kind, where, endpoint) == []  # finished: only records remain in the mirror
    assert _finished_stages(kind, where, endpoint) == {*PRETRAINS, "train_scratch@0"}
    assert "changed" not in run(DVC + ["status", *FIRST], y, env=env).stdout


def test_killed_temp_experiment_resumes_when_run_again(project, reference, checkpoint_store):  # noqa: F811  (a fixture)
    doc = yaml.safe_load((project / "params.yaml").read_text())
    doc["train"].update(LONG)
    write_params(project / "params.yaml", doc)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "long"], project)
    run(DVC + ["repro", "preprocess"], project)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    p = subprocess.Popen(
        DVC + ["exp", "run", "--temp", "train_scratch@0"],
        cwd=project,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # the 150 steps take about a second: look often
    mid_way = wait_for(lambda: max(store_steps(checkpoint_store), default=0) >= 30, p)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    killed = p.communicate()[0]
    assert mid_way, killed[-3000:]
    step = max(store_steps(checkpoint_store))
    time.sleep(0.5)
    again = run(DVC + ["exp", "run", "--temp", "train_scratch@0"], project, env={"OMP_NUM_THREADS": "1"})
    out = again.stdout + again.stderr
    assert f"resuming from local store {checkpoint_store}/" in out and f"at step {step}/{LONG['steps']}" in out, out[
        -3000:
    ]
    # the experiment's weights, from its commit and DVC's cache: those of an uninterrupted run
    import io

    import dvc.api
    import torch

    rev = run(["git", "for-each-ref", "--format=%(objectname)", "refs/exps"], project).stdout.split()[-1]
    blob = dvc.api.read("models/scratch/seed-0/model.pt", repo=str(project), rev=rev, mode="rb")
    assert_identical(reference, torch.load(io.BytesIO(blob), weights_only=True)["state_dict"])
