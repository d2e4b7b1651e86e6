"""HTML audit report (tailor.report.audit): `write_report(root, device, version) -> Path`."""
from tailor.report.audit import ReportError, registered_version, render, write_report

__all__ = ["ReportError", "registered_version", "render", "write_report"]
