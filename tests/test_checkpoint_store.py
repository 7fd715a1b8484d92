"""The checkpoint store: keyed by fingerprint, mirrored to a folder or a real S3-compatible
server (moto, started here on 127.0.0.1), verified uploads, torn uploads ignored, and every
bad mirror or store one clear line."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT

from vitpipe.checkpoints import mirror as checkpoint_mirror
from vitpipe.checkpoints import store as checkpoint_store
from vitpipe.checkpoints.store import CheckpointStore
from vitpipe.errors import UserError

FP = "0123456789abcdef"


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the moto server; the AWS_* variables any s3fs client here or in a
    subprocess needs to reach it."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import s3fs

    bucket = f"vitpipe-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}).mkdir(bucket)
    return bucket


def fake_checkpoint(store: CheckpointStore, step: int, size: int = 200_000) -> bytes:
    data = os.urandom(size)
    store.path(step).write_bytes(data)
    store.commit(step)
    return data


def test_settings_env_then_local_config_then_default(tmp_path, monkeypatch):
    monkeypatch.delenv("VITPIPE_CHECKPOINT_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    nested = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpabc"  # where DVC's temp experiments run
    nested.mkdir(parents=True)
    monkeypatch.chdir(nested)
    assert checkpoint_store.settings().checkpoint_dir == tmp_path / "cache" / "vitpipe" / "checkpoints"
    (tmp_path / "project" / "vitpipe.local.yaml").write_text(
        f"checkpoint_dir: {tmp_path / 'conf'}\ncheckpoint_mirror: {tmp_path / 'm'}\n"
    )
    conf = checkpoint_store.settings()
    assert (conf.checkpoint_dir, conf.checkpoint_mirror, conf.checkpoint_keep) == (
        tmp_path / "conf",
        str(tmp_path / "m"),
        False,
    )
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(tmp_path / "env"))
    assert checkpoint_store.settings().checkpoint_dir == tmp_path / "env"
    (tmp_path / "project" / "vitpipe.local.yaml").write_text("checkpoint_dri: x\n")
    with pytest.raises(UserError, match="vitpipe.local.yaml: unknown key.*checkpoint_dri.*checkpoint_dir"):
        checkpoint_store.settings()


def test_upload_is_verified_then_older_steps_go_and_a_new_machine_gets_it(tmp_path):
    mirror = tmp_path / "drive"
    store = CheckpointStore(FP, "train_scratch", 9, directory=tmp_path / "a", mirror=str(mirror))
    fake_checkpoint(store, 3)
    store.wait_for_upload()
    data = fake_checkpoint(store, 6)
    store.wait_for_upload()
    assert sorted(p.name for p in (mirror / FP).iterdir()) == ["step-00000006.json", "step-00000006.pt"]
    manifest = json.loads((mirror / FP / "step-00000006.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size"] == len(data)
    assert sorted(p.name for p in store.dir.glob("step-*")) == ["step-00000006.json", "step-00000006.pt"]

    fresh = CheckpointStore(FP, "train_scratch", 9, directory=tmp_path / "b", mirror=str(mirror))
    found = fresh.latest("fix")
    assert found.step == 6 and found.where == f"mirror {mirror}" and found.path.read_bytes() == data
    assert fresh.latest("fix").where.startswith("local store")  # downloaded once, then local


def test_the_newest_waiting_upload_wins(tmp_path):
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror=str(tmp_path / "m"))
    uploaded, real = [], store.mirror.put_checkpoint

    def slow(fp, path, step, manifest):
        uploaded.append(step)
        time.sleep(0.5 if step == 1 else 0)
        real(fp, path, step, manifest)

    store.mirror.put_checkpoint = slow
    for step in (1, 2, 3, 4):
        fake_checkpoint(store, step, size=1000)
        time.sleep(0.05)
    store.wait_for_upload()
    assert uploaded == [1, 4]  # one in flight; 2 and 3 were replaced while it ran
    assert [p.name for p in sorted((tmp_path / "m" / FP).glob("*.pt"))] == ["step-00000004.pt"]


def test_torn_and_foreign_files_in_the_mirror_are_ignored(tmp_path, capsys):
    mirror = tmp_path / "m"
    store = CheckpointStore(FP, "s", 20, directory=tmp_path / "a", mirror=str(mirror))
    data = fake_checkpoint(store, 3)
    store.wait_for_upload()
    run = mirror / FP
    (run / "step-00000006.pt").write_bytes(data[:1000])  # torn: the upload never got its manifest
    (run / "step-00000009.pt").write_bytes(os.urandom(len(data)))  # damaged after its manifest was written
    (run / "step-00000009.json").write_text(
        json.dumps({"fingerprint": FP, "step": 9, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    )
    (run / "step-00000012.pt").write_bytes(data)  # another run's files under this run's name
    (run / "step-00000012.json").write_text(
        json.dumps(
            {
                "fingerprint": "feedfacefeedface",
                "step": 12,
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    )
    fresh = CheckpointStore(FP, "s", 20, directory=tmp_path / "b", mirror=str(mirror))
    found = fresh.latest("fix")
    assert found.step == 3 and found.path.read_bytes() == data
    err = capsys.readouterr().err
    assert f"ignoring {run}/step-00000012.json in the checkpoint mirror: it belongs to another run" in err
    assert "ignoring step 9 in the checkpoint mirror" in err and "does not match its manifest" in err
    assert "step-00000006" not in err  # a torn upload is simply not a checkpoint
    assert not list(fresh.dir.glob(".*download"))


UPLOAD_KILLED = """
import sys, time
from vitpipe.checkpoints.store import CheckpointStore
store = CheckpointStore("{fp}", "s", 9, directory=sys.argv[1], mirror=sys.argv[2])
real_open = store.mirror.fs.open
def slow_open(path, mode="rb", **kw):
    f = real_open(path, mode, **kw)
    if "w" in mode:
        write = f.write
        f.write = lambda b: (print("uploading", flush=True), time.sleep(0.3), write(b))[-1]
    return f
