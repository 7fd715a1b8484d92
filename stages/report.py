"""Stage report: every stage's outputs -> reports/report.md, reports/figures/*.png and
reports/report.html (the same report, figures embedded)."""

import time

from vitpipe import stage


def main(argv):
    started = time.perf_counter()
    from vitpipe.report import write_report

    md, html = write_report()
    print(f"report: {md}, {html} ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    stage.run(main)
