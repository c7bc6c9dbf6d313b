"""Inspection: what the adafuse passes found and changed in a compiled step (`adafuse diff`)."""
from .diff import Compilation, capture_step, diff_report, render_json, render_text
from .html import render_html

__all__ = ["Compilation", "capture_step", "diff_report", "render_html", "render_json", "render_text"]
