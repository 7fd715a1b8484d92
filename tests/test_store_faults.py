"""The checkpoint store against an attacker and a careless user (issue 27), through the real
commands: the train_scratch stage script and `python -m vitpipe checkpoints`.

A mirror anyone else can write to (a shared Drive folder, a bucket) may hold a record whose
names climb out of the run's folder; a record whose weights or metrics are not what they claim;
two clones may train one fingerprint at once; settings may be wrong; a run may be damaged. Each
is refused or reported in one line, nothing outside the store is written, nothing is lost."""

import copy
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO, ROOT, write_params
from test_checkpoint_store import s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_train import ENV

from vitpipe.checkpoints.manifest import Damaged, confined

STAGE = "train_scratch@0"
WEIGHTS, METRICS, TRAIN_LOG = (
    "models/scratch/seed-0/model.pt",
    "metrics/train_scratch/seed-0.json",
    "plots/train_scratch/seed-0/train.tsv",
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def env_for(store: Path, mirror: str | None = None, **more) -> dict:
    """The stage's environment: this store and mirror only (never the user's), one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITPIPE_")}
    env.update(ENV, VITPIPE_CHECKPOINT_DIR=str(store), PYTHONPATH=str(ROOT), **more)
    if mirror is not None:
        env["VITPIPE_CHECKPOINT_MIRROR"] = mirror
    return env


def workspace(folder: Path, prepared: Path, **train) -> Path:
    """A folder to run stages/train_scratch.py in: the micro params and the prepared data."""
    folder.mkdir(parents=True, exist_ok=True)
    doc = copy.deepcopy(MICRO)
    doc["train"].update(train)
    write_params(folder / "params.yaml", doc)
    (folder / "data").symlink_to(prepared)
    return folder


def start(ws: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages/train_scratch.py"), "0"],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stage(ws: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    p = start(ws, env)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def vitpipe(cwd: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitpipe", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]


def warnings(p) -> list[str]:
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return [line for line in lines(p.stderr) if line.startswith("vitpipe: warning:")]


def one_error(p, *words) -> str:
    """The one `vitpipe: error:` line of a process that exited 2, holding every word."""
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = lines(p.stderr)
    assert line.startswith("vitpipe: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


# ---------------------------------------------------------------------------------------
# One trained run, shared: its finished record is what the attacks below are made from


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prepared):
    """The micro train_scratch run, finished: (its fingerprint, its record's folder in a folder
    mirror, the record's manifest)."""
    root = tmp_path_factory.mktemp("trained")
    ws = workspace(root / "ws", prepared)
    p = stage(ws, env_for(root / "store", str(root / "mirror")))
    assert p.returncode == 0, p.stderr[-3000:]
    (run,) = (root / "mirror").iterdir()
    return run.name, run, json.loads((run / "finished.json").read_text())


def hostile_folder_mirror(trained, mirror: Path, name: str, payload: bytes, source: Path) -> Path:
    """A copy of the trained run's record in `mirror` whose manifest also names `name` (with the
    size and sha256 of `payload`, which is put at `source`, where a naive join would read it)."""
    fp, run, manifest = trained
    shutil.copytree(run, mirror / fp)
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(payload)
    manifest = copy.deepcopy(manifest)
    manifest["files"][name] = {"size": len(payload), "sha256": sha(payload)}
    (mirror / fp / "finished.json").write_text(json.dumps(manifest))
    return mirror / fp / "finished.json"


PAYLOAD = b"ssh-ed25519 AAAA attacker@example\n"


def assert_refused_and_trained(p, record: str, name: str, ws: Path, mirror_record_text: str | None = None):
    """One warning naming the record and the name; the stage trained (exit 0) instead."""
    assert p.returncode == 0, p.stderr[-3000:]
    (line,) = warnings(p)
    assert line.startswith(f"vitpipe: warning: [{STAGE}] refusing the finished run "), line
    assert record in line and name in line and line.endswith("training it instead"), line
    assert "restored" not in p.stderr
    import torch

    assert torch.load(ws / WEIGHTS, weights_only=True)["state_dict"]  # trained, whole
    assert json.loads((ws / METRICS).read_text())["steps"] == MICRO["train"]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["dotdot", "absolute"])
def test_a_folder_mirror_record_naming_a_file_outside_its_folder_is_refused(attack, tmp_path, trained, prepared):
    fp = trained[0]
    store, mirror = tmp_path / "s" / "store", tmp_path / "mirrors" / "m"
    download = store / fp / ".finished.download"  # where the record's files land before they are verified
    if attack == "dotdot":
        name = "../../../escaped"
        target = Path(os.path.normpath(download / name))  # tmp/s/escaped
        source = Path(os.path.normpath(mirror / fp / "finished" / name))  # tmp/mirrors/escaped
    else:
        target = tmp_path / "home" / ".ssh" / "authorized_keys"
        name = str(target)
        source = mirror / fp / "finished" / name.lstrip("/")  # fsspec reads <root>/<fp>/finished//abs as that
    assert target != source and tmp_path in target.parents
    record = hostile_folder_mirror(trained, mirror, name, PAYLOAD, source)
    ws = workspace(tmp_path / "ws", prepared)
    p = stage(ws, env_for(store, str(mirror)))
    assert_refused_and_trained(p, str(record), repr(name), ws)
    assert not target.exists() and source.read_bytes() == PAYLOAD  # the payload stayed where it was put
    recorded = json.loads(record.read_text())  # recorded again by the run that trained: the attack is gone
    assert set(recorded["files"]) == {"weights", "metrics", "train.tsv", "eval.tsv"}


@pytest.mark.slow
def test_an_s3_mirror_record_naming_files_outside_its_folder_is_refused(tmp_path, trained, prepared, request):
    import s3fs

    bucket, endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
    fp, run, manifest = trained
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    url = f"s3://{bucket}/ckpt"
    store = tmp_path / "s" / "store"
    env = env_for(store, url)
    for name, target in (
        ("../../../escaped", tmp_path / "s" / "escaped"),
        (str(tmp_path / "abs-escaped"), tmp_path / "abs-escaped"),
    ):
        for f in run.rglob("*"):
            if f.is_file():
                fs.pipe_file(f"{bucket}/ckpt/{fp}/{f.relative_to(run)}", f.read_bytes())
        hostile = copy.deepcopy(manifest)
        hostile["files"][name] = {"size": len(PAYLOAD), "sha256": sha(PAYLOAD)}
        try:  # where a naive join would read it (if the server keeps such a key)
            fs.pipe_file(f"{bucket}/ckpt/{fp}/finished/{name}", PAYLOAD)
        except Exception:  # noqa: BLE001
            pass
        fs.pipe_file(f"{bucket}/ckpt/{fp}/finished.json", json.dumps(hostile).encode())
        shutil.rmtree(store, ignore_errors=True)
        ws = workspace(tmp_path / f"ws-{len(name)}", prepared)
        p = stage(ws, env)
        assert_refused_and_trained(p, f"{url}/{fp}/finished.json", repr(name), ws)
        assert not target.exists()
        fs.invalidate_cache()
        assert set(json.loads(fs.cat_file(f"{bucket}/ckpt/{fp}/finished.json"))["files"]) == {
            "weights",
            "metrics",
            "train.tsv",
            "eval.tsv",
        }


@pytest.mark.slow
def test_a_symlink_in_a_local_record_is_refused_and_never_written_through(tmp_path, trained, prepared):
    """A record's file that is a symbolic link to a file outside the store: not restored from,
    and the run that trains instead replaces the link, never the file it points to."""
    fp, run, _ = trained
    store = tmp_path / "store"
    shutil.copytree(run, store / fp)
    outside = tmp_path / "outside" / "profile.json"
    outside.parent.mkdir()
    shutil.copy(run / "finished" / "metrics", outside)  # the very bytes: its sha256 matches the manifest
    before = outside.read_bytes()
    (store / fp / "finished" / "metrics").unlink()
    (store / fp / "finished" / "metrics").symlink_to(outside)
    ws = workspace(tmp_path / "ws", prepared)
    p = stage(ws, env_for(store))
    assert_refused_and_trained(p, str(store / fp / "finished.json"), "'metrics' is a symbolic link", ws)
    assert outside.read_bytes() == before and not outside.is_symlink()
    assert not (store / fp / "finished" / "metrics").is_symlink()


def test_confined_refuses_every_way_out(tmp_path):
    folder = tmp_path / "record"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (folder / "link").symlink_to(tmp_path / "elsewhere")
    (folder / "sub" / "inner").symlink_to(folder / "sub")  # a link even to inside: the store never makes one
    assert confined(folder, "sub/weights", "m.json") == folder / "sub" / "weights"
    for name in (
        "../x",
        "sub/../../x",
        "/etc/passwd",
        "",
        ".",
        "sub/./x",
        "a//b",
        "link/x",
        "link",
        "sub/inner/x",
        "a\\..\\x",
        "x\0y",
        7,
        None,
        "x" * 300,
    ):
        with pytest.raises(Damaged, match=r"^m\.json"):
            confined(folder, name, "m.json")


# ---------------------------------------------------------------------------------------
# A record that is not what it claims: refused before any output is replaced


def _weights_of_another_model(run: Path) -> bytes:
    import torch

    payload = torch.load(run / "finished" / "weights", weights_only=True)
    state = payload["state_dict"]
    key = next(k for k, v in state.items() if v.dim() == 2)
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _pickle_payload(run: Path) -> bytes:
    import argparse

    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {}, "spec": argparse.Namespace(x=1)}, buf)  # an object weights_only refuses
    return buf.getvalue()


