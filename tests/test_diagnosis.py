"""bnfix.diagnose: the right cause first on models built to have it, and the model untouched."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import bnfix
from bnfix.diagnosis.result import OutputGap
from bnfix.drift import Drift
from bnfix.errors import BnfixError
from bnfix.stats import moments_of

torch.set_num_threads(1)

D, K = 16, 4
CENTERS = torch.randn(K, D, generator=torch.Generator().manual_seed(0)) * 1.2


def make_data(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n,), generator=g)
    x = CENTERS[y] + torch.randn(n, D, generator=g)
    return x * scale + shift, y


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 64) -> list[tuple[Any, Any]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


class Net(nn.Module):
    """Linear-BN-ReLU x2; optional dropout right before the first BN, optional unused branch."""

    def __init__(self, dropout: float = 0.0, aux: bool = False) -> None:
        super().__init__()
        first: list[nn.Module] = [nn.Linear(D, 32)]
        first += (
            [nn.ReLU(), nn.Dropout(dropout), nn.BatchNorm1d(32)]
            if dropout
            else [
                nn.BatchNorm1d(32),
                nn.ReLU(),
            ]
        )
        self.body = nn.Sequential(
            *first, nn.Linear(32, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, K)
        )
        if aux:
            self.aux = nn.Sequential(nn.Linear(32, 8), nn.BatchNorm1d(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train(
    model: nn.Module, steps: int, seed: int, *, lr: float = 1e-2, sgd: bool = False, bs: int = 64
) -> nn.Module:
    x, y = make_data(steps * 32, seed)
    g = torch.Generator().manual_seed(seed)
    opt = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if sgd
        else torch.optim.Adam(model.parameters(), lr=lr)
    )
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (bs,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad()  # no gradients left behind: the state checks expect none
    model.eval()
    return model


@pytest.fixture(scope="module")
def val() -> list[tuple[Any, Any]]:
    return batches(*make_data(1024, 99))


@pytest.fixture(scope="module")
def reference() -> list[tuple[Any, Any]]:
    return batches(*make_data(1024, 98))


@pytest.fixture(scope="module")
def healthy() -> Any:
    torch.manual_seed(0)
    return train(Net(), 200, 1)


@pytest.fixture(scope="module")
def averaged() -> Any:
    """Two runs from one init, parameters averaged, buffers of the first: the SWA situation.

    In training, BatchNorm removes any offset of its input (the batch mean), so runs can end far
    apart in weight space while computing the same function; their average then feeds every BN
    layer inputs the first run's running statistics do not describe, which is why SWA must
    recompute them (Izmailov et al., 2018, section 3.2). The second run's pre-BN biases are moved
    by 3 running standard deviations, a change train-mode BN cannot see, so the distance is large
    and deterministic: the average sits 1.5 standard deviations below the first run's running
    means, and its eval-mode top-1 collapses (0.25 against 1.00 with exact statistics; 0.24-0.27
    against 1.00 for each of 8 init seeds tried). The earlier fixture relied on high-LR SGD runs
    diverging, whose outcome depended on the torch version (0.92 vs 0.94 with torch 2.14.1).
    """
    torch.manual_seed(0)
    init = Net()
    a = train(copy.deepcopy(init), 200, 2)
    b = train(copy.deepcopy(init), 200, 3)
    with torch.no_grad():
        for linear, bn in ((b.body[0], b.body[1]), (b.body[3], b.body[4])):
            linear.bias.sub_(3.0 * bn.running_var.sqrt())
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.copy_((pa + pb) / 2)
    return a


def diagnose_untouched(model: nn.Module, loader: Any, **kwargs: Any) -> bnfix.Diagnosis:
    before = snapshot(model)
    result = bnfix.diagnose(model, loader, **kwargs)
    assert_unchanged(model, before, rng=True)
    return result


def check_output(result: bnfix.Diagnosis) -> None:
    data = result.to_dict()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text)["verdict"][0]["cause"] == result.cause
    for verdict in data["verdict"]:
        assert verdict["confidence"] in ("high", "medium", "low")
        assert set(verdict) >= {"cause", "confidence", "evidence", "fix"}
    assert "verdict" in str(result) and result.cause in str(result)


def test_healthy_model_is_not_a_bn_problem(healthy: nn.Module, val: Any) -> None:
    result = diagnose_untouched(healthy, val)
    assert result.cause == "bn_not_the_problem"
    assert result.verdict[0].confidence == "high"
    assert len(result.verdict) == 1
    assert result.drift_starts is None
    assert result.agreement is not None and result.agreement > 0.95
    assert result.exact is not None and result.eval.top1 is not None
    check_output(result)


def test_weight_averaging_leaves_stale_statistics(averaged: nn.Module, val: Any) -> None:
    result = diagnose_untouched(averaged, val)
    assert result.cause == "statistics_mismatch"
    assert result.verdict[0].confidence == "high"
    assert "python -m bnfix recalibrate CKPT --calib DATA" in result.verdict[0].fix
    assert "bnfix.recalibrate(model, loader)" in result.verdict[0].fix
    assert result.drift_starts == "body.1"
    assert result.exact is not None
    assert result.exact.top1 > result.eval.top1 + 0.2  # type: ignore[operator]
    check_output(result)


def test_weight_averaging_with_reference_says_stale(
    averaged: nn.Module, val: Any, reference: Any
) -> None:
    result = diagnose_untouched(averaged, val, reference=reference)
    assert result.cause == "stale_statistics"
    assert "distribution_shift" not in [v.cause for v in result.verdict]
    assert result.reference_batches == len(reference)


def test_polluted_statistics(healthy: nn.Module, val: Any) -> None:
    model = copy.deepcopy(healthy)
    model.train()
    with torch.no_grad():  # a train-mode pass over other data
        for x, _ in batches(*make_data(512, 5, shift=2.0, scale=3.0)):
            model(x)
    model.eval()
    result = diagnose_untouched(model, val)
    assert result.cause == "statistics_mismatch"
    assert result.verdict[0].confidence == "high"
    assert result.ranked()[0].name == "body.1"


def test_shifted_inputs_without_and_with_reference(healthy: nn.Module, reference: Any) -> None:
    shifted = batches(*make_data(1024, 7, shift=1.0, scale=1.5))
    plain = diagnose_untouched(healthy, shifted)
    assert plain.cause == "statistics_mismatch"
    told = diagnose_untouched(healthy, shifted, reference=reference)
    assert told.cause == "distribution_shift"
    assert "stale_statistics" not in [v.cause for v in told.verdict]
    first = told.layers[0]
    assert first.shift_drift is not None and first.shift_drift > 0.5
    assert first.reference_drift is not None and first.reference_drift < 0.1
    check_output(told)


def test_dropout_before_bn(val: Any) -> None:
    torch.manual_seed(0)
    model = train(Net(dropout=0.5), 200, 1)
    result = diagnose_untouched(model, val)
    assert result.has_dropout
    assert result.cause == "dropout_variance_shift"
    first = result.layers[0]
    assert first.dropout_var_ratio is not None and first.dropout_var_ratio > 1.5
    assert "dropout off" in result.verdict[0].fix
    # after recalibrating with dropout off (the default) the shift no longer matters
    bnfix.recalibrate(model, val)
    assert bnfix.diagnose(model, val).cause == "bn_not_the_problem"


def test_unused_branch_only_warns(val: Any) -> None:
    torch.manual_seed(0)
    model: Any = train(Net(aux=True), 200, 1)
    with torch.no_grad():  # garbage statistics that would be a cause if the layer were used
        model.aux[1].running_mean.fill_(50.0)
        model.aux[1].running_var.fill_(1e-4)
    result = diagnose_untouched(model, val)
    assert result.cause == "bn_not_the_problem"
    assert result.unused_layers == ("aux.1",)
    assert any("aux.1" in w for w in result.warnings)
    unused = result.layers[-1]
    assert not unused.used and unused.drift is None
    check_output(result)


def test_drift_numbers_match_an_independent_computation(healthy: Any, val: Any) -> None:
    """Mean shift and |log var| of the first layer from float64 moments of its actual input."""
    x = torch.cat([b[0] for b in val])
    bn = healthy.body[1]
    with torch.no_grad():
        m = moments_of(healthy.body[0](x))
    mean, var = m.mean, m.var()
    eps = bn.eps
    shift = (mean - bn.running_mean.double()).abs() / (var + eps).sqrt()
    logvar = ((var + eps) / (bn.running_var.double() + eps)).log().abs()
    # uneven batches: the pooled statistics must not depend on the split
    uneven = [(b, torch.zeros(len(b), dtype=torch.long)) for b in (x[:10], x[10:300], x[300:])]
    for loader in (val, uneven):
        layer = diagnose_untouched(healthy, loader).layers[0]
        assert layer.mean_shift == pytest.approx(float(shift.mean()), rel=1e-5)
        assert layer.mean_shift_max == pytest.approx(float(shift.max()), rel=1e-5)
        assert layer.log_var_ratio == pytest.approx(float(logvar.mean()), rel=1e-5)
        assert layer.log_var_ratio_max == pytest.approx(float(logvar.max()), rel=1e-5)


def test_conv_model_one_shot_iterator_and_no_labels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(4, 4, 3),
        nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    model.eval()
    data = [torch.randn(4, 3, 8, 8) + 2 for _ in range(3)]
    result = diagnose_untouched(model, iter(data))
    assert result.exact is None  # one pass only over a one-shot iterator
    assert result.eval.top1 is None and result.kl is not None
    assert result.batches == 3 and result.samples == 12
    check_output(result)


@pytest.mark.parametrize("fail_at", [2, 10])
def test_state_restored_when_the_model_raises(healthy: Any, fail_at: int) -> None:
    """Call 2: the batch-statistics pass (momentum 1, buffers zeroed, hooks on); call 10: the
    second pass, with the exact statistics written into the buffers meanwhile."""
    model: Any = copy.deepcopy(healthy)
    calls = {"n": 0}

    def boom(module: nn.Module, args: Any) -> None:
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyError("user error")

    handle = model.body[4].register_forward_pre_hook(boom)
    before = snapshot(model)
    with pytest.raises(KeyError, match="user error"):
        bnfix.diagnose(model, batches(*make_data(256, 4)))
    assert calls["n"] == fail_at
    assert_unchanged(model, before, rng=True)
    handle.remove()


def test_bad_arguments_and_empty_loader(healthy: nn.Module, val: Any) -> None:
    with pytest.raises(ValueError, match="num_batches"):
        bnfix.diagnose(healthy, val, num_batches=0)
    with pytest.raises(ValueError, match="num_batches"):
        bnfix.diagnose(healthy, val, num_batches="auto")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="forward_fn"):
        bnfix.diagnose(healthy, val, forward_fn=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reference"):
        bnfix.diagnose(healthy, val, reference=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        bnfix.diagnose("model", val)  # type: ignore[arg-type]
    with pytest.raises(BnfixError, match="No usable batch"):
        bnfix.diagnose(healthy, [])
    with pytest.raises(BnfixError, match="reference"):
        bnfix.diagnose(healthy, val, reference=[])


def test_num_batches_and_thresholds_recorded(healthy: nn.Module, val: Any) -> None:
    result = bnfix.diagnose(healthy, val, num_batches=2)
    assert result.batches == 2 and result.samples == 128
    assert result.thresholds["drift_small"] == 0.1
    assert all(math.isfinite(v) for v in result.thresholds.values())


def test_side_by_side_and_plot(averaged: nn.Module, val: Any, tmp_path: Any) -> None:
    before = bnfix.diagnose(averaged, val)
    model = copy.deepcopy(averaged)
    bnfix.recalibrate(model, val)
    after = bnfix.diagnose(model, val)
    assert after.cause == "bn_not_the_problem"
    assert all(layer.drift == pytest.approx(0.0, abs=1e-6) for layer in after.layers)
    table = before.side_by_side(after, labels=("averaged", "recalibrated"))
    assert "drift averaged" in table and "body.4" in table
    pytest.importorskip("matplotlib")
    path = tmp_path / "drift.png"
    before.plot(path, other=after, labels=("averaged", "recalibrated"))
    assert path.stat().st_size > 0


def test_recalibrated_dropout_model_on_shifted_data_is_shift_not_stale(
    val: Any, reference: Any
) -> None:
    """Statistics recalibrated with dropout off are compared with a dropout-off reference."""
    torch.manual_seed(0)
    model = train(Net(dropout=0.5), 200, 1)
    bnfix.recalibrate(model, reference)  # fresh statistics of training-like data, dropout off
    shifted = batches(*make_data(1024, 7, shift=1.0, scale=1.5))
    result = diagnose_untouched(model, shifted, reference=reference)
    assert result.cause == "distribution_shift"
    assert "stale_statistics" not in [v.cause for v in result.verdict]
    first = result.layers[0]
    assert first.reference_drift is not None and first.reference_drift < 0.1


def test_one_ranking_rule_for_recalibration_and_diagnosis() -> None:
    """Both reports rank layers by ``Drift.score``: the worse of the two channel means, so one
    extreme channel (max 5, mean 0.1) ranks below a shift every channel shares (0.6)."""
    spike, broad = Drift(0.1, 5.0, 0.0, 0.0), Drift(0.6, 0.6, 0.0, 0.0)
    broken = Drift(math.nan, math.nan, 0.0, 0.0)  # corrupt statistics rank first
    assert (spike.score, broad.score, broken.score) == (0.1, 0.6, math.inf)
    drifts = {"spike": spike, "broad": broad, "broken": broken}
    report = bnfix.Report(
        tuple(
            bnfix.LayerReport(n, "BatchNorm1d", 3, 10, 1, "fast", None, d)
            for n, d in drifts.items()
        )
    )
    assert [layer.name for layer in report.worst()] == ["broken", "broad", "spike"]
    layers = tuple(
        bnfix.LayerDrift(n, "BatchNorm1d", 3, i, 10, running=d)
        for i, (n, d) in enumerate(drifts.items())
    )
    nothing = bnfix.Evaluation(0, 0, {}, None)
    diagnosis = bnfix.Diagnosis((), layers, nothing, nothing, OutputGap(None, None, None))
    assert [layer.name for layer in diagnosis.ranked()] == ["broken", "broad", "spike"]
    assert [layer.drift for layer in diagnosis.ranked()] == [math.inf, 0.6, 0.1]
