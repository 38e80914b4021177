"""Reports: report.json (the data), report.md (a table) and accuracy_vs_latency.png."""

from prune2tvm.report.model import REPORT_JSON, Report, Variant, load_report
from prune2tvm.report.write import write_report

__all__ = ["REPORT_JSON", "Report", "Variant", "load_report", "write_report"]
