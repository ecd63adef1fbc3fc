"""How a :class:`bnfix.Diagnosis` reads: the text report, the side-by-side table and the chart.

Kept apart from the result types (:mod:`bnfix.diagnosis.result`, which delegate here) so the
data and its presentation can change separately; JSON stays with the types (``to_dict()``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

from bnfix.tables import fmt_float as _fmt
from bnfix.tables import fmt_percent as _pct
from bnfix.tables import render_table

if TYPE_CHECKING:
    from bnfix.diagnosis.result import Diagnosis

__all__ = ["layer_table", "plot_drift", "side_by_side", "text"]


def layer_table(diagnosis: Diagnosis) -> str:
    """Per-layer drift, largest first (unused layers last)."""
    reference = any(layer.reference_drift is not None for layer in diagnosis.layers)
    headers = ["layer", "C", "shift", "shift max", "|log var|", "|log var| max"]
    if diagnosis.has_dropout:
        headers += ["drop var", "vs train"]
    if reference:
        headers += ["vs ref", "ref vs data"]
    rows = []
    ordered = diagnosis.ranked() + [layer for layer in diagnosis.layers if not layer.used]
    for layer in ordered:
        row = [
            layer.name + ("" if layer.used else " (unused)"),
            str(layer.channels),
            _fmt(layer.mean_shift),
            _fmt(layer.mean_shift_max),
            _fmt(layer.log_var_ratio),
            _fmt(layer.log_var_ratio_max),
        ]
        if diagnosis.has_dropout:
            row += [_fmt(layer.dropout_var_ratio), _fmt(layer.train_drift)]
        if reference:
            row += [_fmt(layer.reference_drift), _fmt(layer.shift_drift)]
        rows.append(row)
    return render_table(headers, rows)


def text(diagnosis: Diagnosis) -> str:
    """The whole report: verdict, outputs table, layer table, warnings."""
    lines = [
        f"bnfix diagnose: {diagnosis.samples} samples in {diagnosis.batches} batch(es), "
        f"{len(diagnosis.layers)} BatchNorm layer(s), {diagnosis.seconds:.2f} s",
        "",
        "verdict (most likely first):",
    ]
    for i, v in enumerate(diagnosis.verdict, 1):
        numbers = ", ".join(f"{k}={_evidence(x)}" for k, x in v.evidence.items())
        lines += [
            f"  {i}. {v.cause} ({v.confidence}): {v.explanation}",
            f"     evidence: {numbers}",
            f"     fix: {v.fix}",
        ]
    exact_top1 = diagnosis.exact.top1 if diagnosis.exact is not None else None
    exact_loss = diagnosis.exact.loss if diagnosis.exact is not None else None
    gap_rows = [
        ["top-1", _pct(diagnosis.eval.top1), _pct(diagnosis.train_bn.top1), _pct(exact_top1)],
        [
            "loss",
            _fmt(diagnosis.eval.loss, 4),
            _fmt(diagnosis.train_bn.loss, 4),
            _fmt(exact_loss, 4),
        ],
        ["agreement with eval", "", _pct(diagnosis.agreement), _pct(diagnosis.exact_agreement)],
        ["KL(. || eval)", "", _fmt(diagnosis.kl, 4), _fmt(diagnosis.exact_kl, 4)],
        [
            "output gap to eval",
            "",
            _fmt(diagnosis.output_gap, 4),
            _fmt(diagnosis.exact_output_gap, 4),
        ],
    ]
    headers = ["outputs", "eval", "train-mode BN", "eval, exact stats"]
    lines += ["", render_table(headers, gap_rows)]
    if diagnosis.layers:
        lines += ["", layer_table(diagnosis)]
        if diagnosis.drift_starts is not None:
            lines.append(f"drift starts at: {diagnosis.drift_starts}")
    lines += [f"warning: {w}" for w in diagnosis.warnings]
    return "\n".join(lines)


def side_by_side(
    diagnosis: Diagnosis, other: Diagnosis, labels: Sequence[str] = ("this", "other")
) -> str:
    """Summary and per-layer drift of two diagnoses of one architecture, matched by layer name."""
    theirs = {layer.name: layer for layer in other.layers}
    a, b = labels[0], labels[1]
    rows = []
    for mine in diagnosis.layers:
        match = theirs.get(mine.name)
        row = [mine.name]
        for attribute in ("drift", "mean_shift_max", "log_var_ratio_max"):
            row += [_fmt(getattr(mine, attribute)), _fmt(getattr(match, attribute, None))]
        rows.append(row)
    headers = ["layer"]
    for name in ("drift", "shift max", "|log var| max"):
        headers += [f"{name} {a}", f"{name} {b}"]
    summary = render_table(
        ["", a, b],
        [
            ["cause", diagnosis.cause, other.cause],
            ["eval top-1", _pct(diagnosis.eval.top1), _pct(other.eval.top1)],
            ["agreement", _pct(diagnosis.agreement), _pct(other.agreement)],
            ["KL(train||eval)", _fmt(diagnosis.kl, 4), _fmt(other.kl, 4)],
        ],
    )
    return summary + "\n\n" + render_table(headers, rows)


def plot_drift(
    diagnosis: Diagnosis,
    path: Union[str, os.PathLike[str]],
    *,
    other: Optional[Diagnosis] = None,
    labels: Sequence[str] = ("this", "other"),
) -> None:
    """Save mean shift and |log var| per used layer, in execution order, as an image at ``path``.

    With ``other`` both diagnoses are drawn side by side. matplotlib is imported only here,
    through its object-oriented API, so no GUI backend is touched.

    Raises:
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Diagnosis.plot needs matplotlib, which is not installed; "
            "install it with `pip install matplotlib`"
        ) from error
    diagnoses = [(labels[0], diagnosis)] + ([(labels[1], other)] if other is not None else [])
    layers = sorted(
        (layer for layer in diagnosis.layers if layer.used),
        key=lambda layer: layer.order if layer.order is not None else 0,
    )
    names = [layer.name for layer in layers]
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 6.0))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(diagnoses)
    for k, (label, each) in enumerate(diagnoses):
        by_name = {layer.name: layer for layer in each.layers}
        xs = [i + (k - (len(diagnoses) - 1) / 2) * width for i in range(len(names))]
        shift = [(by_name[n].mean_shift or 0.0) if n in by_name else 0.0 for n in names]
        logvar = [(by_name[n].log_var_ratio or 0.0) if n in by_name else 0.0 for n in names]
        axes[0].bar(xs, shift, width=width, label=label)
        axes[1].bar(xs, logvar, width=width, label=label)
    axes[0].set_ylabel("mean shift (std units)")
    axes[1].set_ylabel("|log var ratio|")
    axes[1].set_xticks(range(len(names)))
    axes[1].set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    if other is not None:
        axes[0].legend()
    axes[0].set_title("BatchNorm running statistics vs the data (channel means)")
    fig.tight_layout()
    fig.savefig(os.fspath(path))


def _evidence(value: Any) -> str:
    if isinstance(value, float):
        return _fmt(value, 4)
    return str(value)
