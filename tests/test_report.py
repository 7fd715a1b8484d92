"""The report stage on synthetic pipeline outputs: every section present, every finding
computed from the data (flip the data, the sentence flips), a partial pipeline still reports,
and the HTML rendering parses with the same sections, tables and embedded figures."""

import base64
import html as html_lib
import json
import re
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from vitpipe.costmodel import compute
from vitpipe.models import model_config
from vitpipe.report import HEADLINE, write_report
from vitpipe.report import analysis as an
from vitpipe.report.html import render_html
from vitpipe.report.inputs import load

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    HEADLINE,
    "1. Parameters",
    "2. Memory",
    "3. Time",
    "4. Scratch against fine-tuning",
    "5. Variants",
    "6. What it looks at",
    "7. How the cost scales",
    "8. The data",
    "9. This run",
]
PNG = b"\x89PNG\r\n\x1a\n"


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_tsv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(str(r[c]) for c in cols) + "\n" for r in rows))


TEST_IMAGES = 359
SEED_OFFSETS = (0.0, 0.01, -0.01)  # per-seed test top-1 around the run's mean (which stays `top1`)


def training_outputs(
    root: Path,
    stage: str,
    top1: float,
    accs: list[float],
    img_per_s: float,
    rss_mb: float,
    params: int,
    steps: int = 40,
    seeds=(0, 1, 2),
) -> None:
    for seed in seeds:
        seed_outputs(root, stage, seed, top1 + SEED_OFFSETS[seed % 3], accs, img_per_s, rss_mb, params, steps)


def seed_outputs(root, stage, seed, top1, accs, img_per_s, rss_mb, params, steps) -> None:
    name = stage.split("/")[-1]
    train = f"metrics/{stage}/seed-{seed}.json"
    write_json(
        root / train,
        {
            "steps": steps,
            "batch_size": 16,
            "train_loss": 1.0,
            "wall_time_s": steps * 16 / img_per_s,
            "img_per_s": img_per_s,
            "device": "cpu",
            "params": params,
            "attention": "sdpa",
            "val_acc": accs[-1],
            "best_val_acc": max(accs),
            "peak_rss_mb": rss_mb,
        },
    )
    write_json(
        root / f"metrics/evaluate/{'scratch' if stage == 'train_scratch' else name}/seed-{seed}.json",
        {
            "top1": top1,
            "top5": 1.0,
            "params": params,
            "infer_img_per_s": 900.0,
            "latency_ms": 2.0,
            "test_images": TEST_IMAGES,
        },
    )
    right = round(top1 * TEST_IMAGES)  # the first `right` test images, so better runs get a superset right
    predictions = root / "eval" / ("scratch" if stage == "train_scratch" else name) / f"seed-{seed}" / "predictions.csv"
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.write_text(
        "actual,predicted\n"
        + "".join(f"{i % 10},{i % 10 if i < right else (i + 1) % 10}\n" for i in range(TEST_IMAGES))
    )
    plots = root / "plots" / stage / f"seed-{seed}"
    write_tsv(
        plots / "train.tsv",
        [
            {
                "step": s,
                "loss": 2.0 / s,
                "lr": 0.01,
                "img_per_s": img_per_s,
                "img_per_s_per_device": img_per_s,
                "elapsed_s": s * 16 / img_per_s,
                "eta_s": 1.0,
                "memory_mb": rss_mb,
                "a_new_column": 0,
            }
            for s in range(1, steps + 1)
        ],
    )
    every = steps // len(accs)
    write_tsv(
        plots / "eval.tsv",
        [
            {"step": every * (i + 1), "val_acc": a, "val_loss": 1.0, "elapsed_s": every * (i + 1) * 16 / img_per_s}
            for i, a in enumerate(accs)
        ],
    )


