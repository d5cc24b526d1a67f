"""EMA against its closed form, the update interval, resume state, weight swapping and the background path."""
import math

import pytest
import torch

from utils.sd.ema import EMA, ema_decay_from_target, ema_weights


def make_params(seed=0, shapes=((3, 4), (5,), (2, 2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def set_params(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def test_constant_params_follow_the_closed_form():
    params = make_params()
    ema0 = [p.detach().clone() for p in params]
    target = [torch.full_like(p, 2.5) for p in params]
    set_params(params, target)
    d, k = 0.9, 7
    ema = EMA(ema0, decay=d, device="cpu", update_interval=1)
    for _ in range(k):
        assert ema.update(params)
    for s, e0, p in zip(ema.shadow, ema0, target):
        assert torch.allclose(s, p + (e0 - p) * d**k, atol=1e-6)  # ema_k = p + (ema_0 - p) * d^k
    assert ema.num_updates == k


def test_changing_params_follow_the_recursion():
    params = make_params()
    d = 0.75
    expected = [p.detach().double().clone() for p in params]
    ema = EMA(params, decay=d, device="cpu", update_interval=1)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        set_params(params, [torch.randn(p.shape, generator=g) for p in params])
        ema.update(params)
        expected = [e * d + p.detach().double() * (1 - d) for e, p in zip(expected, params)]
    for s, e in zip(ema.shadow, expected):
        assert s.dtype == torch.float32 and torch.allclose(s.double(), e, atol=1e-6)


def test_update_interval_counts_calls():
    params = make_params()
    ema0 = [p.detach().clone() for p in params]
    set_params(params, [torch.zeros_like(p) for p in params])
    ema = EMA(ema0, decay=0.5, device="cpu", update_interval=3)
    applied = [ema.update(params) for _ in range(10)]
    assert applied == [False, False, True] * 3 + [False]
    assert ema.optimizer_steps == 10 and ema.num_updates == 3
    for s, e0 in zip(ema.shadow, ema0):
        assert torch.allclose(s, e0 * 0.5**3)


def test_state_dict_round_trip_resumes_exactly():
    params = make_params()
    g = torch.Generator().manual_seed(2)
    steps = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(10)]
    straight = EMA(params, decay=0.8, device="cpu", update_interval=2)
    for values in steps:
        set_params(params, values)
        straight.update(params)

    set_params(params, make_params())
    first = EMA(params, decay=0.8, device="cpu", update_interval=2)
    for values in steps[:5]:
        set_params(params, values)
        first.update(params)
    state = first.state_dict()
    saved = {k: ([t.clone() for t in v] if k == "shadow" else v) for k, v in state.items()}  # as torch.save would
    resumed = EMA([torch.zeros_like(p) for p in params], decay=0.8, device="cpu", update_interval=2)
    resumed.load_state_dict(saved)
    assert resumed.optimizer_steps == 5 and resumed.num_updates == 2
    for values in steps[5:]:
        set_params(params, values)
        resumed.update(params)
    for a, b in zip(straight.shadow, resumed.shadow):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        resumed.load_state_dict({**saved, "shadow": saved["shadow"][:-1]})


def test_store_restore_and_context_manager_leave_weights_unchanged():
    params = make_params()
    trained = [p.detach().clone() for p in params]
    ema = EMA(make_params(seed=5), decay=0.9, device="cpu", update_interval=1)
    ema_values = [s.clone() for s in ema.shadow]
    with ema_weights(ema, params):
        for p, e in zip(params, ema_values):
            assert torch.equal(p.detach(), e)
        with pytest.raises(RuntimeError):
            ema.update(params)  # training while the EMA weights are swapped in is a bug
    for p, t in zip(params, trained):
        assert torch.equal(p.detach(), t)
    with pytest.raises(ZeroDivisionError):
        with ema_weights(ema, params):
            1 / 0
    for p, t in zip(params, trained):
        assert torch.equal(p.detach(), t)
    for s, e in zip(ema.shadow, ema_values):
        assert torch.equal(s, e)
    with ema_weights(None, params):
        pass
    with pytest.raises(RuntimeError):
        ema.restore(params)


def test_background_update_matches_the_synchronous_one():
    params = make_params(shapes=((64, 64), (128,), (3, 3, 8, 8)))
    g = torch.Generator().manual_seed(4)
    steps = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(6)]
    sync = EMA(params, decay=0.95, device="cpu", update_interval=2, overlap=False)
    overlapped = EMA(params, decay=0.95, device="cpu", update_interval=2, overlap=True)
    for values in steps:
        set_params(params, values)
        sync.update(params)
        overlapped.update(params)
    state = overlapped.state_dict()  # waits for the queued update
    for a, b in zip(sync.shadow, state["shadow"]):
        assert torch.equal(a, b)
    trained = [p.detach().clone() for p in params]
    with ema_weights(overlapped, params):
        assert all(torch.equal(p.detach(), s) for p, s in zip(params, sync.shadow))
    assert all(torch.equal(p.detach(), t) for p, t in zip(params, trained))
    overlapped.update(params)
    overlapped.update(params)
    overlapped.close()
    sync.update(params)
    sync.update(params)
    assert all(torch.equal(a, b) for a, b in zip(sync.shadow, overlapped.shadow))


def test_low_precision_params_keep_a_float32_ema():
    params = [torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))]
    ema = EMA(params, decay=0.5, device="cpu")
    set_params(params, [torch.zeros(4)])
    ema.update(params)
    assert ema.shadow[0].dtype == torch.float32 and torch.equal(ema.shadow[0], torch.full((4,), 0.5))
    ema.copy_to(params)
    assert params[0].dtype == torch.bfloat16
    assert torch.equal(params[0].detach(), torch.full((4,), 0.5, dtype=torch.bfloat16))


def test_copy_from_sets_the_ema_weights():
    params = make_params()
    ema = EMA(params, decay=0.9, device="cpu")
    other = make_params(seed=9)
    ema.copy_from(other)  # e.g. the weights of ema_resume_model
    assert all(torch.equal(s, o.detach()) for s, o in zip(ema.shadow, other))


def test_invalid_arguments():
    params = make_params()
    with pytest.raises(ValueError):
        EMA(params, decay=1.5, device="cpu")
    with pytest.raises(ValueError):
        EMA(params, decay=0.9, device="cpu", update_interval=0)
    ema = EMA(params, decay=0.9, device="cpu")
    with pytest.raises(ValueError):
        ema.update(params[:-1])
    with pytest.raises(ValueError):
        ema.update([torch.zeros(1)] + params[1:])


def test_decay_from_strength_target():
    d = ema_decay_from_target(0.1, total_steps=1000, update_interval=10)
    assert d == pytest.approx(math.exp(math.log(0.1) / 100), rel=1e-12)  # 100 updates leave 10% of the start
    assert d ** 100 == pytest.approx(0.1, rel=1e-9)
    assert ema_decay_from_target(0.5, total_steps=7, update_interval=7) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ema_decay_from_target(1.0, total_steps=10, update_interval=1)
    with pytest.raises(ValueError):
        ema_decay_from_target(0.1, total_steps=0, update_interval=1)
