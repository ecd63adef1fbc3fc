"""Where a model's weights sit among a checkpoint's keys: the prefix, and the passengers.

A checkpoint names the model's entries with whatever prefix its training code produced: ``module.``
(DDP), ``_orig_mod.`` (``torch.compile``), the LightningModule's attribute (``model.``, ``net.``,
``student.``, ``encoder.backbone.``) and combinations of them. Next to them it may hold entries
that are not the model at all: a loss's weight, a teacher copy, EMA buffers. A fixed list of
prefixes cannot know the attribute names, so the candidates come from the keys themselves: for
every checkpoint key that ends with a model key at a ``.`` boundary, the part before it. A
candidate *fits* when every model key is there under it with the model's shape. Everything else in
the checkpoint is a passenger, carried to the output untouched. Pure functions on keys and shapes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["Match", "candidates", "match", "passengers"]


def _optional(key: str) -> bool:
    # BatchNorm checkpoints from before PyTorch 0.4.1 have no num_batches_tracked; BN fills it in
    return key.endswith("num_batches_tracked")


@dataclass(frozen=True)
class Match:
    """How well the model's keys are found under ``prefix``.

    Attributes:
        prefix: the prefix tried ("" for none).
        missing: model keys absent under it.
        conflicts: model keys present with another shape, as "key (checkpoint [..], model [..])".
    """

    prefix: str
    missing: tuple[str, ...]
    conflicts: tuple[str, ...]

    @property
    def fits(self) -> bool:
        """Every model key is there, with the model's shape."""
        return not self.missing and not self.conflicts

    def problems(self) -> str:
        """The misses and conflicts, three of each named: "missing: a, b; shape conflicts: c"."""
        parts = []
        for label, items in (("missing", self.missing), ("shape conflicts", self.conflicts)):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        return "; ".join(parts)


def candidates(model: Mapping[str, Any], state: Mapping[str, Any]) -> list[str]:
    """Every prefix under which some model key appears in ``state``, most model keys first.

    "" is always a candidate (a bare state_dict, or a model whose own keys carry the prefix).
    """
    names = set(model)
    counts: Counter[str] = Counter({"": 0})
    for key in state:
        if key in names:
            counts[""] += 1
        for cut, char in enumerate(key):
            if char == "." and key[cut + 1 :] in names:
                counts[key[: cut + 1]] += 1
    return [prefix for prefix, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def match(model: Mapping[str, Any], state: Mapping[str, Any], prefix: str) -> Match:
    """Check that every key of ``model`` is in ``state`` under ``prefix``, with the same shape."""
    missing, conflicts = [], []
    for key, value in model.items():
        stored = state.get(prefix + key)
        if stored is None:
            if not _optional(key):
                missing.append(key)
        elif isinstance(value, Tensor) and (
            not isinstance(stored, Tensor) or stored.shape != value.shape
        ):
            seen = list(stored.shape) if isinstance(stored, Tensor) else type(stored).__name__
            conflicts.append(f"{key} (checkpoint {seen}, model {list(value.shape)})")
    return Match(prefix, tuple(missing), tuple(conflicts))


def passengers(model: Mapping[str, Any], state: Mapping[str, Any], prefix: str) -> list[str]:
    """The keys of ``state`` that are not the model's under ``prefix``, in the checkpoint's order."""
    mine = {prefix + key for key in model}
    return [key for key in state if key not in mine]
