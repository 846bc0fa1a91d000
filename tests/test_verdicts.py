"""Verdicts on constructed statistics: each rule, its threshold, its evidence.

The end-to-end verdicts of real runs are in test_health.py.
"""

from __future__ import annotations

import math

import pytest

from gradexp.config import DiagnoseConfig
from gradexp.record import StepRecord
from gradexp.verdicts import KINDS, describe, describe_outcome, judge, outcome, sustained

LAYERS = ["hidden.0", "hidden.1", "hidden.2", "head"]
NAN = math.nan


def record(step: int, bwd: list[float], **kw) -> StepRecord:
    n = len(bwd)
    layers = {
        "grad_norm": kw.get("grad", [1.0] * n),
        "signal_bwd": bwd,
        "signal_fwd": [1.0] * n,
        "sat_frac": kw.get("sat", [NAN] * n),
        "dead_frac": kw.get("dead", [NAN] * n),
    }
    if "weights" in kw:
        layers["weight_norm"] = kw["weights"]
    scalars = {"grad/norm_pre_clip": kw.get("total", 1.0)}
    if "loss" in kw:
        scalars.update({"loss/train": kw["loss"], "loss/baseline": kw.get("baseline", 2.3)})
    return StepRecord(step, scalars, layers, kw.get("time", {}))


def kinds(verdicts: list[dict]) -> list[str]:
    return [v["kind"] for v in verdicts]


CFG = DiagnoseConfig()
HEALTHY = [1.0, 1.0, 1.0, 1.0]


def test_sustained_needs_consecutive_hits_and_skips_unmeasured_steps():
    below = lambda v: v < 1  # noqa: E731
    values = [(0, 0.5), (10, 2.0), (20, 0.5), (30, None), (40, 0.5), (50, 0.5), (60, 2.0)]
    found = sustained(values, below, 3)
    # 20, 40, 50: consecutive among measured steps (30 is not measured)
    assert found == {"step": 20, "value": 0.5, "until": 50, "held": "4/6"}
    assert sustained(values, below, 4) is None
    # a run shorter than `sustain` needs every measured step
    assert sustained([(0, 0.5), (1, 0.5)], below, 3)["step"] == 0
    assert sustained([(0, 0.5), (1, 2.0)], below, 3) is None
    assert sustained([(0, None)], below, 3) is None


def test_a_sound_run_has_exactly_one_verdict_healthy():
    verdicts = judge(LAYERS, [record(s, HEALTHY) for s in range(0, 50, 10)], CFG)
    assert kinds(verdicts) == ["healthy"]
    assert verdicts[0]["evidence"]["ratio"] == 1.0
    assert set(verdicts[0]) == {"kind", "layer", "step", "evidence"}


def test_vanishing_needs_the_ratio_sustained():
    bwd = [1e-4, 1e-3, 0.5, 1.0]
    # one dip: not sustained
    records = [record(s, bwd if s == 10 else HEALTHY) for s in range(0, 60, 10)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]
    # from step 20 on
    records = [record(s, bwd if s >= 20 else HEALTHY) for s in range(0, 60, 10)]
    (v,) = judge(LAYERS, records, CFG)
    assert (v["kind"], v["step"]) == ("vanishing", 20)
    # the layer nearest the output under 1e-2 of the head's signal
    assert v["layer"] == "hidden.1"
    assert v["evidence"]["ratio"] == pytest.approx(1e-4)
    assert v["evidence"]["axis"] == "depth"
    assert v["evidence"]["until"] == 50 and v["evidence"]["held"] == "4/6"
    assert "= 0.0001 < 0.01" in describe(v)


def test_threshold_is_configurable():
    records = [record(s, [0.05, 0.5, 0.8, 1.0]) for s in range(3)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]
    loose = DiagnoseConfig(vanishing_ratio=0.1)
    assert kinds(judge(LAYERS, records, loose)) == ["vanishing"]


