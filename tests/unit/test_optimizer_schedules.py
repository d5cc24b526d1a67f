"""LR schedules: values at chosen steps, worked out by hand from the formulas in optimizer/schedules.py."""
import math

import pytest
import torch

from optimizer.config import PartSettings, with_defaults
from optimizer.build import make_scheduler, resolve_for_run, scale_lr_factor
from optimizer.schedules import lr_multiplier, resolve_schedule_steps
from utils.core.config_schema import ConfigError


def mult(step, schedule, warmup=0, decay=100, **kw):
    return lr_multiplier(step, schedule=schedule, warmup_steps=warmup, decay_steps=decay, **kw)


@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                      "cosine_with_hard_restarts", "polynomial", "rex"])
def test_warmup_ramps_from_first_step_to_peak(schedule):
    # (step + 1) / (warmup + 1): 1/5, 2/5, 3/5, 4/5, then the schedule starts at its peak
    assert [mult(s, schedule, warmup=4) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert mult(4, schedule, warmup=4) == pytest.approx(1.0)


def test_constant_stays_at_peak_forever():
    assert [mult(s, "constant") for s in (0, 50, 100, 10_000)] == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("step, expected", [(0, 1.0), (25, 0.75), (50, 0.5), (100, 0.0), (150, 0.0)])
def test_linear(step, expected):
    assert mult(step, "linear") == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (25, 0.5 + 0.5 * math.sqrt(0.5)), (50, 0.5), (100, 0.0)])
def test_cosine(step, expected):
    assert mult(step, "cosine") == pytest.approx(expected)


def test_cosine_stays_at_its_end_value_after_decay_steps():
    # diffusers' cosine climbs back up after num_training_steps; here it stays down
    assert mult(150, "cosine") == pytest.approx(0.0)
    assert mult(199, "cosine") == pytest.approx(0.0)


def test_cosine_with_warmup_counts_decay_from_the_end_of_warmup():
    # warmup 10, decay 110: step 60 is halfway through the decay phase
    assert mult(60, "cosine", warmup=10, decay=110) == pytest.approx(0.5)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (15, 0.5), (30, 0.0), (45, 0.5), (60, 1.0), (90, 0.0)])
def test_cosine_with_restarts_is_smooth(step, expected):
    # n = 2 cycles over 90 steps: (1 + cos(3 pi p)) / 2
    assert mult(step, "cosine_with_restarts", decay=90, num_cycles=2) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (25, 0.5), (49, 0.5 * (1 + math.cos(math.pi * 0.98))),
                                            (50, 1.0), (75, 0.5), (100, 0.0), (120, 0.0)])
def test_cosine_with_hard_restarts_jumps_back_to_peak(step, expected):
    assert mult(step, "cosine_with_hard_restarts", num_cycles=2) == pytest.approx(expected, abs=1e-12)


def test_one_cycle_of_either_restart_schedule_is_plain_cosine():
    for step in (0, 13, 50, 77, 100):
        assert mult(step, "cosine_with_restarts", num_cycles=1) == pytest.approx(mult(step, "cosine"))
        assert mult(step, "cosine_with_hard_restarts", num_cycles=1) == pytest.approx(mult(step, "cosine"))


@pytest.mark.parametrize("power, step, expected", [(2.0, 50, 0.25), (2.0, 90, 0.01), (1.0, 30, 0.7),
                                                   (0.5, 75, 0.5)])
def test_polynomial(power, step, expected):
    assert mult(step, "polynomial", power=power) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 1.0), (50, 0.5 / 0.55), (90, 0.1 / 0.19), (100, 0.0)])
def test_rex(step, expected):
    # (1 - p) / (0.1 + 0.9 (1 - p))
    assert mult(step, "rex") == pytest.approx(expected)


def test_min_factor_lifts_the_end_of_decaying_schedules():
    assert mult(50, "linear", min_factor=0.2) == pytest.approx(0.6)
    assert mult(100, "cosine", min_factor=0.25) == pytest.approx(0.25)
    assert mult(100, "rex", min_factor=0.1) == pytest.approx(0.1)
    assert mult(0, "linear", min_factor=0.2) == pytest.approx(1.0)


def test_automatic_warmup_and_decay():
    assert resolve_schedule_steps("cosine", None, None, total_steps=1000) == (20, 1000)
    assert resolve_schedule_steps("cosine", None, 500, total_steps=1000) == (10, 500)
    assert resolve_schedule_steps("constant", None, None, total_steps=1000) == (0, 1000)
    assert resolve_schedule_steps("constant_with_warmup", None, None, total_steps=1000) == (20, 1000)
    assert resolve_schedule_steps("rex", None, None, total_steps=1000) == (0, 1000)
    assert resolve_schedule_steps("linear", 7, None, total_steps=1000) == (7, 1000)
    assert resolve_schedule_steps("linear", None, None, total_steps=10) == (0, 10)


def test_lambda_lr_applies_the_multiplier_once_per_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    settings = resolve_for_run("unet", with_defaults(PartSettings(lr_scheduler="linear", lr_warmup_steps=2)),
                               total_steps=6, lr_scale=1.0, warn=lambda m: None)
    scheduler = make_scheduler(optimizer, settings)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])   # the lr this optimizer step uses
        optimizer.step()
        scheduler.step()
    # warmup 1/3, 2/3; then linear over steps 2..6: 1, 3/4, 1/2, 1/4; then 0 (clamped)
    assert seen == pytest.approx([2 / 3, 4 / 3, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


def test_run_length_fills_warmup_and_decay_and_scales_lr():
    s = with_defaults(PartSettings(lr=1e-6, lr_scheduler="cosine"))
    resolved = resolve_for_run("unet", s, total_steps=500, lr_scale=scale_lr_factor(4, 2), warn=lambda m: None)
    assert (resolved.lr_warmup_steps, resolved.lr_decay_steps) == (10, 500)
    assert resolved.lr == pytest.approx(1e-6 * 8 ** 0.55)


def test_warmup_that_does_not_fit_the_run_is_an_error():
    s = with_defaults(PartSettings(lr_scheduler="cosine", lr_warmup_steps=100))
    with pytest.raises(ConfigError, match=r"lr_warmup_steps \(100\) must be below lr_decay_steps \(50"):
        resolve_for_run("unet", s, total_steps=50, lr_scale=1.0, warn=lambda m: None)


def test_decay_ending_before_the_run_ends_warns():
    warnings = []
    s = with_defaults(PartSettings(lr_scheduler="linear", lr_decay_steps=80))
    resolve_for_run("unet", s, total_steps=100, lr_scale=1.0, warn=warnings.append)
    assert len(warnings) == 1 and "last 20 of 100" in warnings[0]