def profile_outputs(root: Path, doc: dict) -> None:
    """profile/*.csv and metrics/profile.json as the profile stage writes them, with a made-up
    CPU (60 GFLOP/s, 20 GB/s) measured at 30 img/s in place of the stage's benchmark."""
    from vitpipe.costmodel.devices import Device
    from vitpipe.costmodel.table import run, to_csv, validate
    from vitpipe.hardware.probe import CALIBRATION_SPEC

    local = Device(
        "local",
        "CPU (this machine)",
        16 * 2**30,
        {"fp32": 60e9, "tf32": 60e9, "bf16": 60e9, "fp16": 60e9},
        bandwidth=20e9,
        sm_count=2,
    )
    calib = {"img_per_s": 30.0, "spec": CALIBRATION_SPEC, "num_classes": 10, "image_size": 32, "batch": 32}
    metrics, rows, device_rows = run(validate(doc["profile"]), local, calib)
    (root / "profile").mkdir(parents=True, exist_ok=True)
    (root / "profile/compute.csv").write_text(to_csv(rows))
    (root / "profile/devices.csv").write_text(to_csv(device_rows))
    write_json(root / "metrics/profile.json", metrics)


@pytest.fixture
def outputs(tmp_path):
    """A finished pipeline's outputs on the default params: scratch + vit_tiny + resnet18."""
    doc = yaml.safe_load((ROOT / "params.yaml").read_text())
    doc["data"]["image_size"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    prepared = tmp_path / "data/prepared" / doc["data"]["dataset"]
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(prepared / "train_x.npy", rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8))
    np.save(prepared / "train_y.npy", np.arange(20) % 10)
    write_json(
        prepared / "meta.json",
        {
            "dataset": "digits",
            "classes": [str(i) for i in range(10)],
            "num_classes": 10,
            "image_size": 32,
            "sizes": {"train": 20, "val": 5, "test": 5},
            "skipped_total": 0,
        },
    )
    training_outputs(tmp_path, "train_scratch", 0.40, [0.2, 0.3, 0.4, 0.45], 400.0, 800.0, 311_338)
    training_outputs(tmp_path, "finetune/vit_tiny", 0.70, [0.5, 0.6, 0.7, 0.7], 300.0, 820.0, 311_338)
    training_outputs(tmp_path, "finetune/resnet18", 0.95, [0.8, 0.9, 0.95, 0.96], 200.0, 900.0, 11_181_642)
    for name, s in (("vit_tiny", 100.0), ("resnet18", 50.0)):
        write_json(tmp_path / f"metrics/pretrain/{name}.json", {"steps": 70, "wall_time_s": s})
    profile_outputs(tmp_path, doc)
    return tmp_path


class Page(HTMLParser):
    """What a reader sees: headings, tables (cells per row) and images."""

    def __init__(self):
        super().__init__()
        self.h2, self.tables, self.images, self.links = [], [], [], []
        self._text, self._in, self._row = None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self._text, self._in = [], "h2"
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th"):
            self._row.append("")
        elif tag == "img":
            self.images.append(a)
        elif tag in ("a", "link", "script"):
            self.links.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "h2":
            self.h2.append("".join(self._text).strip())
            self._in = None

    def handle_data(self, data):
        if self._in == "h2":
            self._text.append(data)
        elif self._row is not None and self._row:
            self._row[-1] += data


def test_report_sections_figures_and_html(outputs):
    started = time.perf_counter()
    md_path, html_path = write_report(outputs)
    assert time.perf_counter() - started < 15  # the stage must stay fast
    md = md_path.read_text()
    h2 = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert [any(h.startswith(s) for h in h2) for s in SECTIONS] == [True] * len(SECTIONS), h2
    figures = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(figures) >= 7 and all((md_path.parent / f).read_bytes().startswith(PNG) for f in figures)
    # the reference's numbers next to ours
    for fact in ("31.7M", "11,689,512", "94% of the T4", "32.9", "91.94%", "4.35 h", "Dittakavi", "2022"):
        assert fact in md, fact
    # the data and the pretraining said where the reference's accuracy is named
    assert "8x8 handwritten digits upsampled to 32 px" in md and "synthetic fractal images" in md
    # means over 3 seeds with their sd and 95% interval, and the paired difference's verdict, with the test named
    assert "70.0% ± 1.0 [67.5, 72.5] against 40.0% ± 1.0 [37.5, 42.5]" in md
    assert (
        "+30.0 points; 95% CI of the difference +30.0 to +30.0 points, above zero (**holds**, by the 95% t-interval"
        in md
    )
    assert "conditional on 1 pretraining run" in md
    assert re.search(r"\d GiB \(\d+\.\d GB\)", md)  # the reference's unit (GB) beside vitpipe's GiB
    assert "does not state its precision" not in md and "fp32, as vit_jax trains" in md  # one precision for the T4
    assert md.count("Dittakavi") == 1  # the reference, named once

    page = Page()
    page.feed(html_path.read_text())
    assert page.h2 == h2
    assert len(page.tables) == md.count("\n|:") + md.count("\n|-")  # one <table> per pipe table
    for table in page.tables:
        assert len({len(row) for row in table}) == 1, table[0]  # every row as wide as the header
    assert len(page.images) == len(figures)
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,") and img["alt"]
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(PNG)
    assert not [link for link in page.links if link[0] in ("link", "script")]  # self-contained, no scripts