def test_exploding_along_depth_and_past_the_bound():
    records = [record(s, [1e3, 30.0, 3.0, 1.0]) for s in range(3)]
    (v,) = judge(LAYERS, records, CFG)
    assert (v["kind"], v["layer"], v["step"]) == ("exploding", "hidden.0", 0)
    # a single spike of the total norm is enough; the layer is the largest gradient's
    records = [
        record(s, HEALTHY, total=5e4 if s == 2 else 1.0, grad=[1.0, 9.0, 2.0, 1.0])
        for s in range(4)
    ]
    (v,) = judge(LAYERS, records, CFG)
    assert (v["kind"], v["layer"], v["step"]) == ("exploding", "hidden.1", 2)
    assert v["evidence"]["value"] == 5e4


def test_unmeasurable_ratios_are_not_verdicts():
    # a head that got no gradient, NaN and inf: nothing to judge by
    records = [record(s, b) for s, b in enumerate([[1, 1, 1, 0.0], [NAN] * 4, [math.inf] * 4])]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]


def test_diverged_carries_step_and_layer_and_keeps_what_came_before():
    records = [record(s, [1e3, 30.0, 3.0, 1.0]) for s in range(3)]
    nf = {"step": 3, "layer": "hidden.2"}
    verdicts = judge(LAYERS, records, CFG, nonfinite=nf)
    assert kinds(verdicts) == ["diverged", "exploding"]
    assert (verdicts[0]["step"], verdicts[0]["layer"]) == (3, "hidden.2")
    skipped = judge(LAYERS, records[:1], CFG, nonfinite=nf, skipped=4)[0]
    assert skipped["evidence"]["skipped_steps"] == 4 and "4 steps skipped" in describe(skipped)


def test_saturated_names_the_layer_that_stays_saturated_first():
    sat = [0.1, 0.7, 0.9, NAN]
    records = [record(s, HEALTHY, sat=sat if s else [0.1] * 3 + [NAN]) for s in range(5)]
    (v,) = judge(LAYERS, records, CFG)
    assert (v["kind"], v["layer"], v["step"]) == ("saturated", "hidden.2", 1)
    assert v["evidence"]["fraction"] == 0.9 and v["evidence"]["layers_over"] == 2
    # the most saturated layer changing every step is no layer staying saturated
    hopping = [[0.9, 0.1, 0.1, NAN], [0.1, 0.9, 0.1, NAN], [0.1, 0.1, 0.9, NAN]]
    records = [record(s, HEALTHY, sat=sat) for s, sat in enumerate(hopping * 2)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]


def test_nothing_logged_no_verdict():
    assert judge(LAYERS, [], CFG) == []
    # but a run that went non-finite before it logged anything has diverged
    assert kinds(judge(LAYERS, [], CFG, nonfinite={"step": 0, "layer": "head"})) == ["diverged"]


def test_dead_units_need_units_that_never_recovered():
    records = [record(s, HEALTHY, dead=[0.0, 0.8 if s >= 2 else 0.0, 0.0, NAN]) for s in range(4)]
    recovered = [{"ever": 0.8, "recovered": 0.8, "never_recovered": 0.0}] * 3 + [None]
    assert kinds(judge(LAYERS, records, CFG, dead=recovered)) == ["healthy"]
    dead = [None, {"ever": 0.8, "recovered": 0.1, "never_recovered": 0.7}, None, None]
    (v,) = judge(LAYERS, records, CFG, dead=dead)
    assert (v["kind"], v["layer"], v["step"]) == ("dead_units", "hidden.1", 2)
    assert v["evidence"]["fraction"] == 0.7 and v["evidence"]["ever"] == 0.8
    # under the threshold (half a layer by default): not a verdict
    mild = [None, {"ever": 0.5, "recovered": 0.1, "never_recovered": 0.4}, None, None]
    assert kinds(judge(LAYERS, records, CFG, dead=mild)) == ["healthy"]


def test_recurrent_layers_are_judged_along_time():
    layers = ["recurrent.0", "head"]
    steps = [0, 10, 20, 29]

    def rec(s: int, norms: list[float]) -> StepRecord:
        return record(s, [1.0, 1.0], time={"recurrent.0": (steps, norms)})

    vanish = [rec(s, [1e-9, 1e-6, 1e-3, 1.0]) for s in range(3)]
    (v,) = judge(layers, vanish, CFG)
    assert (v["kind"], v["layer"], v["evidence"]["axis"]) == ("vanishing", "recurrent.0", "time")
    assert v["evidence"]["ratio"] == pytest.approx(1e-9)
    assert "t=0 / t=29" in v["evidence"]["quantity"]
    explode = [rec(s, [1e5, 1e3, 10.0, 1.0]) for s in range(3)]
    assert kinds(judge(layers, explode, CFG)) == ["exploding"]


