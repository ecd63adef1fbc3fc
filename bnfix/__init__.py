"""bnfix: recompute BatchNorm running statistics exactly and safely, and show that it helped.

The public surface::

    report = bnfix.recalibrate(model, loader)               # exact pooled BN statistics
    result = bnfix.evaluate(model, loader, bn="train")      # exact top-k / loss counts
    comparison = bnfix.compare(model, calib_loader, val_loader)
    bnfix.bn_layers(model)                                  # what recalibrate touches
    diagnosis = bnfix.diagnose(model, loader)               # why eval is worse, nothing changed
"""

from __future__ import annotations

try:
    from bnfix.calibration import recalibrate
    from bnfix.diagnosis.measure import diagnose
    from bnfix.diagnosis.result import Diagnosis, LayerDrift, Verdict
    from bnfix.errors import BnfixError, BnfixWarning
    from bnfix.evaluation import compare, evaluate
    from bnfix.layers import bn_layers
    from bnfix.report import LayerReport, Report
    from bnfix.scores import Comparison, Evaluation, OutputGap
except KeyboardInterrupt:  # Ctrl-C while `python -m bnfix` imports torch: one line, exit 130
    from bnfix.cli.errors import exit_if_starting

    exit_if_starting()
    raise

__version__ = "0.2.0"

__all__ = [
    "BnfixError",
    "BnfixWarning",
    "Comparison",
    "Diagnosis",
    "Evaluation",
    "LayerDrift",
    "LayerReport",
    "OutputGap",
    "Report",
    "Verdict",
    "__version__",
    "bn_layers",
    "compare",
    "diagnose",
    "evaluate",
    "recalibrate",
]