def test_findings_follow_the_data(outputs):
    inputs = load(outputs)
    claims, facts = an.finetune_claims(inputs)
    # equal steps; time without and with pretraining (equal compute is the studies pipeline's)
    assert [c.verdict for c in claims] == [an.HOLDS, an.HOLDS, an.FAILS]
    assert facts["target"] == 0.45 and facts["spacing"] == 10
    # scratch reaches 45% at step 40 (1.6 s) on every seed, fine-tuning at step 10 (0.53 s) + 100 s of pretraining
    assert facts["time_without_pretraining"] == pytest.approx(
        (10 * 16 / 300, 10 * 16 / 300, 10 * 16 / 300, 1.6, 1.6, 1.6)
    )
    assert "evaluated every 10 steps" in claims[1].this_run and "(100 s of pretraining included)" in claims[2].this_run

    for t, d in zip(inputs.scratch.tests, (0.0, 0.01, -0.01)):  # scratch now better than fine-tuning
        t["top1"] = 0.9 + d
    for e in inputs.scratch.evals_by_seed:
        e["val_acc"] = [0.5, 0.8, 0.9, 0.95]
    claims, facts = an.finetune_claims(inputs)
    assert [c.verdict for c in claims] == [an.FAILS, an.FAILS, an.FAILS]
    assert "fine-tuning: never" in claims[1].this_run