def test_truncated_bptt_zeros_are_not_vanishing():
    """Before the last k-chunk the gradient is cut off by design: judge the last chunk."""
    layers = ["recurrent.0", "head"]
    steps = [0, 5, 10, 15, 20, 25, 29]
    norms = [0.0, 0.0, 0.0, 0.0, 0.0, 0.8, 1.0]  # tbptt=10: chunks start at 0, 10, 20
    records = [
        record(s, [1.0, 1.0], time={"recurrent.0": (steps, norms[:4] + [0.5, 0.8, 1.0])})
        for s in range(3)
    ]
    assert kinds(judge(layers, records, CFG, tbptt=10)) == ["healthy"]
    assert kinds(judge(layers, records, CFG, tbptt=0)) == ["vanishing"]


def test_kinds_are_the_documented_names():
    assert KINDS == ("healthy", "vanishing", "exploding", "diverged", "dead_units", "saturated")


def test_where_and_when_names_the_layers_the_span_and_the_outcome() -> None:
    from gradexp.config import DiagnoseConfig
    from gradexp.record import StepRecord
    from gradexp.verdicts import where_and_when

    names = ["hidden.0", "hidden.1", "hidden.2", "head"]

    def record(step: int, bwd: list[float]) -> StepRecord:
        return StepRecord(step, {}, {"signal_bwd": bwd})

    starved = [record(0, [1e-4, 1e-3, 0.5, 2.0]), record(10, [1e-3, 0.5, 0.5, 2.0])]
    healed = [*starved, record(20, [0.5, 0.5, 0.5, 2.0])]
    cfg = DiagnoseConfig()
    assert where_and_when(names, healed, cfg) == (
        "hidden.0-hidden.1 below 1% of the head's backward signal, steps 0-10, recovered"
    )
    assert where_and_when(names, starved, cfg).endswith("steps 0-10, to the end")
    # Relative to the head at each step (2.0 here): 0.03 / 2 = 1.5%, within the band.
    assert where_and_when(names, [record(0, [0.03, 0.5, 0.5, 2.0])], cfg) is None
    gaps = where_and_when(names, [record(0, [1e-4, 0.5, 1e-4, 2.0])], cfg)
    assert gaps.startswith("hidden.0-hidden.2 (2 of 3 layers) below 1%")
    exploding = where_and_when(names, [record(0, [500.0, 1.0, 1.0, 1.0])], cfg)
    assert exploding == "hidden.0 above 100x the head's backward signal, step 0, to the end"
    assert where_and_when(names, [], cfg) is None


# --- finite blow-ups -----------------------------------------------------------------------


def test_a_finite_loss_blow_up_is_diverged_with_its_evidence():
    # The loss climbs from 2.3 to 6e6 over steps 30..90, every value finite; the head's
    # weights grow 1000x while the others stay put.
    losses = [2.3, 2.1, 2.2, 40.0, 9e2, 3e4, 6e6, 5e6, 6e6, 6e6]
    weights = lambda k: [1.0, 1.0, 1.0, 1.0 if k < 3 else 1000.0]  # noqa: E731
    records = [
        record(10 * k, HEALTHY, loss=loss, weights=weights(k)) for k, loss in enumerate(losses)
    ]
    verdicts = judge(LAYERS, records, CFG)
    assert kinds(verdicts) == ["diverged"]
    (v,) = verdicts
    assert (v["step"], v["layer"]) == (30, "head")  # the first of 3 log steps above 10x
    e = v["evidence"]
    assert e["axis"] == "loss" and e["loss_start"] == 2.3 and e["baseline"] == 2.3
    assert e["loss"] == pytest.approx(40.0) and e["ratio"] == pytest.approx(40.0 / 2.3)
    assert (e["until"], e["held"], e["weight_growth"]) == (90, "7/10", 1000.0)
    text = describe(v)
    assert "rose to 40 from 2.3 at step 0" in text and "still finite" in text
    assert "weights of head x1e+03" in text


