"""What the README, the docs and params.yaml's comments say of the params is the schema's
(vitpipe/params.py): every stated default, and every choice a comment lists."""

import re
from pathlib import Path

import yaml

from vitpipe import params

ROOT = Path(__file__).resolve().parents[1]
OBJECTS = {
    "data": params.DataParams(),
    "train": params.TrainParams(),
    "pretrain": params.TrainParams(),
    "finetune": params.TrainParams(),
    "evaluate": params.EvaluateParams(),
}


def schema_default(key: str):
    """The default of `seeds`, `section.key`, or a key of the recipes (the same in each)."""
    if key == "seeds":
        return params.seeds({})
    section, _, name = key.rpartition(".")
    found = [getattr(o, name) for s, o in OBJECTS.items() if (s == section or not section) and hasattr(o, name)]
    assert found and all(v == found[0] for v in found), key
    return found[0]


def test_docs_params_tables_state_the_schemas_defaults():
    section, checked = None, 0
    for line in (ROOT / "docs/params.md").read_text().splitlines():
        if m := re.match(r"## `([^`]+)`", line):
            section = m.group(1)
        elif section in OBJECTS and (m := re.match(r"\| `(\w+)` \| .* \| (`[^`]*`|—) \| ", line)):
            key, shown = m.groups()
            default = getattr(OBJECTS[section], key)
            if shown == "—":  # no default: the placeholder is not an allowed value
                assert params.SCHEMA[section][key].kind in ("int",) and default < 2, (section, key)
            else:
                assert yaml.safe_load(shown.strip("`")) == default, (section, key, shown, default)
            checked += 1
    assert checked > 50
    seeds = re.search(r"## `seeds`\n\n[^\n]*default `([^`]+)`", (ROOT / "docs/params.md").read_text())
    assert yaml.safe_load(seeds.group(1)) == params.seeds({}) == [0]


def test_readme_and_docs_state_the_schemas_defaults():
    claims = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        claims += [(path.name, k, v) for k, v in re.findall(r"`([a-z_][a-z_.]*)` \(default `([^`;]+)`", text)]
        claims += [
            (path.name, k, v) for k, v in re.findall(r"^\s*(\w+): \S+\s+#\s*(\w+) \(default\)", text, re.MULTILINE)
        ]
    assert ("README.md", "seeds", "[0]") in claims
    for where, key, value in claims:
        assert yaml.safe_load(value) == schema_default(key), (where, key, value)


def test_params_yaml_comments_name_every_choice():
    section, checked = None, 0
    for line in (ROOT / "params.yaml").read_text().splitlines():
        if m := re.match(r"(\w+):", line):
            section = m.group(1)
        elif (m := re.match(r"  (\w+): .*#(.*\|.*)", line)) and section in params.SCHEMA:
            key = params.SCHEMA[section].get(m.group(1)) if isinstance(params.SCHEMA[section], dict) else None
            if key is not None and key.kind == "choice":
                words = set(re.findall(r"[\w-]+", m.group(2)))
                assert set(map(str, key.choices)) <= words, (section, m.group(1), key.choices)
                checked += 1
    assert checked >= 3
    arch = next(line for line in (ROOT / "params.yaml").read_text().splitlines() if line.startswith("  arch:"))
    assert all(family in arch for family in ("vit", "resnet", "convnext"))