def test_one_seed_is_decided_image_by_image(outputs):
    """With one seed the headline is McNemar's exact test on the test images, not *inconclusive*."""
    doc = yaml.safe_load((outputs / "params.yaml").read_text())
    doc["seeds"] = [0]
    (outputs / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    md = write_report(outputs)[0].read_text()
    # seed 0: 70% (251 of 359) fine-tuned against 40% (144): 107 images right only when fine-tuned, none only from scratch
    assert (
        "McNemar's exact test on 359 test images: 107 right only by vit_tiny fine-tuned, 0 only by scratch, p = 1.2e-32"
    ) in md
    assert "(**holds**, by McNemar's exact test on seed 0's 359 test images" in md
    summary = json.loads((outputs / "metrics/summary.json").read_text())
    assert summary["finetune_minus_scratch.test"] == "images" and summary["finetune_minus_scratch.verdict"] == "holds"
    assert (
        summary["finetune_minus_scratch.only_first_right"],
        summary["finetune_minus_scratch.only_second_right"],
    ) == (107, 0)
    assert summary["finetune_minus_scratch.mcnemar_p"] == pytest.approx(2 * 0.5**107, rel=1e-2, abs=0)


def test_time_section_is_the_time_model(outputs):
    """§3: each run's predicted img/s is the time model's for that run on the profile's measured
    CPU, the calibration run is the profile stage's, the split sums to 1, and the reference's
    rows and claim 3's verdict are reference_rows()'s, as the markdown prints them."""
    from vitpipe.costmodel import reference
    from vitpipe.costmodel.devices import PRECISION_KEYS, Device, get_device

    inputs = load(outputs)
    thr = an.throughput_table(inputs).set_index("run")
    cpu = Device("cpu", "made-up CPU", 0, {k: 60e9 for k in PRECISION_KEYS}, bandwidth=20e9)  # profile_outputs'
    for run in inputs.runs:
        r = run.recipe
        cfg = model_config(run.spec, inputs.num_classes, inputs.image_size)
        want = compute.timing(cfg, r.batch_size, r.micro_batch, cpu, r.precision, r.optimizer, "sdpa")
        got = thr.loc[run.name]
        assert got.predicted_img_per_s == pytest.approx(want["train_img_per_s"], rel=1e-12)
        assert got.measured_over_predicted == pytest.approx(run.train["img_per_s"] / want["train_img_per_s"])
        assert sum(got[k] for k in an.SPLIT) == pytest.approx(1.0)
    profile = json.loads((outputs / "metrics/profile.json").read_text())
    cal = thr.loc["calibration"]
    assert (cal.img_per_s, cal.predicted_img_per_s) == (30.0, profile["local_predicted_img_per_s"])

    s = reference.REFERENCE_SETTING
    eta = an.eta_table(inputs).set_index("device")
    t4 = compute.timing(
        model_config({"arch": s["scratch"]["model"]}, s["num_classes"], s["image_size"]),
        s["batch"],
        s["scratch"]["micro_batch"],
        get_device("t4"),
        s["precision"],
        s["optimizer"],
        s["attention"],
    )
    assert eta.loc["t4", "img_per_s"] == pytest.approx(t4["train_img_per_s"])
    assert eta.loc["t4", "eta_h"] == pytest.approx(s["steps"] * s["batch"] / t4["train_img_per_s"] / 3600)
    assert (eta[list(an.SPLIT)].sum(axis=1) - 1).abs().max() < 1e-9
    assert "local" in eta.index and eta.loc["local", "eta_h"] > eta.loc["t4", "eta_h"]

    md = write_report(outputs)[0].read_text()
    sec = md.split("## 3. Time")[1].split("## 4.")[0]
    rows = reference.reference_rows()
    for r in rows:
        line = next(x for x in sec.splitlines() if x.startswith(f"| {r['run']} "))
        assert f"**{r['verdict']}**" in line and f"{r['ratio']:.2f}x" in line and r["setting"] in line, line
    scratch = an.scratch_reference_row()
    word = an.HOLDS if scratch["verdict"] == "matches" else an.FAILS
    assert f"claim 3 **{word}**" in sec and f"{scratch['predicted']:.1f} img/s" in sec
    assert s["evidence"] in sec and sec.count(s["evidence"]) == 1  # the setting, stated once with its evidence
    assert "| V100 SXM2 16GB / V100 SXM2 32GB |" in sec  # same speed, one row
    assert "MFU" not in sec and "calibrated MFU" not in md and "not tested (circular)" not in md


def test_memory_and_parameter_verdicts(outputs):
    inputs = load(outputs)
    m = an.memory_table(inputs)
    verdicts = {c.claim.split()[0]: c.verdict for c in an.memory_claims(inputs, m)}
    assert verdicts == {"ViT-B/8": an.HOLDS, "ViT-B/16": an.HOLDS, "ViT-B/32": an.FAILS}  # B/32 does not fit in PyTorch
    assert not m.fits.any() and (m.micro_batch > 0).all()
    inputs.doc["profile"]["batch_size"] = 256  # not the reference's setting: nothing to test
    assert {c.verdict for c in an.memory_claims(inputs, m)} == {an.UNTESTED}
    t = an.parameter_table()
    assert dict(zip(t.model, t.holds)) == {
        "resnet18": False,
        "resnet34": False,
        "resnet50": False,
        "resnet101": False,
        "vit_b16": True,
        "vit_l16": True,
        "vit_h14": True,
    }


def test_memory_past_one_device_replicates_or_shards(outputs):
    """ViT-L/16 and H/14 fit one T4 replicated; ViT-giant/14 fits no single T4 and shards over
    4; the state per device is the planner's (1/N of the whole under FSDP)."""
    from vitpipe.costmodel import sharding

    inputs = load(outputs)
    t = an.sharding_table(inputs).set_index(["network", "devices"])
    assert t.loc[("ViT-L/16 @224px", 4), "parallel"] == "ddp"
    assert t.loc[("ViT-H/14 @224px", 1), "parallel"] == "ddp"
    giant = "vit_giant_patch14_224 @224px"
    assert pd.isna(t.loc[(giant, 1), "parallel"]) and t.loc[(giant, 1), "fewest_devices"] == 2
    assert t.loc[(giant, 4), "parallel"] == "fsdp" and t.loc[(giant, 4), "micro_batch"] > 0
    whole = t.loc[(giant, 1), "state_gib"]
    assert t.loc[(giant, 4), "state_gib"] == pytest.approx(whole / 4, rel=1e-6) and whole > 14.8
    assert sharding.state_bytes(model_config({"arch": "vit_h14"}, 100, 224), 1) / 2**30 == pytest.approx(
        t.loc[("ViT-H/14 @224px", 1), "state_gib"]
    )
    md = write_report(outputs)[0].read_text()
    assert "replicate or shard" in md and "| vit_giant_patch14_224 @224px |" in md


def test_partial_pipeline_still_reports(outputs):
    for path in (
        "profile/compute.csv",
        "profile/devices.csv",
        "metrics/evaluate/resnet18/seed-0.json",
        "metrics/finetune/resnet18/seed-0.json",
    ):
        (outputs / path).unlink()
    md = write_report(outputs)[0].read_text()
    assert "`profile/compute.csv`" in md and "run `dvc repro profile`" in md
    assert "Missing inputs" in md and "metrics/finetune/resnet18/seed-0.json" in md


def test_time_to_accuracy(outputs):
    run = load(outputs).runs[1]  # vit_tiny: 0.5, 0.6, 0.7, 0.7 at steps 10..40
    assert an.time_to_accuracy(run, 0.6) == (20, 20 * 16 / 300.0)
    assert an.time_to_accuracy(run, 0.71) is None


def test_markdown_to_html(tmp_path):
    (tmp_path / "f.png").write_bytes(PNG + b"rest")
    md = (
        "# Title\n\nSome *em*, **bold**, `a<b>` and <script>x</script> [doc](docs/compute.md).\n\n"
        "- one\n- two `c|d`\n\n| a | b |\n|:--|--:|\n| x | 1 |\n| \\| | 2 |\n\n![A figure](f.png)\n\n"
        "![gone](missing.png)\n\n```\n<raw>\n```\n"
    )
    html = render_html(md, tmp_path)
    assert '<h1 id="title">Title</h1>' in html and "<title>Title</title>" in html
    assert "<em>em</em>" in html and "<strong>bold</strong>" in html and "<code>a&lt;b&gt;</code>" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert '<a href="docs/compute.md">doc</a>' in html
    assert "<li>two <code>c|d</code></li>" in html
    assert '<td style="text-align:left">x</td><td style="text-align:right">1</td>' in html
    assert '<td style="text-align:left">|</td>' in html
    assert "data:image/png;base64," + base64.b64encode(PNG + b"rest").decode() in html
    assert "figure not available: gone" in html and "<pre><code>&lt;raw&gt;</code></pre>" in html


def test_report_imports_nothing_heavy():
    code = "import sys, vitpipe.report; print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
# Appended to a copy of the report: after load, what the browser made of each image and table
PROBE = """<script>
window.addEventListener('load', () => {
  const seen = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                                  height: i.naturalHeight, shown: seen(i)}));
  const tables = [...document.querySelectorAll('table')].map(t => ({rows: t.rows.length, shown: seen(t)}));
  const out = document.createElement('pre');
  out.id = 'vitpipe-probe';
  out.textContent = JSON.stringify({images, tables});
  document.body.appendChild(out);
});
</script>"""


def browser_view(html: Path, tmp_path: Path) -> dict:
    """Open `html` in headless Chromium; what it decoded and laid out. Skips without a browser."""
    import shutil

    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip(
            "no Chromium on this machine (Debian: `apt-get install -y chromium`): the report is not "
            "opened in a real browser here"
        )
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=10000",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'<pre id="vitpipe-probe">(.*?)</pre>', out.stdout, re.S)
    assert found, f"Chromium gave no page back (exit {out.returncode}): {out.stderr[-1500:]}"
    return json.loads(html_lib.unescape(found.group(1)))


def test_report_in_a_real_browser(outputs, tmp_path):
    """reports/report.html as Chromium shows it: every figure decoded and laid out, every table there."""
    md_path, html_path = write_report(outputs)
    md = md_path.read_text()
    seen = browser_view(html_path, tmp_path)
    figures = [line for line in md.splitlines() if line.startswith("![")]
    assert len(seen["images"]) == len(figures) >= 7
    broken = [
        i["alt"] for i in seen["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"])
    ]
    assert not broken, f"figures the browser could not show: {broken}"
    assert len(seen["tables"]) == md.count("\n|:") + md.count("\n|-")
    assert all(t["rows"] >= 2 and t["shown"] for t in seen["tables"]), seen["tables"]
