"""bf16 weights rounded stochastically in the grouped 8-bit step (train.json weight_dtype bf16)."""
import pytest
import torch

from optimizer.stochastic_rounding import round_to_bf16_, step_seed

grouped8bit = pytest.importorskip("optimizer.grouped8bit")   # bitsandbytes


def test_rounding_is_unbiased_and_lands_on_the_two_neighbours():
    value = 1.0 + 2 ** -10   # an eighth of the way from bf16's 1.0 to its next value, 1.0078125
    x = torch.full((400_000,), value)
    r = round_to_bf16_(x.clone(), seed=3)
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert r.mean().item() == pytest.approx(value, abs=2e-5)
    assert (r == 1.0078125).float().mean().item() == pytest.approx(1 / 8, abs=3e-3)
    negative = round_to_bf16_(-x.clone(), seed=3)
    assert negative.mean().item() == pytest.approx(-value, abs=2e-5)


def test_rounded_values_are_bf16_exact_and_representable_values_stay():
    x = torch.randn(10_000) * torch.logspace(-8, 8, 10_000)
    r = round_to_bf16_(x.clone(), seed=1)
    assert torch.equal(r.bfloat16().float(), r)
    exact = x.bfloat16().float()
    assert torch.equal(round_to_bf16_(exact.clone(), seed=1), exact)
    # each value goes to one of its two bf16 neighbours
    assert ((r - x).abs() <= (x.abs() * 2 ** -7)).all()


def test_same_seed_same_result_other_seed_other_result_non_finite_kept():
    x = torch.rand(1000) + 1.0
    assert torch.equal(round_to_bf16_(x.clone(), 5), round_to_bf16_(x.clone(), 5))
    assert not torch.equal(round_to_bf16_(x.clone(), 5), round_to_bf16_(x.clone(), 6))
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = round_to_bf16_(special.clone(), 1)
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and (out[3:] == 0).all()
    with pytest.raises(TypeError):
        round_to_bf16_(x.bfloat16(), 1)
    assert len({step_seed(s, w) for s in range(50) for w in range(50)}) == 2500


def _params(dtype):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5_000_000).to(dtype)),    # a chunk of its own, stepped in place
            torch.nn.Parameter(torch.randn(300, 300).to(dtype)),     # packed into a chunk, 8-bit state
            torch.nn.Parameter(torch.randn(40).to(dtype))]           # fp32 state


def _drift(cls, rounding: bool, dtype=torch.bfloat16, steps=20):
    """The mean change of each parameter after `steps` steps of lr 1e-4 against a constant gradient."""
    params = _params(dtype)
    start = [p.detach().float().clone() for p in params]
    opt = cls(params, lr=1e-4, weight_decay=0.0, stochastic_rounding=rounding)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert all(p.dtype == dtype for p in params)
    return [(s - p.detach().float()).mean().item() for s, p in zip(start, params)], params


@pytest.mark.parametrize("name", ["GroupedAdamW8bit", "GroupedLion8bit"])
def test_small_updates_reach_bf16_weights_only_with_stochastic_rounding(name):
    """20 steps of 1e-4 against a constant gradient move every weight by 2e-3; rounded to nearest, bf16 weights
    (spacing 2^-7 near 1) keep almost none of it, rounded stochastically they keep it on average, on each kind of
    chunk (in place, packed with 8-bit state, packed with fp32 state)."""
    cls = getattr(grouped8bit, name)
    nearest, _ = _drift(cls, rounding=False)
    stochastic, _ = _drift(cls, rounding=True)
    assert all(abs(d) < 5e-4 for d in nearest[:2]), nearest
    assert all(d == pytest.approx(2e-3, rel=0.2) for d in stochastic), stochastic


def test_fp32_weights_ignore_the_setting():
    _, plain = _drift(grouped8bit.GroupedAdamW8bit, rounding=False, dtype=torch.float32, steps=3)
    _, rounded = _drift(grouped8bit.GroupedAdamW8bit, rounding=True, dtype=torch.float32, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(plain, rounded))


def test_a_resumed_optimizer_rounds_as_the_uninterrupted_one():
    def steps(opt, params, n):
        for _ in range(n):
            for k, p in enumerate(params):
                p.grad = torch.full_like(p, 0.5 + k)
            opt.step()

    straight = _params(torch.bfloat16)
    opt = grouped8bit.GroupedAdamW8bit(straight, lr=1e-4, stochastic_rounding=True)
    steps(opt, straight, 6)
    first = _params(torch.bfloat16)
    opt = grouped8bit.GroupedAdamW8bit(first, lr=1e-4, stochastic_rounding=True)
    steps(opt, first, 3)
    saved = opt.state_dict()
    second = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt = grouped8bit.GroupedAdamW8bit(second, lr=1e-4, stochastic_rounding=True)
    opt.load_state_dict(saved)
    steps(opt, second, 3)
    assert all(torch.equal(a, b) for a, b in zip(straight, second))