FAKES = {
    "weights-shape": ("weights", _weights_of_another_model, "its weights do not fit this run's model"),
    "weights-pickle": ("weights", _pickle_payload, "its weights do not load with weights_only=True"),
    "metrics-json": ("metrics", lambda run: b'{"top1": 0.99,', "its metrics are not JSON"),
    "steplog": ("train.tsv", lambda run: b"step\tloss\n1\trm -rf ~\n", "step log train.tsv line 2 is not 2 numbers"),
}


@pytest.mark.slow
@pytest.mark.parametrize("fake", FAKES)
def test_a_record_that_is_not_what_it_claims_is_refused_before_outputs_are_replaced(fake, tmp_path, trained, prepared):
    """Digests that match (the attacker wrote the manifest), content that does not: refused in
    one line; the workspace's outputs are the run's own, never the record's."""
    fp, run, manifest = trained
    name, make, words = FAKES[fake]
    mirror = tmp_path / "mirror"
    shutil.copytree(run, mirror / fp)
    data = make(run)
    (mirror / fp / "finished" / name).write_bytes(data)
    manifest = copy.deepcopy(manifest)
    manifest["files"][name] = {"size": len(data), "sha256": sha(data)}
    (mirror / fp / "finished.json").write_text(json.dumps(manifest))
    ws = workspace(tmp_path / "ws", prepared)
    p = stage(ws, env_for(tmp_path / "store", str(mirror)))
    assert_refused_and_trained(p, f"{mirror}/{fp}/finished.json", words, ws)
    outputs = {"weights": WEIGHTS, "metrics": METRICS, "train.tsv": TRAIN_LOG}
    assert (ws / outputs[name]).read_bytes() != data  # the fake never reached the workspace
    assert not list((tmp_path / "store" / fp).glob(".finished.download"))