store.mirror.fs.open = slow_open
store.path(6).write_bytes(b"x" * (40 << 20))
store.commit(6)
store.wait_for_upload()
"""


def test_a_process_killed_mid_upload_leaves_the_previous_checkpoint_in_force(tmp_path):
    mirror = tmp_path / "m"
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror=str(mirror))
    data = fake_checkpoint(store, 3)
    store.wait_for_upload()
    store.release()  # one writer per run: the process below writes it now
    p = subprocess.Popen(
        [sys.executable, "-c", UPLOAD_KILLED.format(fp=FP), str(tmp_path / "a"), str(mirror)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert p.stdout.readline().strip() == "uploading"
    time.sleep(0.5)  # one or two of the five chunks are out
    p.send_signal(signal.SIGKILL)
    p.wait()
    torn = mirror / FP / "step-00000006.pt"
    assert torn.exists() and torn.stat().st_size < 40 << 20 and not torn.with_suffix(".json").exists()
    found = CheckpointStore(FP, "s", 9, directory=tmp_path / "new-machine", mirror=str(mirror)).latest("fix")
    assert found.step == 3 and found.path.read_bytes() == data


def test_s3_mirror_roundtrip(tmp_path, s3_bucket):
    url = f"s3://{s3_bucket}/ckpt"
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror=url)
    data = fake_checkpoint(store, 4)
    store.wait_for_upload()
    assert not store._mirror_warned
    found = CheckpointStore(FP, "s", 9, directory=tmp_path / "b", mirror=url).latest("fix")
    assert (found.step, found.where, found.path.read_bytes()) == (4, f"mirror {url}", data)
    store.discard()  # a finished run: gone from the mirror too
    assert CheckpointStore(FP, "s", 9, directory=tmp_path / "c", mirror=url).latest("fix") is None


def test_unreachable_mirror_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", "s3://nowhere/ckpt")
    from test_train import recipe, train

    _, m = train(tmp_path, recipe(steps=12, checkpoint_every=4))
    assert m["steps"] == 12
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("vitpipe: warning: checkpoint mirror s3://nowhere/ckpt failed")
    assert "training goes on with local checkpoints" in warnings[0]


def test_missing_filesystem_extra_names_it(tmp_path):
    with pytest.raises(
        UserError, match=r"checkpoint mirror gs://bucket/x needs a package .*pip install 'vitpipe\[gs\]'"
    ):
        CheckpointStore(FP, "s", 9, directory=tmp_path, mirror="gs://bucket/x")
    with pytest.raises(UserError, match=r"az://c/x needs .*vitpipe\[az\]"):
        CheckpointStore(FP, "s", 9, directory=tmp_path, mirror="az://c/x")


def test_read_only_store_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits: use a filesystem nobody may write
        where = Path("/sys/vitpipe-checkpoints")
    else:
        where = tmp_path / "ro"
        where.mkdir(mode=0o500)
    with pytest.raises(UserError, match=rf"checkpoint store {where} is not writable .*set VITPIPE_CHECKPOINT_DIR"):
        CheckpointStore(FP, "s", 9, directory=where)


def test_dvc_remote_as_mirror_reuses_its_endpoint(tmp_path, monkeypatch, s3_bucket, s3_server):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    subprocess.run(["git", "init", "-q"], check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "-q"], check=True)
    subprocess.run(dvc + ["remote", "add", "-d", "store", f"s3://{s3_bucket}/dvc"], check=True)
    subprocess.run(dvc + ["remote", "modify", "store", "endpointurl", s3_server], check=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only DVC's config knows the endpoint now
    url, options, _ = checkpoint_mirror.resolve("dvc")
    assert url == f"s3://{s3_bucket}/dvc/vitpipe-checkpoints"
    assert options["client_kwargs"]["endpoint_url"] == s3_server
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror="dvc")
    data = fake_checkpoint(store, 2)
    store.wait_for_upload()
    assert not store._mirror_warned
    found = CheckpointStore(FP, "s", 9, directory=tmp_path / "b", mirror="dvc").latest("fix")
    assert found.path.read_bytes() == data


def test_dvc_mirror_without_a_default_remote(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    with pytest.raises(UserError, match="no default DVC remote; set one with `dvc remote add -d"):
        CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror="dvc")


def fake_sharded(store: CheckpointStore, step: int, world: int = 2, size: int = 50_000) -> dict[str, bytes]:
    """A folder checkpoint as a sharded run writes one: DCP's files and rest.pt into the temp
    folder, then rank 0's commit."""
    files = {
        **{f"__{r}_0.distcp": os.urandom(size) for r in range(world)},
        ".metadata": os.urandom(500),
        checkpoint_store.REST: os.urandom(2000),
    }
    tmp = store.temp_folder(step)
    tmp.mkdir(parents=True)
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    store.commit_folder(step)
    return files


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_sharded_checkpoint_folder_is_mirrored_file_by_file_and_restored_verified(where, tmp_path, request, capsys):
    """A sharded run's checkpoint is a folder: committed by a rename, its manifest holding every
    file's size and sha256; uploaded file by file (each read back), older steps dropped as
    folders, locally and in the mirror; a new machine gets it back verified, and a damaged
    file is one error naming it."""
    url = str(tmp_path / "drive") if where == "folder" else f"s3://{request.getfixturevalue('s3_bucket')}/ckpt"
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "a", mirror=url)
    fake_sharded(store, 3)
    store.wait_for_upload()
    files = fake_sharded(store, 6)
    store.wait_for_upload()
    assert not store._mirror_warned
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-00000006.dcp", "step-00000006.json"]
    manifest = json.loads((store.dir / "step-00000006.json").read_text())
    assert manifest["files"] == {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()}
    assert manifest["size"] == sum(len(b) for b in files.values())
    assert store.mirror.checkpoints(FP)[6] == manifest
    remote = sorted(p.rsplit("/", 1)[-1] for p in store.mirror.fs.ls(f"{store.mirror.root}/{FP}", detail=False))
    assert remote == ["step-00000006.dcp", "step-00000006.json"]  # step 3's folder dropped there too
    (row,) = checkpoint_store.list_runs(tmp_path / "a")
    assert row["size_bytes"] == manifest["size"]

    fresh = CheckpointStore(FP, "s", 9, directory=tmp_path / "b", mirror=url)
    found = fresh.latest("fix")
    assert (found.step, found.path, found.where) == (6, fresh.folder(6), f"mirror {url}")
    assert folder_bytes(found.path) == files and not list(fresh.dir.glob(".*"))
    assert fresh.latest("fix").where.startswith("local store")  # downloaded once, then local, verified

    shard = fresh.folder(6) / "__1_0.distcp"
    damaged = bytearray(shard.read_bytes())
    damaged[100] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    with pytest.raises(
        UserError, match=rf"checkpoint {shard} is damaged: its content does not match the sha256 .*; fix$"
    ):
        fresh.latest("fix")
    shard.write_bytes(bytes(damaged[:1000]))
    with pytest.raises(UserError, match=rf"checkpoint {shard} is damaged: 1000 bytes, written as 50000 bytes; fix$"):
        fresh.latest("fix")
    shard.unlink()
    with pytest.raises(UserError, match=rf"checkpoint {shard} is damaged: missing"):
        fresh.latest("fix")

    store.finish({}, {})  # a finished run: its checkpoint folders go, locally and in the mirror
    assert not list(store.dir.glob("step-*")) and not store.mirror.checkpoints(FP)
    assert not store.mirror.fs.glob(f"{store.mirror.root}/{FP}/step-*")


