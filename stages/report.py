"""Stage report: every stage's metrics and series -> reports/report.md + reports/figures/*.png."""

from vitpipe import params, stage


def main(argv):
    doc = params.read_yaml()
    data = params.data_params(doc)
    from vitpipe.report import write_report

    out = write_report(doc, data.prepared_dir)
    print(f"report: {out}")


if __name__ == "__main__":
    stage.run(main)
