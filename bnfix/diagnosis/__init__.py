"""Why eval mode is worse than train mode: measurements, verdict rules and the report.

:func:`bnfix.diagnose` (in :mod:`bnfix.diagnosis.measure`) runs the passes, the rules in
:mod:`bnfix.diagnosis.rules` turn the numbers into ranked causes, and
:mod:`bnfix.diagnosis.result` holds the frozen result types.
"""

from __future__ import annotations

from bnfix.diagnosis.measure import diagnose
from bnfix.diagnosis.result import Diagnosis, LayerDrift, Verdict

__all__ = ["Diagnosis", "LayerDrift", "Verdict", "diagnose"]