def test_a_kill_mid_write_of_a_sharded_checkpoint_leaves_the_previous_one(tmp_path):
    store = CheckpointStore(FP, "s", 9, directory=tmp_path)
    files = fake_sharded(store, 3)
    torn = store.temp_folder(6)  # killed while the processes wrote step 6: never renamed, no manifest
    torn.mkdir()
    (torn / "__0_0.distcp").write_bytes(b"x" * 10)
    again = CheckpointStore(FP, "s", 9, directory=tmp_path)
    assert not torn.exists()  # cleaned on open
    found = again.latest("fix")
    assert found.step == 3 and folder_bytes(found.path) == files


def test_a_sharded_checkpoint_missing_another_nodes_shard_is_not_committed(tmp_path):
    """Nodes that do not share the store: rank 0's temp folder lacks the shards the others wrote."""
    store = CheckpointStore(FP, "s", 9, directory=tmp_path)
    tmp = store.temp_folder(3)
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"x")
    with pytest.raises(UserError, match=r"lacks __1_0.distcp, written by other processes: every node must share"):
        store.commit_folder(
            3, {"__0_0.distcp": {"size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}, "__1_0.distcp": None}
        )  # rank 1 hashed its share where rank 0 cannot see it
    assert store.local_steps() == [] and not store.folder(3).exists()


def test_a_sharded_checkpoints_manifest_holds_the_digests_its_processes_took(tmp_path):
    """Each process hashes a share of the shards (rank 0 does not hash them all again); files
    without a digest (DCP's .metadata, rest.pt) are hashed by rank 0."""
    store = CheckpointStore(FP, "s", 9, directory=tmp_path)
    tmp = store.temp_folder(3)
    tmp.mkdir()
    for name, data in (("__0_0.distcp", b"a" * 10), ("__1_0.distcp", b"b" * 20), (".metadata", b"m")):
        (tmp / name).write_bytes(data)
    taken = {
        "__0_0.distcp": {"size": 10, "sha256": hashlib.sha256(b"a" * 10).hexdigest()},
        "__1_0.distcp": {"size": 20, "sha256": "f" * 64},
    }  # as rank 1 reported it: not hashed again here
    store.commit_folder(3, taken)
    files = json.loads((tmp_path / FP / "step-00000003.json").read_text())["files"]
    assert files == {**taken, ".metadata": {"size": 1, "sha256": hashlib.sha256(b"m").hexdigest()}}
    with pytest.raises(UserError, match="__1_0.distcp is damaged: its content does not match the sha256"):
        store.check_local(3, "fix")  # and checked against it before any load


def test_list_runs(tmp_path):
    store = CheckpointStore(FP, "finetune@vit_tiny", 9, directory=tmp_path)
    fake_checkpoint(store, 5, size=1234)
    (row,) = checkpoint_store.list_runs(tmp_path)
    assert row["stage"] == "finetune@vit_tiny" and row["fingerprint"] == FP and row["step"] == 5
    assert row["total_steps"] == 9 and row["size_bytes"] == 1234 and 0 <= row["age_s"] < 60


def test_cli_lists_and_removes(tmp_path, monkeypatch, capsys, checkpoint_store):
    from vitpipe.cli import main

    mirror = tmp_path / "drive"
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", str(mirror))
    old = CheckpointStore("aaaa111122223333", "train_scratch", 150, mirror=str(mirror))
    fake_checkpoint(old, 50, size=3000)
    old.wait_for_upload()
    for man in [*checkpoint_store.glob("aaaa*/*.json"), *mirror.glob("aaaa*/*.json")]:  # written 8 days ago
        man.write_text(json.dumps(json.loads(man.read_text()) | {"written": time.time() - 8 * 86400}))
    new = CheckpointStore("bbbb111122223333", "finetune@vit_tiny", 150)
    fake_checkpoint(new, 100, size=5000)
    new.wait_for_upload()
    assert main(["checkpoints"]) == 0
    out = capsys.readouterr().out
    assert "train_scratch" in out and "50/150" in out and "8d" in out and "finetune@vit_tiny" in out
    for fp in ("aaaa111122223333", "bbbb111122223333"):  # a row for the local store, one for the mirror
        assert len([line for line in out.splitlines() if fp in line]) == 2, out
    assert main(["checkpoints", "rm", "--older-than", "7d"]) == 0
    assert not (checkpoint_store / "aaaa111122223333").exists() and not (mirror / "aaaa111122223333").exists()
    assert (checkpoint_store / "bbbb111122223333").exists()
    assert main(["checkpoints", "rm", "cccc"]) == 2
    assert "'cccc' matches 0 stored runs" in capsys.readouterr().err
    assert main(["checkpoints", "rm", "--older-than", "soon"]) == 2
    assert "--older-than 'soon' is not an age" in capsys.readouterr().err
    assert main(["checkpoints", "rm", "bbbb"]) == 0
    assert (
        main(["checkpoints", "--json"]) == 0
        and json.loads(capsys.readouterr().out.split("removed bbbb111122223333\n")[-1]) == []
    )


# ---------------------------------------------------------------------------------------
# Finished records: a finished run comes back on any machine that shares the mirror


def _run_files(folder: Path) -> dict[str, bytes]:
    return {
        name: (folder / name).read_bytes() for name in ("model.pt", "metrics.json", "plots/train.tsv", "plots/eval.tsv")
    }


def test_finished_run_is_restored_from_the_mirror_and_a_bad_record_is_refused(tmp_path, monkeypatch, capsys):
    import shutil

    import torch
    from test_train import recipe, train

    mirror = tmp_path / "drive"
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", str(mirror))
    r = recipe(steps=8, checkpoint_every=4)
    _, metrics = train(tmp_path / "a", r)
    (fp,) = [p.name for p in mirror.iterdir()]
    # what stays: the outputs as they were written, by digest, without optimizer state or checkpoints
    assert sorted(p.name for p in (mirror / fp).iterdir()) == ["finished", "finished.json"]
    record = json.loads((mirror / fp / "finished.json").read_text())
    assert (
        record["fingerprint"] == fp
        and record["stage"] == "test"
        and set(record["files"]) == {"weights", "metrics", "train.tsv", "eval.tsv"}
    )
    original = _run_files(tmp_path / "a")
    assert (mirror / fp / "finished/weights").read_bytes() == original["model.pt"]
    assert record["files"]["weights"]["sha256"] == hashlib.sha256(original["model.pt"]).hexdigest()
    assert set(torch.load(mirror / fp / "finished/weights", weights_only=True)) == {
        "state_dict",
        "spec",
        "num_classes",
        "image_size",
    }
    capsys.readouterr()

    # a new machine (empty store), then the same machine again (its local store)
    for folder, where in (("b", f"mirror {mirror}"), ("b", f"local store {tmp_path / 'b/store' / fp}")):
        _, again = train(tmp_path / folder, r)
        err = capsys.readouterr().err
        assert err.splitlines() == [f"[test] restored the finished run {fp} from {where}"]
        assert again == metrics and _run_files(tmp_path / folder) == original  # the very bytes: no step trained
        assert not list((tmp_path / folder / "store" / fp).glob("step-*"))

    # tampered with in the mirror: refused with one line; the stage trains and records it again
    weights_file = mirror / fp / "finished/weights"
    tampered = bytearray(weights_file.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(tampered))
    train(tmp_path / "c", r)
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"vitpipe: warning: [test] refusing the finished run {fp} in mirror {mirror}: ")
    assert "does not match its manifest" in line and line.endswith("training it instead")
    assert _run_files(tmp_path / "c")["plots/train.tsv"] != original["plots/train.tsv"]  # trained: new timings
    assert weights_file.read_bytes() == _run_files(tmp_path / "c")["model.pt"]  # and recorded again

    # another run's record under this run's name: refused, trained
    train(tmp_path / "other", recipe(steps=8, checkpoint_every=4, lr=0.002))
    (other,) = {p.name for p in mirror.iterdir()} - {fp}
    shutil.rmtree(mirror / fp)
    shutil.copytree(mirror / other, mirror / fp)
    capsys.readouterr()
    train(tmp_path / "d", r)
    (line,) = capsys.readouterr().err.splitlines()
    assert f"refusing the finished run {fp} in mirror {mirror}: it belongs to another run (fingerprint {other}" in line
    assert json.loads((mirror / fp / "finished.json").read_text())["fingerprint"] == fp


def test_a_kept_finished_checkpoint_without_its_record_resumes_at_its_end(tmp_path, monkeypatch):
    from test_train import assert_identical, recipe, train, weights

    monkeypatch.setenv("VITPIPE_CHECKPOINT_KEEP", "1")
    _, first = train(tmp_path, recipe())
    first_weights, first_log = weights(tmp_path / "model.pt"), (tmp_path / "plots/train.tsv").read_text()
    (record,) = (tmp_path / "store").glob("*/finished.json")
    record.unlink()
    (kept,) = (tmp_path / "store").glob("*/step-*.pt")
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    _, again = train(tmp_path, recipe())
    # not saved again: no window in which a kill between the new file and its manifest loses the step
    assert kept.read_bytes() == kept_bytes and kept.stat().st_mtime_ns == kept_mtime
    assert (
        tmp_path / "plots/train.tsv"
    ).read_text() == first_log  # no step trained: the checkpoint's rows, timings too
    assert {k: again[k] for k in ("train_loss", "val_acc", "best_val_acc")} == {
        k: first[k] for k in ("train_loss", "val_acc", "best_val_acc")
    }
    assert_identical(first_weights, weights(tmp_path / "model.pt"))
    assert record.exists()  # and recorded again


# ---------------------------------------------------------------------------------------
# No secret leaks: credentials in a mirror URL or a DVC remote are never shown

SECRETS = (
    "AKIAFAKEKEY0001",
    "fakeSecretKey0002",
    "fakeToken0003",
    "hunter2pass",
    "FAKEDVCKEY0004",
    "fakeDvcSecret0005",
    "fakeEndpointPw0006",
    "AKIAFAKEKEY0007",
    "fakeSecretKey0008",
)


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret} leaked in:\n{text}"


