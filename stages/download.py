"""Stage download: data.* -> data/raw/<dataset>/ (verified archives, or the embedded set)."""

from vitpipe import params, stage
from vitpipe.data.sources import get_source


def main(argv):
    cfg = params.data_params(params.read_yaml())
    get_source(cfg.dataset).fetch(cfg, cfg.raw_dir)
    print(f"download: {cfg.dataset} -> {cfg.raw_dir}")


if __name__ == "__main__":
    stage.run(main)