# ---------------------------------------------------------------------------------------
# One writer per fingerprint


def _holder(store: Path, pid: int) -> bool:
    for lock in (store / ".locks").glob("*.lock"):
        try:
            if json.loads(lock.read_text())["pid"] == pid:
                return True
        except (OSError, ValueError, KeyError):
            pass
    return False


@pytest.mark.slow
def test_a_second_run_of_one_fingerprint_waits_or_stops_never_writes_beside_the_first(tmp_path, prepared):
    store = tmp_path / "store"
    long = {"steps": 400, "checkpoint_every": 50, "eval_every": 200}
    a = start(workspace(tmp_path / "clone-a", prepared, **long), env_for(store))
    end = time.monotonic() + 120
    while not _holder(store, a.pid):
        assert a.poll() is None and time.monotonic() < end, a.stderr.read()[-3000:] if a.poll() is not None else ""
        time.sleep(0.05)
    os.kill(a.pid, signal.SIGSTOP)  # the first run holds the lock, paused: the others meet it whatever their speed
    ws_stop, ws_wait = (workspace(tmp_path / n, prepared, **long) for n in ("clone-b", "clone-c"))
    waiting = start(ws_wait, env_for(store))
    stopped = stage(ws_stop, env_for(store, VITPIPE_CHECKPOINT_WAIT="0"))
    assert a.poll() is None
    os.kill(a.pid, signal.SIGCONT)
    line = one_error(stopped, f"pid {a.pid} on {socket.gethostname()}", "clone-a", "VITPIPE_CHECKPOINT_WAIT=1")
    assert line.startswith("vitpipe: error: run ") and not (ws_stop / WEIGHTS).exists()
    out_a, err_a = a.communicate(timeout=300)
    out_w, err_w = waiting.communicate(timeout=300)
    assert a.returncode == 0 and waiting.returncode == 0, (err_a[-2000:], err_w[-2000:])
    assert f"is being trained by pid {a.pid}" in err_w and "waiting for it to finish" in err_w
    assert "restored the finished run" in err_w  # it waited, then took the first run's record: it never trained
    for out in (WEIGHTS, METRICS, TRAIN_LOG):
        assert (ws_wait / out).read_bytes() == (tmp_path / "clone-a" / out).read_bytes()
    (run,) = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in run.iterdir()) == ["finished", "finished.json"]  # no stray checkpoint


