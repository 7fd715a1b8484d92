"""The studies pipeline's results (studies/dvc.yaml, `dvc repro studies/dvc.yaml`) as the report
reads them: one record per study stage, each with the stage's name and whether DVC finds it
stale, so that every number printed from it can say where it comes from.

Stale: the stage itself or any stage upstream of it (the default pipeline's preprocess and
pretraining included) has changed deps, params or outputs since the stage last ran; its result
was made from other inputs than this run's. Asked of DVC's own status, so it is DVC's rule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitpipe import pipeline

STUDIES = Path("studies")
RESULTS = STUDIES / "results"
DVC_YAML = STUDIES / "dvc.yaml"


@dataclass
class Study:
    stage: str  # its DVC stage in studies/dvc.yaml ("finetune@150")
    record: dict
    stale: bool | None  # None: DVC could not say (no DVC repository here)

    @property
    def cite(self) -> str:
        """'(stage `finetune@150`)', '(stage `finetune@150`, **stale**)'."""
        mark = ", **stale**: rerun `dvc repro studies/dvc.yaml`" if self.stale else ""
        return f"(stage `{self.stage}`{mark})"


@dataclass
class Studies:
    budgets: dict[tuple[str, int], Study] = field(default_factory=dict)  # (arm, steps) -> its study
    equal_compute: Study | None = None
    crossed: Study | None = None
    data_sweep: list[Study] = field(default_factory=list)  # one per share of the training split
    pretraining: list[Study] = field(default_factory=list)
    stale_check: str = ""  # how staleness was decided, or why it could not be
    data_cnn: str = "CNN"  # the data sweep's CNN (studies/params.yaml `data_sweep.cnn`)

    @property
    def all(self) -> list[Study]:
        return [
            *self.budgets.values(),
            *(s for s in (self.equal_compute, self.crossed) if s),
            *self.data_sweep,
            *self.pretraining,
        ]

    @property
    def any_stale(self) -> bool:
        return any(s.stale for s in self.all)


def stale_stages(root: Path) -> tuple[set[str] | None, str]:
    """Names of the studies stages that are stale, by DVC's status of each stage and of every
    stage upstream of it. (None, why) where DVC cannot tell."""
    try:
        from dvc.exceptions import DvcException
        from dvc.repo import Repo
    except ImportError:
        return None, "DVC is not installed"
    try:
        repo = Repo(str(root))
    except DvcException as e:
        return None, f"no DVC repository ({type(e).__name__})"
    try:
        import networkx as nx

        graph = repo.index.graph
        changed: dict = {}

        def is_changed(stage) -> bool:
            if stage not in changed:
                changed[stage] = bool(stage.changed())
            return changed[stage]

        out = set()
        with repo.lock:  # DVC reads stage status under its repository lock (released while a stage runs)
            for stage in graph.nodes:
                if Path(stage.path).resolve() != (root / DVC_YAML).resolve():
                    continue
                # edges point from a stage to the stages it depends on
                if is_changed(stage) or any(is_changed(s) for s in nx.descendants(graph, stage)):
                    out.add(stage.name)
        return out, "DVC's status of each studies stage and of every stage upstream of it"
    except DvcException as e:
        return None, f"DVC could not read the pipelines ({e})"
    finally:
        repo.close()


def load(root: Path | str = ".", check_stale: bool = True) -> Studies:
    """Every study record under studies/results/ (none: an empty Studies)."""
    root = Path(root)
    out = Studies()
    if not (root / RESULTS).exists():
        return out
    stale, how = stale_stages(root) if check_stale else (None, "not checked")
    out.stale_check = how

    def study(path: Path) -> Study:
        record = json.loads(path.read_text())
        name = record.get("stage", path.stem)
        return Study(name, record, None if stale is None else name in stale)

    for p in sorted((root / RESULTS / "budget").glob("*.json")):
        s = study(p)
        out.budgets[(s.record["arm"], int(s.record["steps"]))] = s
    for attr in ("equal_compute", "crossed"):
        p = root / RESULTS / f"{attr}.json"
        if p.exists():
            setattr(out, attr, study(p))
    out.pretraining = [study(p) for p in sorted((root / RESULTS / "pretrain").glob("*.json"))]
    shares = [study(p) for p in (root / RESULTS / "data_sweep").glob("*.json")]
    out.data_sweep = sorted(shares, key=lambda s: s.record["fraction"])
    knobs = root / pipeline.STUDIES_PARAMS
    if knobs.exists():
        import yaml

        out.data_cnn = str(((yaml.safe_load(knobs.read_text()) or {}).get("data_sweep") or {}).get("cnn", "CNN"))
    return out


def correct(run: dict) -> list[int]:
    """A run's per-image correctness (1/0 per test image, in store order)."""
    return [1 if c == "1" else 0 for c in run["test_correct"]]
