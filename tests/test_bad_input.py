"""Bad input, as a demanding user meets it: a table of cases, each run the way a user runs it
(a stage script, the validate stage that guards `dvc repro`, the `vitpipe` CLI). Every case
exits 2 with exactly one line on stderr that names the culprit, no traceback, and leaves
every file already in the workspace byte-identical: the workspace holds results that are
not committed anywhere. The params cases run again through `dvc exp run -S`."""

import copy
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import MICRO, ROOT, run, write_params

SHELL_MARKER = Path("/tmp/vitpipe-shell-payload-ran")
PAYLOAD = f"v;touch {SHELL_MARKER};echo"


def set_key(doc, path, value):
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return doc


def rename_section(old, new):
    return lambda doc: {(new if k == old else k): v for k, v in doc.items()}


def with_variant(name, spec):
    def edit(doc):
        doc["variants"][name] = spec
        return doc

    return edit


# (id, edit of params.yaml: (key, value) or a function, -S override for dvc exp run (None: not
#  expressible), words the one line must hold)
PARAMS = [
    ("typo-model-key", ("model.dimm", 128), "+model.dimm=128", ["model.dimm", "did you mean `dim`"]),
    (
        "typo-variant-key",
        ("variants.vit_micro.sourse", "timm"),
        "+variants.vit_micro.sourse=timm",
        ["variants.vit_micro.sourse", "did you mean `source`"],
    ),
    ("typo-train-key", ("train.stepz", 3), "+train.stepz=3", ["train.stepz", "did you mean `steps`"]),
    ("typo-section", rename_section("train", "tran"), "+tran.steps=3", ["tran", "did you mean `train`"]),
    (
        "section-is-a-list",
        ("train", [1, 2]),
        None,  # -S refuses to turn a mapping into a list itself
        ["train", "a mapping of keys"],
    ),
    ("split-is-a-list", ("data.split", [0.7, 0.1, 0.2]), None, ["data.split", "train, val, test"]),
    (
        "split-missing-test",
        ("data.split", {"train": 0.8, "val": 0.2}),
        "~data.split.test",
        ["data.split", "exactly the keys"],
    ),
    ("split-sum", ("data.split.train", 0.8), "data.split.train=0.8", ["data.split", "sum to 1"]),
    ("split-word", ("data.split.train", "most"), "data.split.train=most", ["data.split.train", "a number"]),
    ("lr-negative", ("train.lr", -1), "train.lr=-1", ["train.lr", "> 0"]),
    ("lr-zero", ("train.lr", 0), "train.lr=0", ["train.lr", "> 0"]),
    ("lr-word", ("train.lr", "fast"), "train.lr=fast", ["train.lr", "a number"]),
    ("lr-inf", ("train.lr", float("inf")), "train.lr=inf", ["train.lr", "a number"]),
    ("lr-nan", ("train.lr", float("nan")), "train.lr=nan", ["train.lr", "a number"]),
    ("lr-huge", ("train.lr", 1e6), "train.lr=1e6", ["train.lr", "<= 10"]),
    ("steps-fraction", ("train.steps", 1.5), "train.steps=1.5", ["train.steps", "an integer"]),
    ("steps-word", ("train.steps", "many"), "train.steps=many", ["train.steps", "an integer"]),
    ("steps-zero", ("train.steps", 0), "train.steps=0", ["train.steps", ">= 1"]),
    ("batch-zero", ("train.batch_size", 0), "train.batch_size=0", ["train.batch_size", ">= 1"]),
    ("micro-not-divisor", ("train.micro_batch", 5), "train.micro_batch=5", ["train.micro_batch", "divisor"]),
    ("micro-above-batch", ("train.micro_batch", 32), "train.micro_batch=32", ["train.micro_batch", "divisor"]),
    ("warmup-too-long", ("train.warmup_steps", 6), "train.warmup_steps=6", ["train.warmup_steps", "fewer than"]),
    ("precision", ("train.precision", "fp8"), "train.precision=fp8", ["train.precision", "bf16"]),
    ("optimizer", ("train.optimizer", "lamb"), "train.optimizer=lamb", ["train.optimizer", "adamw"]),
    ("momentum-one", ("finetune.momentum", 1.0), "finetune.momentum=1.0", ["finetune.momentum", "< 1"]),
    ("smoothing-one", ("train.label_smoothing", 1), "train.label_smoothing=1", ["train.label_smoothing", "< 1"]),
    ("seed-negative", ("pretrain.seed", -1), "pretrain.seed=-1", ["pretrain.seed", ">= 0"]),
    ("seed-too-big", ("pretrain.seed", 2**40), f"pretrain.seed={2**40}", ["pretrain.seed", "4294967295"]),
    ("seed-in-train", ("train.seed", 1), "+train.seed=1", ["train.seed", "not a known key of train"]),
    ("seeds-negative", ("seeds", [-1]), "seeds=[-1]", ["seeds[0]", ">= 0"]),
    ("seeds-repeated", ("seeds", [0, 0]), "seeds=[0,0]", ["seeds", "distinct"]),
    ("seeds-empty", ("seeds", []), "seeds=[]", ["seeds", "non-empty list"]),
    ("nproc-split", ("train.nproc", 3), "train.nproc=3", ["train.nproc", "divides"]),
    ("resume-word", ("train.resume", "maybe"), "train.resume=maybe", ["train.resume", "fresh"]),
    (
        "bool-word",
        ("train.activation_checkpointing", "maybe"),
        "train.activation_checkpointing=maybe",
        ["train.activation_checkpointing", "true or false"],
    ),
    ("clip-zero", ("train.grad_clip", 0), "train.grad_clip=0", ["train.grad_clip", "> 0"]),
    ("eval-every-zero", ("train.eval_every", 0), "train.eval_every=0", ["train.eval_every", ">= 1"]),
    ("dataset", ("data.dataset", "imagenet"), "data.dataset=imagenet", ["data.dataset", "cifar100"]),
    ("image-size-zero", ("data.image_size", 0), "data.image_size=0", ["data.image_size", ">= 8"]),
    ("image-size-patch", ("data.image_size", 18), "data.image_size=18", ["model.patch", "divisible"]),
    ("workers-zero", ("data.workers", 0), "data.workers=0", ["data.workers", ">= 1"]),
    ("md5", ("data.md5", "abc"), "data.md5=abc", ["data.md5", "32-hex-digit"]),
    ("arch", ("model.arch", "vit_huge_thing"), "model.arch=vit_huge_thing", ["model.arch", "resnet18"]),
    ("heads", ("model.heads", 3), "model.heads=3", ["model.heads", "divisor of dim"]),
    ("mlp-negative", ("model.mlp_ratio", -1), "model.mlp_ratio=-1", ["model.mlp_ratio", "> 0"]),
    ("resnet-with-patch", ("model", {"arch": "resnet18", "patch": 4}), None, ["model.patch", "ResNet"]),
    ("no-arch", ("model", {"patch": 4, "dim": 32}), None, ["model.arch"]),
    ("variant-shell-name", with_variant(PAYLOAD, {"arch": "resnet18"}), None, ["variants", "letters, digits"]),
    (
        "variant-source",
        ("variants.vit_micro.source", "hub"),
        "variants.vit_micro.source=hub",
        ["variants.vit_micro.source", "fractal"],
    ),
    (
        "variant-needs-weights",
        ("variants.vit_micro.source", "timm"),
        "variants.vit_micro.source=timm",
        ["variants.vit_micro.weights", "timm model name"],
    ),
    (
        "variant-override-typo",
        ("variants.vit_micro.pretrain", {"stepz": 3}),
        "+variants.vit_micro.pretrain.stepz=3",
        ["variants.vit_micro.pretrain.stepz", "did you mean `steps`"],
    ),
    (
        "variant-override-list",
        ("variants.vit_micro.finetune", [1]),
        "+variants.vit_micro.finetune=[1]",
        ["variants.vit_micro.finetune", "a mapping of keys"],
    ),
    (
        "variant-override-range",
        ("variants.vit_micro.finetune", {"lr": -1}),
        "+variants.vit_micro.finetune.lr=-1",
        ["variants.vit_micro.finetune.lr", "> 0"],
    ),
    ("no-variants", ("variants", {}), None, ["variants", "at least one variant"]),
    ("fractal-classes", ("pretrain.classes", 1), "pretrain.classes=1", ["pretrain.classes", ">= 2"]),
    ("evaluate-batch", ("evaluate.batch_size", -5), "evaluate.batch_size=-5", ["evaluate.batch_size", ">= 1"]),
    (
        "evaluate-word",
        ("evaluate.latency_batches", "x"),
        "evaluate.latency_batches=x",
        ["evaluate.latency_batches", "an integer"],
    ),
    ("profile-device", ("profile.device", "tpu"), "profile.device=tpu", ["profile.device", "h100-80"]),
    ("profile-mfu", ("profile.mfu", 2), "+profile.mfu=2", ["profile.mfu", "<= 1"]),
    ("profile-models", ("profile.models", []), "profile.models=[]", ["profile.models", "non-empty list"]),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory, prepared):
    """A workspace after a good run whose results are not committed: params, data, results."""
    ws = tmp_path_factory.mktemp("template")
    write_params(ws / "params.yaml", MICRO)
    shutil.copytree(prepared, ws / "data")
    files = {
        "metrics/train_scratch/seed-0.json": '{"train_loss": 1.234, "val_acc": 0.5}\n',
        "metrics/evaluate/scratch/seed-0.json": '{"top1": 0.61}\n',
        "plots/train_scratch/seed-0/train.tsv": "step\tloss\n1\t2.3\n2\t2.2\n",
        "reports/report.md": "# a report nobody committed yet\n",
    }
    for name, text in files.items():
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_text(text)
    (ws / "models/scratch/seed-0").mkdir(parents=True)
    (ws / "models/scratch/seed-0/model.pt").write_bytes(os.urandom(4096))
    return ws


