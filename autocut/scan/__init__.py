"""Zoo scans: cut every timm and torchvision model, verify each against the model's own code, and
report (``autocut scan``).

- :func:`scan` runs a check over names, each model in its own forked process (timeouts, crashes
  and memory limits recorded, not fatal), appending to ``results.jsonl`` (an interrupted scan
  resumes);
- :func:`check_model` is the check: cut, body shape against the oracle, layer groups, time, memory;
- :mod:`autocut.scan.oracles` holds the oracles and the known deliberate differences;
- :func:`write_report` writes ``model_meta.json`` (the generated cut table), ``report.md`` and plots.

Example:
    >>> from autocut.scan import scan, write_report, zoo_names
    >>> scan(zoo_names("torchvision", ["resnet18"]), "scan-out", jobs=1)
    {'ok': 1}
    >>> write_report("scan-out")  # doctest: +ELLIPSIS
    [...]
"""

from autocut.scan.check import STATUSES, check_model
from autocut.scan.report import model_meta, write_report
from autocut.scan.runner import load_results, scan, zoo_names

__all__ = ["STATUSES", "check_model", "load_results", "model_meta", "scan", "write_report", "zoo_names"]