# ---------------------------------------------------------------------------------------
# Settings: every one checked at the edge, credentials never shown


BAD_SETTINGS = [
    (
        "timeout-text",
        {"VITPIPE_MIRROR_TIMEOUT_S": "soon"},
        None,
        ["VITPIPE_MIRROR_TIMEOUT_S = 'soon' is not allowed", "number of seconds"],
    ),
    ("wait-maybe", {"VITPIPE_CHECKPOINT_WAIT": "maybe"}, None, ["VITPIPE_CHECKPOINT_WAIT = 'maybe'", "1/0"]),
    (
        "yaml-unknown-key",
        {},
        "checkpoint_dri: /x\n",
        ["vitpipe.local.yaml: unknown key(s) checkpoint_dri", "checkpoint_dir"],
    ),
    ("yaml-list-timeout", {}, "mirror_timeout_s: [a, b]\n", ["vitpipe.local.yaml: mirror_timeout_s = ['a', 'b']"]),
    ("yaml-not-a-mapping", {}, "- checkpoint_dir\n", ["vitpipe.local.yaml: expected a mapping"]),
    (
        "scp-address",
        {"VITPIPE_CHECKPOINT_MIRROR": "backup:hunter2pass@nas.local:/ckpt"},
        None,
        ["VITPIPE_CHECKPOINT_MIRROR", "***@nas.local:/ckpt", "neither a URL nor a folder", "ssh://"],
    ),
    (
        "scp-address-yaml",
        {},
        "checkpoint_mirror: 'backup:hunter2pass@nas.local:ckpt'\n",
        ["checkpoint_mirror", "***@nas.local:ckpt", "neither a URL nor a folder"],
    ),
    (
        "unknown-protocol",
        {"VITPIPE_CHECKPOINT_MIRROR": "nosuch://backup:hunter2pass@host/x?token=hunter2pass"},
        None,
        ["nosuch://***@host/x?***", "not a URL fsspec knows"],
    ),
    (
        "two-at-once",
        {"VITPIPE_MIRROR_TIMEOUT_S": "-1", "VITPIPE_CORE_SHARE": "sometimes"},
        None,
        ["VITPIPE_MIRROR_TIMEOUT_S = '-1'", "VITPIPE_CORE_SHARE = 'sometimes'"],
    ),
]