def snapshot(root: Path, skip=(".git", ".dvc")) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in skip or not p.is_file() or p.is_symlink():
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PROGRESS = re.compile(r"\d+/\d+ \[")  # tqdm's progress bar, which a training stage draws on stderr


def one_line(p: subprocess.CompletedProcess, words) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip() and not PROGRESS.search(line)]
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("vitpipe: error: "), p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def edit_params(ws: Path, edit):
    doc = copy.deepcopy(MICRO)
    doc = edit(doc) if callable(edit) else set_key(doc, *edit)
    (ws / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def workspace(tmp_path, template) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(template, ws, symlinks=True)
    return ws


def stage(ws, name, *args, **kw):
    return run([sys.executable, str(ROOT / "stages" / name), *args], ws, check=False, **kw)


@pytest.mark.slow  # a stage process per case
@pytest.mark.parametrize("case", PARAMS, ids=[c[0] for c in PARAMS])
def test_bad_param_is_one_line_and_touches_nothing(tmp_path, template, case):
    _, edit, _, words = case
    ws = workspace(tmp_path, template)
    edit_params(ws, edit)
    before = snapshot(ws)
    SHELL_MARKER.unlink(missing_ok=True)
    one_line(stage(ws, "validate.py"), words)
    assert snapshot(ws) == before
    assert not SHELL_MARKER.exists()


@pytest.mark.slow  # a stage process per case
def test_numeric_strings_are_numbers(tmp_path, template):
    """`lr: 2e-3` reads as a string in YAML 1.1; it is the number the user wrote."""
    from vitpipe import params

    ws = workspace(tmp_path, template)
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("lr: 0.001", "lr: 2e-3"))
    doc = params.read_yaml(ws / "params.yaml")
    assert doc["train"]["lr"] == "2e-3"  # what PyYAML hands over
    assert params.train_params(doc, "train").lr == 0.002
    assert params.train_params(set_key(copy.deepcopy(MICRO), "train.steps", "12"), "train").steps == 12
    assert stage(ws, "validate.py").returncode == 0


