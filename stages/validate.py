"""Stage validate: every key of params.yaml checked (vitpipe.check_params.check_all) before any
other stage runs, so a bad value stops `dvc repro` / `dvc exp run` before DVC removes any
stage's outputs. Its one output never changes, so a run of this stage re-runs nothing."""

from vitpipe import check_params, params, pipeline, stage
from vitpipe.atomic import write_text


def main(argv):
    check_params.check_all(params.read_yaml())
    write_text(
        pipeline.PARAMS_OK, "params.yaml passed vitpipe's checks\n"
    )  # constant: downstream stages never see it change


if __name__ == "__main__":
    stage.run(main)