@pytest.mark.slow  # runs vitpipe in a process per case
@pytest.mark.parametrize("case", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_with_its_credentials_redacted(case, tmp_path):
    _, env, local_yaml, words = case
    project = tmp_path / "project"
    project.mkdir()
    if local_yaml is not None:
        (project / "vitpipe.local.yaml").write_text(local_yaml)
    before = sorted(project.rglob("*"))
    p = vitpipe(project, env_for(tmp_path / "store", **env), "checkpoints")
    line = one_error(p, *words)
    assert "hunter2pass" not in p.stdout + p.stderr, line
    assert sorted(project.rglob("*")) == before  # no folder named after the address, nothing written
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_the_stage_stops_on_a_bad_setting_before_it_trains(tmp_path, prepared):
    ws = workspace(tmp_path / "ws", prepared)
    p = stage(ws, env_for(tmp_path / "store", "me:hunter2pass@nas:/ckpt"))
    one_error(p, "VITPIPE_CHECKPOINT_MIRROR", "***@nas:/ckpt")
    assert "hunter2pass" not in p.stderr and not (ws / WEIGHTS).exists()
    assert not [f for f in ws.rglob("*") if "nas" in f.name or "@" in f.name]


# ---------------------------------------------------------------------------------------
# `vitpipe checkpoints`: damage listed and removable, per clone, an unreachable mirror


def write_run(store: Path, fp: str, step: int = 3, clone: str | None = None, age_s: float = 0.0, **manifest) -> Path:
    """A run as the store writes it: a checkpoint file and its manifest."""
    run = store / fp
    run.mkdir(parents=True, exist_ok=True)
    data = os.urandom(1000)
    (run / f"step-{step:08d}.pt").write_bytes(data)
    doc = {
        "stage": STAGE,
        "fingerprint": fp,
        "step": step,
        "total_steps": 6,
        "size": len(data),
        "sha256": sha(data),
        "written": time.time() - age_s,
        "clone": clone,
    } | manifest
    (run / f"step-{step:08d}.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    return run


DAMAGE = {
    "record-a-list": ("finished.json", "[1, 2]", "is a list, not a manifest"),
    "record-wrong-type": (
        "finished.json",
        json.dumps({"kind": "finished", "fingerprint": "x", "total_steps": "six", "config": {}, "files": {}}),
        "field 'total_steps' is 'six'",
    ),
    "step-missing-key": ("step-00000009.json", json.dumps({"fingerprint": "x", "step": 9}), "field 'size' is missing"),
    "step-not-json": ("step-00000009.json", "{", "is not JSON"),
}


@pytest.mark.slow  # runs vitpipe in a process per case
@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_is_listed_as_damaged_and_rm_removes_it(damage, tmp_path):
    name, text, words = DAMAGE[damage]
    store, mirror = tmp_path / "store", tmp_path / "mirror"
    good = write_run(store, "aaaa000011112222")
    bad = store / "bbbb000011112222"
    bad.mkdir()
    (bad / name).write_text(text)
    shutil.copytree(bad, mirror / bad.name)  # the same damage in the mirror hides nothing there either
    write_run(mirror, "cccc000011112222")
    env = env_for(store, str(mirror))
    p = vitpipe(tmp_path, env, "checkpoints", "--json")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    rows = json.loads(p.stdout)  # warnings on stderr: stdout stays JSON
    kinds = sorted((r["fingerprint"], r["kind"]) for r in rows)
    assert kinds == [
        ("aaaa000011112222", "checkpoint"),
        ("bbbb000011112222", "damaged"),
        ("bbbb000011112222", "damaged"),
        ("cccc000011112222", "checkpoint"),
    ]
    (warned_local, warned_mirror) = sorted(warnings(p), key=lambda w: str(mirror) in w)
    assert words in warned_local and str(bad / name) in warned_local and "rm bbbb000011112222" in warned_local
    assert words in warned_mirror and f"{mirror}/bbbb000011112222/{name}" in warned_mirror
    table = vitpipe(tmp_path, env, "checkpoints")
    assert [line for line in table.stdout.splitlines() if "bbbb" in line and "damaged" in line]
    removed = vitpipe(tmp_path, env, "checkpoints", "rm", "bbbb")
    assert removed.returncode == 0 and removed.stdout.strip().endswith("removed bbbb000011112222"), removed.stderr
    assert not bad.exists() and not (mirror / bad.name).exists() and good.exists()
    assert vitpipe(tmp_path, env, "checkpoints").stderr == ""  # nothing damaged left


def test_rm_older_than_removes_this_clones_runs_unless_all(tmp_path):
    store = tmp_path / "store"
    here = tmp_path / "clone-here"
    (here / ".git").mkdir(parents=True)  # this_clone(): the project folder holding .git
    mine = f"{socket.gethostname()}:{here}"
    theirs = f"{socket.gethostname()}:{tmp_path / 'clone-there'}"
    write_run(store, "aaaa000011112222", clone=mine, age_s=9 * 86400)
    write_run(store, "bbbb000011112222", clone=theirs, age_s=9 * 86400)
    write_run(store, "cccc000011112222", clone=mine, age_s=60)  # mine, but recent
    env = env_for(store)
    p = vitpipe(here, env, "checkpoints", "rm", "--older-than", "7d")
    assert p.returncode == 0 and p.stdout.splitlines() == ["removed aaaa000011112222"], p.stdout + p.stderr
    (line,) = warnings(p)
    assert "left 1 old run(s) of other clones (bbbb000011112222)" in line and "--all" in line
    assert sorted(r.name for r in store.iterdir() if not r.name.startswith(".")) == [
        "bbbb000011112222",
        "cccc000011112222",
    ]
    p = vitpipe(here, env, "checkpoints", "rm", "--older-than", "7d", "--all")
    assert p.stdout.splitlines() == ["removed bbbb000011112222"] and not warnings(p)
    assert [r.name for r in store.iterdir() if not r.name.startswith(".")] == ["cccc000011112222"]


@pytest.mark.slow  # runs vitpipe in a process per case
def test_an_unreachable_mirror_stops_rm_in_one_line_and_the_listing_warns(tmp_path):
    store = tmp_path / "store"
    write_run(store, "aaaa000011112222", age_s=9 * 86400)
    env = env_for(
        store,
        "s3://nowhere/ckpt",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        VITPIPE_MIRROR_TIMEOUT_S="20",
    )  # nothing listens there
    p = vitpipe(tmp_path, env, "checkpoints", "rm", "--older-than", "7d")
    one_error(p, "checkpoint mirror s3://nowhere/ckpt cannot be listed", "nothing removed")
    assert (store / "aaaa000011112222").exists()  # not half a removal
    p = vitpipe(tmp_path, env, "checkpoints", "--json")
    assert p.returncode == 0 and [r["fingerprint"] for r in json.loads(p.stdout)] == ["aaaa000011112222"]
    (line,) = warnings(p)
    assert "checkpoint mirror s3://nowhere/ckpt cannot be listed" in line


def test_a_missing_mirror_folder_is_said(tmp_path):
    p = vitpipe(tmp_path, env_for(tmp_path / "store", str(tmp_path / "not-mounted")), "checkpoints")
    assert p.returncode == 0
    (line,) = warnings(p)
    assert f"checkpoint mirror {tmp_path / 'not-mounted'} does not exist" in line
    assert not (tmp_path / "not-mounted").exists()
