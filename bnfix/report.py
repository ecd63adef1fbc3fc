"""Results as small immutable dataclasses: ``str()`` renders a table, ``to_dict()`` feeds JSON.

Collecting (calibration, evaluation), formatting (here) and printing (cli) are kept apart, as in
``torch.utils.collect_env``. ``to_dict()`` output is always valid JSON: non-finite floats (drift of
a layer whose old statistics were corrupt, say) become ``None``. The results of evaluation
(:class:`bnfix.Evaluation`, :class:`bnfix.Comparison`) live in :mod:`bnfix.scores`, the table and
JSON helpers in :mod:`bnfix.tables`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from bnfix.drift import Drift
from bnfix.tables import fmt_float, json_safe, render_table

__all__ = ["LayerReport", "Report"]


@dataclass(frozen=True)
class LayerReport:
    """One BatchNorm layer's recalibration.

    Attributes:
        name: qualified module name as the user wrote the model.
        kind: class name (BatchNorm2d, SyncBatchNorm, a subclass...).
        channels: number of channels.
        elements: elements per channel pooled (N x spatial, over every call and rank).
        batches: forward calls the layer saw (a layer used twice per forward counts twice).
        path: "fast" (read the layer's own batch statistics), "fallback" (moments computed from
            the input, for BN subclasses with their own forward) or "unused" (saw no data; kept).
        momentum: the EMA momentum used, None for exact pooling.
        drift: how far the new statistics are from the old ones (:class:`bnfix.drift.Drift`;
            zero for an unused layer); its four numbers are also attributes of the report
            (``mean_shift``, ``mean_shift_max``, ``log_var_ratio``, ``log_var_ratio_max``).
    """

    name: str
    kind: str
    channels: int
    elements: int
    batches: int
    path: str
    momentum: Optional[float]
    drift: Drift

    @property
    def mean_shift(self) -> float:
        """Mean over channels of ``|new mean - old mean| / sqrt(new var + eps)``."""
        return self.drift.mean_shift

    @property
    def mean_shift_max(self) -> float:
        """The same, worst channel."""
        return self.drift.mean_shift_max

    @property
    def log_var_ratio(self) -> float:
        """Mean over channels of ``|log((new var + eps) / (old var + eps))|``."""
        return self.drift.log_var_ratio

    @property
    def log_var_ratio_max(self) -> float:
        """The same, worst channel."""
        return self.drift.log_var_ratio_max

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, the drift's four numbers flat (as before :class:`Drift` existed)."""
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "drift"
        }
        return json_safe({**data, **self.drift.to_dict()})


@dataclass(frozen=True)
class Report:
    """What :func:`bnfix.recalibrate` did.

    Attributes:
        layers: one :class:`LayerReport` per selected layer, in model order.
        skipped_layers: ``(name, reason)`` of normalization layers left alone.
        method: "exact", "ema" (one momentum for all) or "layer" (each layer's own momentum).
        batches: batches used (over all ranks).
        samples: samples used (over all ranks).
        skipped_batches: batches skipped because a layer would see one element per channel.
        warnings: things the user should know, also sent to the ``bnfix`` logger.
        seconds: wall time of the pass.
        ranks: number of processes whose data was merged.
        relative_standard_error: with ``num_batches="auto"``, the final worst-channel standard
            error of the estimates (see :class:`bnfix.stats.SpreadTracker`), else None.
    """

    layers: tuple[LayerReport, ...]
    skipped_layers: tuple[tuple[str, str], ...] = ()
    method: str = "exact"
    batches: int = 0
    samples: int = 0
    skipped_batches: int = 0
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    ranks: int = 1
    relative_standard_error: Optional[float] = None
    _undo: Optional[Callable[[], None]] = field(default=None, repr=False, compare=False)

    @property
    def samples_per_second(self) -> float:
        """Calibration throughput."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def unused_layers(self) -> tuple[str, ...]:
        """Selected layers that saw no data and kept their statistics."""
        return tuple(layer.name for layer in self.layers if layer.path == "unused")

    def worst(self, k: int = 5) -> list[LayerReport]:
        """The ``k`` layers whose statistics moved most (by :attr:`bnfix.drift.Drift.score`)."""
        used = [layer for layer in self.layers if layer.path != "unused"]
        return sorted(used, key=lambda layer: -layer.drift.score)[:k]

    def undo(self) -> None:
        """Put back the statistics the layers had before the call, bit for bit."""
        if self._undo is not None:
            self._undo()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the captured statistics for :meth:`undo` are not included)."""
        data = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "_undo"
        }
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["samples_per_second"] = self.samples_per_second
        return json_safe(data)

    def method_text(self) -> str:
        """The method with its momentum, for the header: "exact", "ema, momentum 0.3"...

        With ``momentum="layer"`` the momenta are per layer, in the table's ``momentum`` column.
        """
        if self.method == "ema":
            momenta = sorted({f"{lr.momentum:g}" for lr in self.layers if lr.momentum is not None})
            return f"ema, momentum {', '.join(momenta)}" if momenta else "ema"
        if self.method == "layer":
            return "each layer's own EMA momentum, see the table"
        return self.method

    def __str__(self) -> str:
        head = (
            f"bnfix: recalibrated {len(self.layers) - len(self.unused_layers)} BatchNorm layer(s) "
            f"({self.method_text()}) on {self.samples} samples in {self.batches} batch(es), "
            f"{self.seconds:.2f} s ({self.samples_per_second:.0f} samples/s)"
        )
        if self.ranks > 1:
            head += f", merged over {self.ranks} ranks"
        lines = [head]
        if self.relative_standard_error is not None:
            rse = self.relative_standard_error
            lines.append(f"num_batches='auto': relative standard error of the estimates {rse:.4f}")
        per_layer = self.method == "layer"
        rows = [
            [
                layer.name,
                layer.kind,
                str(layer.channels),
                fmt_float(layer.mean_shift),
                fmt_float(layer.mean_shift_max),
                fmt_float(layer.log_var_ratio),
                fmt_float(layer.log_var_ratio_max),
            ]
            + ([f"{layer.momentum:g}" if layer.momentum is not None else "-"] if per_layer else [])
            for layer in self.worst(len(self.layers))
        ]
        if rows:
            headers = ["layer", "kind", "C", "shift", "shift max", "|log var|", "|log var| max"]
            headers += ["momentum"] if per_layer else []
            lines += ["", render_table(headers, rows)]
        for name in self.unused_layers:
            lines.append(f"unused (kept): {name}")
        for name, reason in self.skipped_layers:
            lines.append(f"skipped: {name}: {reason}")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