# ---------------------------------------------------------------------------------------
# Files, the environment, the CLI


def _no_yaml(ws):
    (ws / "params.yaml").write_text("train:\n  lr: 0.1\n   steps: 3\n")


def _yaml_list(ws):
    (ws / "params.yaml").write_text("- train\n- model\n")


def _no_params(ws):
    (ws / "params.yaml").unlink()


def _missing_archive(ws):
    edit_params(
        ws, lambda d: set_key(set_key(d, "data.dataset", "cifar10"), "data.archive", "/nowhere/cifar-10.tar.gz")
    )


def _no_pretrained(ws):
    pass  # models/pretrained/vit_micro.pt was never made


def _no_prepared(ws):
    shutil.rmtree(ws / "data/prepared")


def _damaged_weights(ws):
    (ws / "garbage.safetensors").write_bytes(os.urandom(3000))
    edit_params(
        ws,
        lambda d: set_key(
            set_key(d, "variants.vit_micro.source", "file"), "variants.vit_micro.weights", "garbage.safetensors"
        ),
    )


def _missing_weights_file(ws):
    edit_params(
        ws,
        lambda d: set_key(
            set_key(d, "variants.vit_micro.source", "file"), "variants.vit_micro.weights", "nowhere/vit.pt"
        ),
    )