def test_redact():
    assert checkpoint_mirror.redact("s3://KEY:SECRET@bucket/ckpt") == "s3://***@bucket/ckpt"
    assert (
        checkpoint_mirror.redact("failed: https://host/x?sig=abc&token=def then ssh://u:p@h/y")
        == "failed: https://host/x?*** then ssh://***@h/y"
    )
    assert checkpoint_mirror.redact("auth key=abc123 failed", ["abc123"]) == "auth key=*** failed"


@pytest.mark.slow  # runs vitpipe in a process of its own
def test_no_secret_in_a_listing_a_failing_upload_or_an_error(tmp_path, monkeypatch, capsys, s3_bucket):
    from test_train import recipe, train

    from vitpipe.cli import main

    # keys in the URL of a working mirror (moto takes any key): the listing shows the URL without them
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", f"s3://AKIAFAKEKEY0001:fakeSecretKey0002@{s3_bucket}/ckpt")
    _, metrics = train(tmp_path / "ok", recipe(steps=4, checkpoint_every=2))
    assert main(["checkpoints"]) == 0
    out, err = capsys.readouterr()
    assert f"s3://***@{s3_bucket}/ckpt/" in out and "finished" in out, out
    _assert_no_secret(out, err, json.dumps(metrics), (tmp_path / "ok/metrics.json").read_text())

    # an unreachable one (other keys: not s3fs's cached client), a token in its query: the listing warns
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(
        "VITPIPE_CHECKPOINT_MIRROR", "s3://AKIAFAKEKEY0007:fakeSecretKey0008@nowhere/c?token=fakeToken0003"
    )
    assert main(["checkpoints"]) == 0
    out, err = capsys.readouterr()
    assert "checkpoint mirror s3://***@nowhere/c?*** cannot be listed" in err  # warnings: stderr
    _assert_no_secret(out, err)

    # errors: a missing filesystem, an unknown protocol
    for url in ("ssh://user:hunter2pass@host/ckpt", "nosuch://user:hunter2pass@host/x?token=fakeToken0003"):
        with pytest.raises(UserError) as e:
            CheckpointStore(FP, "s", 9, directory=tmp_path / "e", mirror=url)
        assert "***@host" in str(e.value)
        _assert_no_secret(str(e.value))

    # the project's DVC remote, its keys and an endpoint with a password in DVC's config: a failing upload
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, check=True, capture_output=True)
    with open(repo / ".dvc/config", "a") as config:  # what `dvc remote add -d` and `dvc remote modify` write
        config.write(
            "[core]\n    remote = store\n['remote \"store\"']\n    url = s3://nowhere/dvc\n"
            "    access_key_id = FAKEDVCKEY0004\n    secret_access_key = fakeDvcSecret0005\n"
            "    endpointurl = http://user:fakeEndpointPw0006@127.0.0.1:9\n"
        )
    monkeypatch.setenv("VITPIPE_CHECKPOINT_MIRROR", "dvc")
    store = CheckpointStore(FP, "s", 9, directory=tmp_path / "dvc-store")
    fake_checkpoint(store, 3, size=1000)
    store.wait_for_upload()
    assert store._mirror_warned
    assert main(["checkpoints"]) == 0
    out, err = capsys.readouterr()
    assert "checkpoint mirror s3://nowhere/dvc/vitpipe-checkpoints failed (upload" in err
    _assert_no_secret(out, err)


def test_the_same_weights_saved_twice_are_the_same_bytes(tmp_path):
    """torch_save writes through a temp file: the archive must not carry its random name, or
    DVC sees every rerun's weights (and every stage that reads them) as changed."""
    import torch

    from vitpipe.atomic import torch_save

    state = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "spec": {"arch": "vit"}}
    for name in ("a", "b"):
        torch_save(tmp_path / name / "model.pt", state)
    first, second = ((tmp_path / n / "model.pt").read_bytes() for n in ("a", "b"))
    assert first == second
    assert torch.equal(
        torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]["w"], state["state_dict"]["w"]
    )
