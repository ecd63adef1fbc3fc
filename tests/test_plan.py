"""bnfix.plan: options validated once, with messages that name the option, the value and the fix."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from bnfix.batches import default_forward
from bnfix.plan import Plan


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_batches": 0}, ValueError, "`num_batches` to be a positive int, None or 'auto'"),
        ({"num_batches": True}, ValueError, "`num_batches`.*got True"),
        ({"num_batches": "all"}, ValueError, "`num_batches`.*got 'all'"),
        ({"num_batches": "auto", "allow_auto": False}, ValueError, "a positive int or None"),
        (
            {"momentum": 0.0},
            ValueError,
            "`momentum` to be 'exact', 'layer' or a float in \\(0, 1\\]",
        ),
        ({"momentum": 1.5}, ValueError, "`momentum`.*got 1.5"),
        ({"momentum": "ema"}, ValueError, "`momentum`.*got 'ema'"),
        ({"tol": 0}, ValueError, "`tol` to be a positive float, but got 0"),
        ({"tol": float("nan")}, ValueError, "`tol`.*got nan"),
        ({"process_group": object(), "momentum": 0.1}, ValueError, "momentum='exact' with a"),
        ({"process_group": object(), "num_batches": "auto"}, ValueError, "fixed `num_batches`"),
        ({"forward_fn": "model(x)"}, TypeError, "`forward_fn` to be callable.*got str"),
        ({"device": "gpu"}, ValueError, "`device` to be a torch.device.*got 'gpu'"),
        ({"device": 3.5}, ValueError, "`device`.*got 3.5"),
    ],
)
def test_bad_options_are_refused_with_a_specific_message(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Plan.build(**options)


def test_defaults_and_conversions() -> None:
    plan = Plan.build()
    assert (plan.limit, plan.auto, plan.momentum, plan.method) == (None, None, "exact", "exact")
    assert plan.forward is default_forward and plan.device is None and plan.process_group is None
    plan = Plan.build(num_batches=np.int64(3), momentum=np.float32(0.5), device="cpu")
    assert plan.limit == 3 and type(plan.limit) is int
    assert plan.momentum == 0.5 and type(plan.momentum) is float and plan.method == "ema"
    assert plan.device == torch.device("cpu")
    plan = Plan.build(num_batches="auto", tol=0.2, momentum="layer")
    assert (plan.limit, plan.auto, plan.method) == (None, 0.2, "layer")


def test_device_for_falls_back_to_the_model() -> None:
    model = torch.nn.Linear(2, 2)
    assert Plan.build().device_for(model) == torch.device("cpu")
    assert Plan.build(device="meta").device_for(model) == torch.device("meta")
    assert Plan.build().device_for(torch.nn.ReLU()) == torch.device("cpu")  # no parameters


def test_a_plan_is_frozen() -> None:
    plan = Plan.build()
    with pytest.raises(AttributeError):
        plan.limit = 3  # type: ignore[misc]