def _unknown_variant(ws):
    pass


FILES = [
    # (id, set-up, stage argv, words)
    ("params-not-yaml", _no_yaml, ["validate.py"], ["params.yaml is not valid YAML"]),
    ("params-a-list", _yaml_list, ["train_scratch.py", "0"], ["params.yaml must be a mapping"]),
    ("params-missing", _no_params, ["download.py"], ["params.yaml not found"]),
    ("archive-missing", _missing_archive, ["download.py"], ["/nowhere/cifar-10.tar.gz"]),
    ("pretrained-missing", _no_pretrained, ["finetune.py", "vit_micro", "0"], ["models/pretrained/vit_micro.pt"]),
    ("prepared-missing", _no_prepared, ["train_scratch.py", "0"], ["data/prepared/digits"]),
    ("weights-damaged", _damaged_weights, ["pretrain.py", "vit_micro"], ["garbage.safetensors"]),
    ("weights-missing", _missing_weights_file, ["pretrain.py", "vit_micro"], ["nowhere/vit.pt"]),
    (
        "evaluate-no-model",
        lambda ws: (ws / "models/scratch/seed-0/model.pt").unlink(),
        ["evaluate.py", "scratch", "0"],
        ["models/scratch/seed-0/model.pt"],
    ),
    ("unknown-variant", _unknown_variant, ["finetune.py", "nope", "0"], ["variants", "vit_micro"]),
    ("seed-not-in-seeds", _unknown_variant, ["train_scratch.py", "7"], ["seeds", "holds 7"]),
    ("seed-not-a-number", _unknown_variant, ["finetune.py", "vit_micro", "x"], ["'x' is not a seed"]),
    ("no-seed-arg", _unknown_variant, ["evaluate.py", "scratch"], ["usage: python stages/evaluate.py"]),
    ("no-variant-arg", _unknown_variant, ["pretrain.py"], ["usage: python stages/pretrain.py <variant>"]),
]


@pytest.mark.slow  # a stage process per case
@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_bad_file_is_one_line_and_touches_nothing(tmp_path, template, case):
    _, setup, argv, words = case
    ws = workspace(tmp_path, template)
    setup(ws)
    before = snapshot(ws)
    one_line(stage(ws, *argv), words)
    assert snapshot(ws) == before


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # a full disk, for this process


