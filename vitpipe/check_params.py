"""The whole of params.yaml checked at once, as every stage will read it: the `validate`
stage's work (and `vitpipe plan --params`'s). Stages that read one section check only that
section (`vitpipe.params`), so this module, which knows every model family and the profile
table, is no code of theirs."""

from __future__ import annotations

from vitpipe import model_specs, params
from vitpipe.costmodel.table import validate
from vitpipe.data import sources
from vitpipe.errors import ParamError


def profile_params(doc: dict) -> dict:
    return validate(params.check_section("profile", doc.get("profile"), params.SCHEMA["profile"]))


def check_all(doc: dict) -> None:
    """Every section and key of params.yaml, as every stage will read it."""
    data = params.data_params(doc)
    sources.check_split(data)
    params.seeds(doc)
    model_specs.model_spec(doc, data.image_size)
    for section in ("train", "pretrain", "finetune"):
        params.train_params(doc, section)
    variants = doc.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ParamError("variants", variants, "a mapping of at least one variant name to its spec")
    for name in variants:
        model_specs.variant_spec(doc, name, data.image_size)
        for section in ("pretrain", "finetune"):
            params.train_params(doc, section, name)
    model_specs.check_twin(doc, data.image_size)
    params.evaluate_params(doc)
    profile_params(doc)


if __name__ == "__main__":  # python -m vitpipe.check_params > docs/params.md
    print(params.reference_markdown(model_specs.MODEL, model_specs.VARIANT), end="")