def test_the_reference_is_the_higher_of_the_start_and_the_baseline():
    # A run that starts far above its baseline (a bad init) and comes down: no blow-up,
    # although late losses are 10x the baseline.
    losses = [80.0, 60.0, 40.0, 30.0, 25.0]
    records = [record(10 * k, HEALTHY, loss=v, baseline=2.3) for k, v in enumerate(losses)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]


def test_an_oscillating_loss_without_trend_is_no_verdict():
    losses = [2.3 * (1 + 0.8 * math.sin(k)) + 3 * (k % 2) for k in range(30)]  # 0.5x .. 3x
    records = [record(10 * k, HEALTHY, loss=v, weights=[1.0] * 4) for k, v in enumerate(losses)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]
    # one spike above 10x: not sustained
    losses[10] = 500.0
    records = [record(10 * k, HEALTHY, loss=v, weights=[1.0] * 4) for k, v in enumerate(losses)]
    assert kinds(judge(LAYERS, records, CFG)) == ["healthy"]


def test_weights_that_blow_up_alone_are_exploding():
    growth = [1.0, 2.0, 30.0, 300.0, 3000.0]
    records = [
        record(10 * k, HEALTHY, loss=2.3, weights=[1.0, 2.0 * g, 1.0, 1.0])
        for k, g in enumerate(growth)
    ]
    (v,) = judge(LAYERS, records, CFG, sizes=[1] * 4)
    assert (v["kind"], v["layer"], v["step"]) == ("exploding", "hidden.1", 20)
    assert v["evidence"]["axis"] == "weights" and v["evidence"]["ratio"] == pytest.approx(30.0)
    assert "weight norm x30 its step-0 value > 10" in describe(v)
    # thresholds are diagnose.* keys
    lenient = DiagnoseConfig(weight_growth=1e4)
    assert kinds(judge(LAYERS, records, lenient, sizes=[1] * 4)) == ["healthy"]


def test_weights_grown_from_a_tiny_init_are_not_a_blow_up():
    # An IRNN's head starts at N(0, 0.001^2): 100 entries, norm 0.01; it grows 30x to an
    # entry RMS of 0.03 while the run learns. Past any init's scale (RMS > 1) it would be.
    growth = [1.0, 5.0, 30.0, 30.0, 30.0]
    records = [
        record(10 * k, HEALTHY, loss=2.3, weights=[10.0, 10.0, 10.0, 0.01 * g])
        for k, g in enumerate(growth)
    ]
    assert kinds(judge(LAYERS, records, CFG, sizes=[100] * 4)) == ["healthy"]
    big = [record(r.step, HEALTHY, loss=2.3, weights=[10.0, 10.0, 10.0, 20.0 * g])
           for r, g in zip(records, growth)]  # fmt: skip
    assert kinds(judge(LAYERS, big, CFG, sizes=[100] * 4)) == ["exploding"]
    # Beside a small head that grows more, the layer named is the one that blew up.
    both = [
        record(r.step, HEALTHY, loss=2.3, weights=[10.0, 20.0 * g, 10.0, 0.01 * g**1.5])
        for r, g in zip(records, growth)
    ]
    (v,) = judge(LAYERS, both, CFG, sizes=[100] * 4)
    assert (v["kind"], v["layer"]) == ("exploding", "hidden.1")


def test_a_nonfinite_run_is_not_judged_twice():
    records = [record(10 * k, HEALTHY, loss=v) for k, v in enumerate([2.3, 1e3, 1e4, 1e5])]
    verdicts = judge(LAYERS, records, CFG, nonfinite={"step": 40, "layer": "head"})
    assert kinds(verdicts) == ["diverged"]
    assert verdicts[0]["evidence"]["quantity"] == "loss or gradient non-finite"


