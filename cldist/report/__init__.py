"""Reporting: TensorBoard logging, live progress, summary tables, plots, report.md/.html.

Names are imported lazily so `import cldist.report` stays cheap: the TensorBoard writer pulls
in torch, and the plots pull in matplotlib, only when used.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TensorBoardLogger": "cldist.report.tensorboard",
    "Progress": "cldist.report.progress",
    "format_status_line": "cldist.report.progress",
    "write_json_atomic": "cldist.report.summary",
    "format_summary_table": "cldist.report.summary",
    "format_comparison_table": "cldist.report.summary",
    "format_summary_markdown": "cldist.report.summary",
    "format_comparison_markdown": "cldist.report.summary",
    "format_duration": "cldist.report.summary",
    "write_report": "cldist.report.report",
    "write_comparison": "cldist.report.report",
    "load_metrics": "cldist.report.report",
    "html_path": "cldist.report.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cldist.report' has no attribute {name!r}")
