"""The learning-rate range test's curve, stopping rule and choice (no network needed)."""

import math

import pytest

from transfer.errors import PipelineError
from transfer.lr_range import (
    MAX_LR,
    MAX_STEPS,
    MIN_LR,
    MIN_STEPS,
    RangeTest,
    curve_text,
    range_test_steps,
)


def test_steps_are_bounded_and_fewer_on_small_sets():
    assert range_test_steps(1) == MIN_STEPS
    assert range_test_steps(20) == 40
    assert range_test_steps(10_000) == MAX_STEPS <= 300


def test_rates_grow_exponentially_across_the_range():
    test = RangeTest(11, 1e-6, 1e-1)
    rates = [test.rate(step) for step in range(11)]
    assert rates[0] == pytest.approx(1e-6) and rates[-1] == pytest.approx(1e-1)
    assert all(b / a == pytest.approx(10 ** 0.5) for a, b in zip(rates, rates[1:], strict=False))
    assert RangeTest(5).rate(0) == MIN_LR and RangeTest(5).rate(4) == pytest.approx(MAX_LR)


def _run(losses: list[float]) -> RangeTest:
    test = RangeTest(len(losses))
    for step, loss in enumerate(losses):
        if not test.record(test.rate(step), loss):
            break
    return test


def test_the_rate_chosen_is_a_tenth_of_the_lowest_loss_and_below_the_divergence():
    # falls from 2.0 to 0.1 over the first 60 steps, then blows up
    losses = [2.0 - 1.9 * step / 60 for step in range(60)] + [0.1 * 3 ** k for k in range(40)]
    test = _run(losses)
    found = test.result()
    assert found.diverged_at is not None and len(found.lrs) < len(losses)
    lowest = found.losses.index(min(found.losses))
    assert found.lr == pytest.approx(found.lrs[lowest] / 10)
    assert found.lr < found.diverged_at
    assert 55 <= lowest < 70  # the moving average lags the raw loss by a few steps
    text = curve_text(found)
    assert text.splitlines()[0] == "lr,loss" and len(text.splitlines()) == len(found.lrs) + 1
    assert curve_text(None) == "lr,loss\n"


def test_a_loss_lowest_at_the_start_or_never_finite_is_one_error():
    with pytest.raises(PipelineError, match=r"^finetune.lr: auto: .* no usable rate: the loss "
                                            r"diverged at 1e-07, at its first step; set "
                                            r"finetune.lr to a number$"):
        _run([math.nan] * 50).result()
    with pytest.raises(PipelineError, match=r"lowest at 1e-07, too near the start of the range "
                                            r"\(1e-07\) for a rate 10x below it, and the loss "
                                            r"diverged at .*; set finetune.lr to a number$"):
        _run([1.0] + [1.0 + step for step in range(1, 50)]).result()