# --- outcome --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "kind"),
    [(0.5, "learned"), (1.15, "learned"), (1.5, "partly"), (1.84, "partly"), (2.0, "not learned"),
     (2.6, "not learned")],
)  # fmt: skip
def test_outcome_reads_the_test_loss_against_the_baseline(loss: float, kind: str):
    metrics = {"loss/test": loss, "loss/baseline": 2.3, "acc/test": 0.4}
    result = outcome(metrics, CFG, chance=0.1)
    assert result["kind"] == kind
    assert result["ratio"] == pytest.approx(loss / 2.3)
    assert (result["acc/test"], result["chance"]) == (0.4, 0.1)
    assert describe_outcome(result).startswith(
        {"learned": "learned", "partly": "partly learned", "not learned": "not learned"}[kind]
    )
    assert "(chance 0.1)" in describe_outcome(result)


def test_outcome_of_a_regression_task_and_of_no_test_loss():
    result = outcome({"loss/test": 0.001, "loss/baseline": 1 / 6}, CFG)
    assert result["kind"] == "learned" and "acc/test" not in result
    assert "acc/test" not in describe_outcome(result)
    assert outcome({"loss/baseline": 2.3}, CFG) is None  # stopped before its evaluation
    assert outcome({"loss/test": math.nan, "loss/baseline": 2.3}, CFG) is None  # diverged
    assert describe_outcome(None) == ""
    strict = DiagnoseConfig(learned_ratio=0.1, partly_ratio=0.2)
    assert outcome({"loss/test": 0.3, "loss/baseline": 1.0}, strict)["kind"] == "not learned"


# --- recurrent nets: depth is the stack -----------------------------------------------------


def test_a_recurrent_heads_own_scale_makes_no_depth_verdict():
    # One recurrent layer under a head started at N(0, 0.001^2): the head's backward
    # signal dwarfs the layer's, which is the head's scale, not depth.
    layers = ["recurrent.0", "head"]
    records = [StepRecord(s, {}, {"signal_bwd": [1e-4, 1.0]}) for s in range(0, 40, 10)]
    assert kinds(judge(layers, records, CFG)) == ["vanishing"]  # a feed-forward reading
    (v,) = judge(layers, records, CFG, stack=(0, 0))
    assert v["kind"] == "healthy" and v["evidence"]["ratio"] == 1.0


def test_a_recurrent_stack_is_judged_from_its_first_to_its_last_layer():
    layers = ["recurrent.0", "recurrent.1", "recurrent.2", "head"]
    starved = [StepRecord(s, {}, {"signal_bwd": [1e-4, 1e-2, 1.0, 50.0]}) for s in range(4)]
    (v,) = judge(layers, starved, CFG, stack=(0, 2))
    assert (v["kind"], v["layer"]) == ("vanishing", "recurrent.0")
    assert v["evidence"]["quantity"] == "signal_bwd recurrent.0 / recurrent.2"
    assert v["evidence"]["ratio"] == pytest.approx(1e-4)
    # the head far above a sound stack: no verdict
    sound = [StepRecord(s, {}, {"signal_bwd": [0.5, 0.8, 1.0, 1e4]}) for s in range(4)]
    assert kinds(judge(layers, sound, CFG, stack=(0, 2))) == ["healthy"]


def test_saturated_gates_are_a_saturated_verdict_of_their_own_quantity():
    layers = ["recurrent.0", "head"]
    records = [
        StepRecord(s, {}, {"signal_bwd": [1.0, 1.0], "gate_sat_frac": [0.9, NAN]})
        for s in range(0, 40, 10)
    ]
    (v,) = judge(layers, records, CFG, stack=(0, 0))
    assert (v["kind"], v["layer"], v["step"]) == ("saturated", "recurrent.0", 0)
    assert v["evidence"]["quantity"] == "gate_sat_frac"
    assert "0.9 of gate values saturated" in describe(v)


def test_a_recovered_vanishing_says_when_it_ended():
    starved = [1e-4, 1e-3, 0.5, 1.0]
    records = [record(s, starved if 10 <= s <= 30 else HEALTHY) for s in range(0, 80, 10)]
    (v,) = judge(LAYERS, records, CFG)
    assert (v["kind"], v["step"]) == ("vanishing", 10)
    assert (v["evidence"]["until"], v["evidence"]["held"]) == (30, "3/8")
    assert "last at step 30" in describe(v)
