"""The report stage's library: the pipeline's outputs -> reports/report.md, report.html and
figures. inputs reads them, stats holds the interval and verdict rules, analysis turns
inputs into tables and claims, figures draws, document words and lays out, html renders."""

from vitpipe.report.document import HEADLINE, write_report

__all__ = ["HEADLINE", "write_report"]
