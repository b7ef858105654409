import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.scheduler import STYLES, EarlyStopConfig, EarlyStopping, RunSchedules, ScheduleConfig


def schedule(**values) -> ScheduleConfig:
    defaults = dict(begin=0.1, peak=1.0, end=0.2, warmup=0.2, decay=0.6, style="linear")
    return ScheduleConfig(**{**defaults, **values})


@pytest.mark.parametrize("style", ["linear", "cosine", "power"])
def test_warmup_then_decay_then_hold(style):
    s = schedule(style=style)
    assert s.value(0.0) == 0.1  # the first step gets begin, not zero
    assert s.value(0.1) == pytest.approx(0.55)  # half way up the warmup
    assert s.value(0.2) == 1.0  # peak exactly at the end of the warmup
    assert s.value(0.8) == 0.2 and s.value(0.9) == 0.2 and s.value(1.0) == 0.2  # end, then hold
    midpoint = {"linear": 0.6, "cosine": 0.6, "power": 0.2 + 0.8 * 0.5**2}[style]
    assert s.value(0.5) == pytest.approx(midpoint)


def test_constant_holds_peak_after_warmup():
    s = ScheduleConfig(begin=0.0, peak=3.0, warmup=0.5, style="constant")
    assert [s.value(p) for p in (0.0, 0.25, 0.5, 1.0)] == [0.0, 1.5, 3.0, 3.0]


def test_wsd_holds_the_peak_and_decays_only_over_the_final_fraction():
    s = schedule(style="wsd", warmup=0.1, decay=0.2)
    assert s.value(0.1) == 1.0 and s.value(0.5) == 1.0 and s.value(0.8) == pytest.approx(1.0)
    assert s.value(0.9) == pytest.approx(0.6) and s.value(1.0) == 0.2


def test_power_reaches_its_end_smoothly_for_a_growing_value():
    s = ScheduleConfig(peak=1.0, end=8.0, warmup=0.0, decay=1.0, style="power", exponent=0.5)
    values = [s.value(i / 100) for i in range(101)]
    assert values[0] == 1.0 and values[-1] == 8.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(b - a for a, b in zip(values, values[1:])) < 1.0  # no jump to the end value


def test_zero_length_warmup_and_decay():
    s = schedule(warmup=0.0, decay=0.0)
    assert s.value(0.0) == 0.2  # an instant decay at the start of the decay window
    assert schedule(warmup=0.0, decay=0.5).value(0.0) == 1.0


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(peak=-1.0), "lr.peak is -1.0; it must be at least 0"),
        (dict(warmup=1.5), "lr.warmup is 1.5; it must be in [0, 1]"),
        (dict(warmup=0.6, decay=0.6), "must not exceed 1"),
        (dict(style="exp"), "lr.style is 'exp'; use one of"),
        (dict(style="constant", end=0.5), "never decays"),
    ],
)
def test_bad_schedules_are_refused(values, message):
    assert any(message in p for p in schedule(**values).problems("lr"))


def test_accumulation_below_one_is_refused():
    problems = ScheduleConfig(peak=2, begin=0).problems("grad_accum", minimum=1)
    assert problems == ["grad_accum.begin is 0; it must be at least 1"]


def test_run_schedules_use_tokens_and_round_accumulation():
    runs = RunSchedules(
        lr=schedule(),
        weight_decay=ScheduleConfig(peak=0.1),
        grad_accum=ScheduleConfig(begin=1, peak=4, warmup=1.0, decay=0.0),
        total_tokens=1000,
    )
    first = runs.at(0)
    assert first.lr == 0.1 and first.weight_decay == 0.1 and first.grad_accum == 1
    assert runs.at(500).grad_accum == round(2.5) and runs.at(1000).grad_accum == 4


@settings(max_examples=300, deadline=None)
@given(
    begin=st.floats(0, 10),
    peak=st.floats(0, 10),
    end=st.floats(0, 10),
    warmup=st.floats(0, 1),
    decay_share=st.floats(0, 1),
    style=st.sampled_from(STYLES[1:]),
    exponent=st.floats(0.1, 5),
    progress=st.floats(0, 1),
)
def test_random_schedules_stay_in_range_and_end_exactly(
    begin, peak, end, warmup, decay_share, style, exponent, progress
):
    s = ScheduleConfig(
        begin=begin,
        peak=peak,
        end=end,
        warmup=warmup,
        decay=(1 - warmup) * decay_share,
        style=style,
        exponent=exponent,
    )
    assert s.problems("x") == []
    low, high = min(begin, peak, end), max(begin, peak, end)
    assert low - 1e-9 <= s.value(progress) <= high + 1e-9
    assert s.value(1.0) == end and s.value(2.0) == end
    assert s.value(0.0) == (begin if warmup > 0 else s.value(0.0))
    # Monotone between the phase boundaries.
    decay_start = 1 - s.decay if style == "wsd" else warmup
    points = [decay_start + (1 - decay_start) * i / 20 for i in range(21)]
    values = [s.value(p) for p in points]
    pairs = list(zip(values, values[1:]))
    if peak >= end:
        assert all(b <= a + 1e-9 for a, b in pairs)
    else:
        assert all(b >= a - 1e-9 for a, b in pairs)


def test_early_stopping_counts_evaluations_without_improvement():
    stopper = EarlyStopping(EarlyStopConfig(patience=2, min_delta=0.1))
    assert stopper.update(2.0) is None  # first evaluation always improves on infinity
    assert stopper.update(1.95) is None  # not by more than min_delta: 1 without improvement
    assert stopper.update(1.5) is None  # improvement resets the count
    assert stopper.update(1.45) is None
    reason = stopper.update(1.6)
    assert reason and "early stop" in reason and "1.5000" in reason
    restored = EarlyStopping(EarlyStopConfig(patience=2, min_delta=0.1))
    restored.load_state_dict(stopper.state_dict())
    assert restored.best == 1.5 and restored.evals_without_improvement == 2


def test_patience_zero_never_stops():
    stopper = EarlyStopping(EarlyStopConfig(patience=0))
    assert all(stopper.update(1.0) is None for _ in range(100))
    assert math.isfinite(stopper.best)