@pytest.mark.slow  # a stage process per case
def test_full_disk_is_one_line_and_no_half_written_file(tmp_path, template, checkpoint_store):
    ws = workspace(tmp_path, template)
    edit_params(ws, lambda d: set_key(set_key(d, "model.dim", 256), "model.depth", 2))  # weights > 64 KB
    p = subprocess.run(
        [sys.executable, str(ROOT / "stages/train_scratch.py"), "0"],
        cwd=ws,
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    line = one_line(p, ["cannot write", "free some disk space"])
    assert str(checkpoint_store) in line or "models/scratch" in line
    litter = [p for p in [*ws.rglob(".*"), *checkpoint_store.rglob(".*")] if p.is_file()]
    assert litter == []
    assert json.loads((ws / "metrics/train_scratch/seed-0.json").read_text())  # the old results, whole


@pytest.mark.slow  # a stage process per case
def test_read_only_output_folder_is_one_line(tmp_path, template):
    ws = workspace(tmp_path, template)
    shutil.rmtree(ws / "plots")
    if os.geteuid() == 0:  # root writes through permission bits: point the folder at one nobody may write
        (ws / "plots").symlink_to("/sys/kernel")
    else:
        (ws / "plots").mkdir(mode=0o500)
    before = snapshot(ws)
    line = one_line(stage(ws, "train_scratch.py", "0", env={"OMP_NUM_THREADS": "1"}), ["cannot write", "writable"])
    assert "plots" in line or "/sys/kernel" in line
    assert snapshot(ws) == before


CLI = [
    (["plan", "vit_b16", "--batch", "0"], ["--batch"]),
    (["plan", "vit_b16", "--batch", "-3"], ["--batch"]),
    (["plan", "vit_b16", "--image-size", "0"], ["--image-size"]),
    (["plan", "vit_b16", "--image-size", "100"], ["--image-size", "divisible"]),
    (["plan", "vit_b16", "--steps", "0"], ["--steps"]),
    (["plan", "vit_b16", "--num-classes", "0"], ["--num-classes"]),
    (["plan", "vit_b16", "--mfu", "0.3"], ["--mfu", "--help"]),  # an option of an older vitpipe
    (["plan", "vit_b16", "--device", "tpu"], ["tpu"]),
    (["plan", "vit_b16", "--precision", "fp8"], ["fp8"]),
    (["plan", "vit_nope99"], ["vit_nope99"]),
    (["checkpoints", "rm", "--older-than", "soon"], ["--older-than"]),
]


@pytest.mark.slow  # a stage process per case
@pytest.mark.parametrize("argv,words", CLI, ids=[" ".join(c[0][1:]) for c in CLI])
def test_cli_bad_option_is_one_line(tmp_path, argv, words):
    one_line(run([sys.executable, "-m", "vitpipe", *argv], tmp_path, check=False), words)


def test_plan_is_fast_for_any_batch():
    from vitpipe.plan import plan_model

    t = time.perf_counter()
    r = plan_model("vit_b16", batch=10**12, device="t4")
    assert time.perf_counter() - t < 10  # it used to enumerate every divisor: hours
    assert r["micro_batch"] > 0 and 10**12 % r["micro_batch"] == 0


# ---------------------------------------------------------------------------------------
# Through DVC: the params table with `dvc exp run -S`, and the data-loss case


@pytest.fixture(scope="module")
def repro_done(tmp_path_factory, reproduced_template):
    """A git + DVC repo after a good `dvc repro` whose results are not committed (a copy of the
    session's reproduced micro project)."""
    from conftest import copy_project

    root = tmp_path_factory.mktemp("dvc")
    env = {"VITPIPE_CHECKPOINT_DIR": str(root / "store")}
    return copy_project(reproduced_template[0], root / "repo"), env


def override(expr: str) -> str:
    """-S key=value for a key params.yaml has; +key=value (Hydra's append) for a new one."""
    if expr[0] in "+~":
        return expr
    node = MICRO
    for part in expr.split("=")[0].split("."):
        if not isinstance(node, dict) or part not in node:
            return "+" + expr
        node = node[part]
    return expr


# Every case runs through the validate stage above; through `dvc exp run -S` (2-3 s of DVC's
# experiment machinery each) a sample that covers every section, every kind of fault and every
# value that changes the pipeline's shape, to keep the suite's time in check.
# Through `dvc exp run`, one case per way a value reaches validate: a typo of a section, a bad
# number, a list that shapes the pipeline (seeds), a path-shaping choice (dataset), a variant's
# own override, a profile key. Every case of PARAMS is checked at the stage itself above (a
# process each); these add what DVC's runner does around it (templating, dropped outputs).
THROUGH_DVC = {"typo-section", "lr-nan", "seeds-repeated", "dataset", "variant-override-typo", "profile-device"}
DVC_CASES = [c for c in PARAMS if c[2] and c[0] in THROUGH_DVC]
# Values that change the pipeline's shape: the stages `seeds` makes (train_scratch@<seed>) or the
# paths `data.dataset` is part of. `dvc exp run` then drops the outputs of the stages that no
# longer exist before any stage (validate included) runs; cached ones come back with `dvc
# checkout`, uncached metrics of results not yet committed do not. Plain `dvc repro` keeps
# them all (test_bad_value_through_dvc_repro_loses_nothing): docs/params.md says to commit
# results before such an experiment.
SHAPE_CHANGES = {"dataset", "seeds-negative", "seeds-repeated", "seeds-empty"}


def restore(repo: Path, backup: Path) -> None:
    for p in repo.iterdir():
        if p.name not in (".git", ".dvc"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.copytree(backup, repo, dirs_exist_ok=True, symlinks=True)


@pytest.mark.slow
def test_params_table_through_dvc_exp_run(repro_done):
    repo, env = repro_done
    before = snapshot(repo, skip=(".git", ".dvc", "params.yaml"))
    backup = repo.parent / "backup"
    shutil.copytree(repo, backup, ignore=shutil.ignore_patterns(".git", ".dvc"), dirs_exist_ok=True)
    failures, needed_checkout = [], []
    for name, _, expr, words in DVC_CASES:
        p = run([sys.executable, "-m", "dvc", "exp", "run", "-S", override(expr)], repo, check=False, env=env)
        ours = [line for line in p.stderr.splitlines() if line.startswith("vitpipe: error: ")]
        ok = (
            p.returncode != 0
            and len(ours) == 1
            and all(w in ours[0] for w in words)
            and "Traceback" not in p.stderr
            and "Running stage 'validate'" in p.stdout
            and not [s for s in ("download", "train_scratch", "pretrain") if f"Running stage '{s}" in p.stdout]
        )
        if not ok:
            failures.append((name, expr, p.returncode, p.stdout[-600:], p.stderr[-600:]))
        run(["git", "checkout", "-q", "params.yaml"], repo)
        if name in SHAPE_CHANGES:  # see SHAPE_CHANGES: DVC's experiment runner, not vitpipe, drops outputs
            restore(repo, backup)
        if snapshot(repo, skip=(".git", ".dvc", "params.yaml")) != before:
            # DVC itself checks outputs out (and removes those of paths built from params,
            # data/raw/${data.dataset}) before any stage runs; they are in its cache, not lost
            run([sys.executable, "-m", "dvc", "checkout"], repo, env=env)
            needed_checkout.append(name)
        assert snapshot(repo, skip=(".git", ".dvc", "params.yaml")) == before, name
    assert not failures, [f[:3] for f in failures] + failures
    assert needed_checkout == []
    assert len(DVC_CASES) == len(THROUGH_DVC)


@pytest.mark.slow
def test_bad_value_through_dvc_repro_loses_nothing(repro_done):
    """The data-loss case: a good run's results, not committed, then a bad value. DVC used to
    delete the stage's outputs before the stage could say no."""
    repo, env = repro_done
    before = snapshot(repo, skip=(".git", ".dvc"))
    params = repo / "params.yaml"
    good = params.read_text()
    for edit in (
        ("train.lr", -1),
        with_variant(PAYLOAD, {"arch": "resnet18"}),
        ("seeds", [-1]),
        ("data.dataset", "imagenet"),
    ):
        SHELL_MARKER.unlink(missing_ok=True)
        doc = yaml.safe_load(good)
        doc = edit(doc) if callable(edit) else set_key(doc, *edit)
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        p = run([sys.executable, "-m", "dvc", "repro"], repo, check=False, env=env)
        assert p.returncode == 255, p.stdout[-2000:] + p.stderr[-2000:]  # DVC's own code for a failed stage
        assert "Running stage 'validate'" in p.stdout and "Running stage 'train_scratch'" not in p.stdout
        assert not SHELL_MARKER.exists()
        params.write_text(good)
        assert snapshot(repo, skip=(".git", ".dvc")) == before
    ok = run([sys.executable, "-m", "dvc", "repro"], repo, env=env)  # fixed: nothing to re-run but the check
    assert "Running stage 'train_scratch'" not in ok.stdout
