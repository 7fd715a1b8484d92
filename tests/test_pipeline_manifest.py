"""dvc.yaml is the pipeline manifest's (vitpipe/pipeline.py): the same stages, scripts, params
and outputs; and its plots follow params.yaml: for the default params and every preset, DVC's
own expansion of dvc.yaml gives every training run its curves, and every plot is a file a
stage declares (so none names a file that cannot exist)."""

import shutil
from pathlib import Path

import pytest
import yaml

from vitpipe import pipeline

ROOT = Path(__file__).resolve().parents[1]
PARAMS = [ROOT / "params.yaml", *sorted((ROOT / "presets").glob("*.yaml"))]


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def out_paths(body: dict) -> set[str]:
    return {
        next(iter(o)) if isinstance(o, dict) else o for kind in ("outs", "metrics", "plots") for o in body.get(kind, [])
    }


def test_dvc_yaml_has_the_manifests_stages_in_order():
    assert list(dvc_stages()) == [s.name for s in pipeline.stages()]


@pytest.mark.parametrize("stage", pipeline.stages(), ids=lambda s: s.name)
def test_each_stage_is_the_manifests(stage):
    st = dvc_stages()[stage.name]
    body = st.get("do", st)
    assert body["cmd"].split() == ["python", stage.script, *stage.args]
    listed = [next(iter(p)) if isinstance(p, dict) else p for p in body.get("params", [])]
    assert tuple(listed) == stage.params
    assert out_paths(body) == set(stage.outs) | {p.path for p in stage.plots}
    over = st.get("matrix") or ({"key": st["foreach"]} if "foreach" in st else {})
    assert {axis: src.strip("${}") for axis, src in over.items()} == stage.over


def test_paths_fill_in_the_templates():
    assert (
        pipeline.expand(str(pipeline.steplog(pipeline.VARIANT, pipeline.SEED)), variant="vit_tiny", seed=2)
        == str(pipeline.steplog("vit_tiny", 2))
        == "plots/finetune/vit_tiny/seed-2"
    )
    assert str(pipeline.trained_weights("scratch", 0)) == "models/scratch/seed-0/model.pt"
    assert str(pipeline.eval_metrics("resnet18", 1)) == "metrics/evaluate/resnet18/seed-1.json"


def dvc_index(params: Path, tmp_path: Path, seeds=None):
    """DVC's own reading of dvc.yaml with `params` as params.yaml: its stages, expanded."""
    from dvc.repo import Repo

    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    doc = yaml.safe_load(params.read_text())
    if seeds is not None:
        doc["seeds"] = seeds
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    Repo.init(tmp_path, no_scm=True)
    return doc, Repo(tmp_path).index


@pytest.mark.parametrize(
    "params, seeds",
    [*((p, None) for p in PARAMS), (ROOT / "params.yaml", [0, 1, 2, 3])],
    ids=[*(p.name for p in PARAMS), "params.yaml-seeds-0-3"],
)
def test_plots_follow_params(params, seeds, tmp_path):
    doc, index = dvc_index(params, tmp_path, seeds)
    plots = {str(o.def_path): st.addressing for st in index.stages for o in st.outs if o.plot}
    outs = {str(o.def_path) for st in index.stages for o in st.outs}
    expected = {
        str(pipeline.steplog(run, s) / f)
        for run in pipeline.run_names(doc)
        for s in doc["seeds"]
        for f in (pipeline.TRAIN_LOG, pipeline.EVAL_LOG)
    }
    expected |= {
        str(pipeline.pretrain_steplog(v) / f) for v in doc["variants"] for f in (pipeline.TRAIN_LOG, pipeline.EVAL_LOG)
    }
    assert expected <= set(plots)  # every run has its curves ...
    assert set(plots) <= outs  # ... and every plot is a stage's declared output
    for top in index._plots.values():  # top-level plots, if any come back, name outputs only
        for definition in top:
            for name, props in definition.items() if isinstance(definition, dict) else [(definition, None)]:
                files = list((props or {}).get("y", {})) if isinstance((props or {}).get("y"), dict) else [name]
                assert set(files) <= outs, files
    # the step logs are kept in git (cache: false), so a fresh clone draws the base revision's curves
    assert all(not o.use_cache for st in index.stages for o in st.outs if o.plot)


def test_plots_draw_columns_the_training_loop_writes():
    from vitpipe.training.steplog import EVAL_COLUMNS, TRAIN_COLUMNS

    columns = {pipeline.TRAIN_LOG: TRAIN_COLUMNS, pipeline.EVAL_LOG: EVAL_COLUMNS}
    curves = [p for s in pipeline.stages() for p in s.plots if p.path.endswith(".tsv")]
    assert len(curves) == 6  # train.tsv and eval.tsv of pretrain, train_scratch and finetune
    for p in curves:
        cols = columns[Path(p.path).name]
        assert p.props["x"] in cols and p.props["y"] in cols and p.props["title"] and p.props["y_label"], p


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pygtrie's, inside DVC's graph
def test_no_study_is_upstream_of_a_default_stage():
    """DVC's own graph of both pipelines: the studies read the default pipeline's preprocess and
    pretraining, and no default stage depends, directly or through another, on a study (the
    report follows studies/dvc.lock, which no stage writes), so `dvc repro` never runs one."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph  # an edge a -> b: a depends on b
        where = {s: s.dvcfile.relpath for s in graph.nodes}
    default = [s for s, f in where.items() if f == "dvc.yaml"]
    study = {s for s, f in where.items() if f == "studies/dvc.yaml"}
    assert default and study
    assert not [(s.addressing, u.addressing) for s in default for u in nx.descendants(graph, s) if u in study]
    read = {u.addressing for s in study for u in nx.descendants(graph, s) if u not in study}
    assert {"preprocess", "pretrain@vit_tiny"} <= read, read


def test_code_deps_hash_their_sources_only():
    """A stage's code deps are folders (vitpipe/models, ...): DVC must not hash the bytecode
    Python leaves beside the sources, or a lock written in one checkout is stale in a clone."""
    from dvc.repo import Repo

    models = ROOT / "vitpipe" / "models"
    with Repo(str(ROOT)) as repo:
        assert repo.dvcignore.is_ignored_dir(str(models / "__pycache__"))
        assert repo.dvcignore.is_ignored_file(str(models / "__pycache__" / "vit.cpython-311.pyc"))
        assert not repo.dvcignore.is_ignored_file(str(models / "vit.py"))
