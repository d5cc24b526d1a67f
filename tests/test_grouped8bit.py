"""optimizer/grouped8bit.py: the chunked AdamW8bit / Lion8bit step equals bitsandbytes' per-tensor classes."""
import io
import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from optimizer.build import build_optimizer_parts, describe  # noqa: E402
from optimizer.config import load_optimizer_config, optimizer_config_to_json  # noqa: E402
from optimizer.grouped8bit import (BLOCK_SIZE, MIN_8BIT_SIZE, STATE_MARKER, AdamW8bit, Grouped8bit,  # noqa: E402
                                   GroupedAdamW8bit, GroupedLion8bit, Lion8bit)
from utils.core.config_schema import ConfigError  # noqa: E402

CHUNK = 32768   # small: several 8-bit chunks, the shared buffers reused
DIRECT = 100_000   # tensors this large are stepped in place, alone in their chunk
HYPER = {"adam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
         "lion": dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)}


def make_model() -> torch.nn.Module:
    """Tensors below 4096 elements, above, not multiples of 256, and one above CHUNK."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(300, 70),           # weight 21,000, bias 70
        torch.nn.LayerNorm(70),             # 70, 70
        torch.nn.Conv2d(16, 33, 3),         # weight 4,752 (not a multiple of 256), bias 33
        torch.nn.Linear(70, 50),            # weight 3,500 (< 4096: fp32 state)
        torch.nn.Embedding(201, 64),        # 12,864
        torch.nn.Linear(64, 130),           # 8,320, bias 130
        torch.nn.Linear(130, 4097, bias=False),   # 532,610 (> DIRECT: in place)
    )


def reference(kind, params):
    cls = bnb.optim.AdamW8bit if kind == "adam" else bnb.optim.Lion8bit
    return cls(params, **HYPER[kind])


def grouped(kind, params, chunk_elements=CHUNK, direct_elements=DIRECT):
    cls = GroupedAdamW8bit if kind == "adam" else GroupedLion8bit
    return cls(params, **HYPER[kind], chunk_elements=chunk_elements, direct_elements=direct_elements)


def scheduler(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))   # lr changes every step


def set_grads(model, step, none=(), zero=False):
    g = torch.Generator().manual_seed(1000 + step)
    for i, (name, p) in enumerate(model.named_parameters()):
        grad = (torch.randn(p.shape, generator=g) * (1 + i % 5)).to(p.dtype)
        if step == 3 and grad.dim() == 2:   # non-contiguous gradients (as backward can give) once
            grad = grad.t().contiguous().t()
            assert not grad.is_contiguous()
        p.grad = (torch.zeros_like(grad) if zero else None) if name in none else grad


def run(model, optimizer, sched, steps, first=0, none_at=None, garbage=False, zero=False):
    """zero: the parameters none_at names get zero gradients instead of None."""
    for step in range(first, first + steps):
        set_grads(model, step, none=(none_at or {}).get(step, ()), zero=zero)
        optimizer.step()
        sched.step()
        if garbage and isinstance(optimizer, Grouped8bit):
            for grad_buf, param_buf in optimizer._buffers.values():   # stale values must never matter
                grad_buf.fill_(float("nan"))
                param_buf.fill_(1e30)


def assert_same_params(a, b):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=f"{name} differs")
        assert torch.equal(pa, pb), f"{name}: close but not bit-equal"


def assert_same_state(ref_opt, opt):
    """Each tensor's slice of its chunk's state equals bitsandbytes' state of that tensor."""
    params, ref_params = opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]
    for c in opt._chunks:
        st = opt.state[params[c.indices[0]]]
        for i, off in zip(c.indices, c.offsets):
            ref, n = ref_opt.state[ref_params[i]], params[i].numel()
            assert ref["step"] == st["step"]
            assert ("state2" in ref) == ("state2" in st) and ("absmax1" in ref) == c.eight_bit
            for key in ("state1", "state2"):
                if key in ref:
                    assert torch.equal(st[key][off:off + n], ref[key].flatten()), (i, key)
            for key in ("absmax1", "absmax2"):
                if key in ref:
                    first = off // BLOCK_SIZE
                    assert torch.equal(st[key][first:first + ref[key].numel()], ref[key]), (i, key)


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_equals_bitsandbytes_per_tensor(kind):
    ref_model, model = make_model(), make_model()
    ref_opt, opt = reference(kind, ref_model.parameters()), grouped(kind, model.parameters())
    run(ref_model, ref_opt, scheduler(ref_opt), 5)
    run(model, opt, scheduler(opt), 5, garbage=True)
    assert_same_params(ref_model, model)
    assert_same_state(ref_opt, opt)
    # the layout the test means to exercise
    chunks, params = opt._chunks, list(model.parameters())
    packed = [c for c in chunks if c.eight_bit and not c.direct]
    assert len(packed) >= 2 and any(len(c.indices) > 1 for c in packed) and any(not c.eight_bit for c in chunks)
    assert [params[c.indices[0]].numel() for c in chunks if c.direct] == [130 * 4097]
    assert all(off % BLOCK_SIZE == 0 for c in packed for off in c.offsets)
    assert all(c.length <= CHUNK for c in chunks if not c.direct)
    assert all((params[i].numel() >= MIN_8BIT_SIZE) == c.eight_bit for c in chunks for i in c.indices)
    # one gradient and one parameter buffer, as large as the largest copied chunk
    assert [g.numel() for g, _ in opt._buffers.values()] == [max(c.length for c in chunks if not c.direct)]


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_parameter_without_grad_stays_unchanged(kind):
    ref_model, model = make_model(), make_model()
    ref_opt, opt = reference(kind, ref_model.parameters()), grouped(kind, model.parameters())
    names = [n for n, _ in model.named_parameters()]
    skipped = {2: {"2.weight", "3.bias"}}      # one 8-bit and one fp32 tensor, each sharing a chunk with others
    zero_model = make_model()
    zero_opt = grouped(kind, zero_model.parameters())
    for m, o in ((ref_model, ref_opt), (model, opt), (zero_model, zero_opt)):
        sched = scheduler(o)
        run(m, o, sched, 2, garbage=True)
        if m is model:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        run(m, o, sched, 1, first=2, none_at=skipped, zero=o is zero_opt)
    # no gradient: the weights stay, the moments decay as with a zero gradient (bitsandbytes leaves them)
    for p, zp in zip(model.parameters(), zero_model.parameters()):
        if p in opt.state:
            for key, value in opt.state[p].items():
                if torch.is_tensor(value):
                    assert torch.equal(value, zero_opt.state[zp][key]), key
    for (name, p), ref in zip(model.named_parameters(), ref_model.parameters()):
        if name in skipped[2]:
            assert torch.equal(p, before[name]), name
        else:   # the others are untouched by their neighbours' missing gradient
            assert not torch.equal(p, before[name]) and torch.equal(p, ref), name
    # a chunk where no parameter has a gradient is skipped: no step counted
    only = names.index("6.weight")
    chunk = next(c for c in opt._chunks if only in c.indices)
    assert chunk.indices == [only]
    st = opt.state[model[6].weight]
    step, state1 = st["step"], st["state1"].clone()
    set_grads(model, 9, none={"6.weight"})
    opt.step()
    assert st["step"] == step and torch.equal(st["state1"], state1)


@pytest.mark.parametrize("enabled", [False, True])
def test_grad_scaler(enabled):
    """GradScaler.unscale_ / step only need param_groups and .grad; an overflowing step changes nothing."""
    results = []
    for cls in (bnb.optim.AdamW8bit, GroupedAdamW8bit):
        model = make_model()
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=enabled)
        for step in range(3):
            torch.manual_seed(step)
            x = torch.randint(0, 201, (4,))
            h = model[4](x)
            loss = model[6](torch.tanh(model[5](h))).pow(2).mean() + model[0](torch.randn(2, 300)).sum()
            if step == 1 and enabled:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        results.append(model)
    assert_same_params(*results)


def test_state_dict_round_trip_is_exact():
    """5 steps straight == 2 steps, save (weights_only load, as the trainer does), fresh objects, 3 steps."""
    straight = make_model()
    opt = grouped("adam", straight.parameters())
    run(straight, opt, scheduler(opt), 5)

    first = make_model()
    opt = grouped("adam", first.parameters())
    sched = scheduler(opt)
    run(first, opt, sched, 2)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(STATE_MARKER in v for v in saved["opt"]["state"].values())

    resumed = make_model()
    resumed.load_state_dict(saved["model"])
    opt = grouped("adam", resumed.parameters())
    sched = scheduler(opt)
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    run(resumed, opt, sched, 3, first=2)
    assert_same_params(straight, resumed)


def test_fp16_parameters_keep_fp32_state_through_a_round_trip():
    model = make_model().half()
    opt = grouped("adam", model.parameters())
    run(model, opt, scheduler(opt), 1)
    fresh = grouped("adam", model.parameters())
    fresh.load_state_dict(opt.state_dict())
    assert len(fresh.state) == len(opt._chunks)
    for p, st in fresh.state.items():
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert st[key].dtype == value.dtype and torch.equal(st[key], value), key
        assert all(st[k].dtype == torch.float32 for k in ("absmax1", "absmax2") if k in st)
        assert st["state1"].dtype in (torch.uint8, torch.float32)


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_other_layout_is_a_clear_error(kind):
    model = make_model()
    ref_opt = reference(kind, model.parameters())
    run(model, ref_opt, scheduler(ref_opt), 1)
    opt = grouped(kind, model.parameters())
    with pytest.raises(ConfigError, match="saved with grouped_8bit_step false .*set \"grouped_8bit_step\": false"):
        opt.load_state_dict(ref_opt.state_dict())
    # and the other way: bitsandbytes' classes as built with grouped_8bit_step false refuse the grouped state
    run(model, opt, scheduler(opt), 1)
    per_tensor = (AdamW8bit if kind == "adam" else Lion8bit)(model.parameters())
    with pytest.raises(ConfigError, match="saved with grouped_8bit_step true .*save_optimizer false"):
        per_tensor.load_state_dict(opt.state_dict())
    per_tensor.load_state_dict(ref_opt.state_dict())     # its own state still loads
    # a grouped state of other parameters
    other = grouped(kind, list(model.parameters())[2:])
    with pytest.raises(ConfigError, match="does not fit"):
        other.load_state_dict(opt.state_dict())


def test_one_parameter_group_only():
    model = make_model()
    with pytest.raises(ValueError, match="one parameter group"):
        GroupedAdamW8bit([{"params": model[0].parameters()}, {"params": model[1].parameters()}])


@pytest.mark.parametrize("grouped_step", [True, False])
def test_build_optimizer_parts_chooses_the_class(tmp_path, grouped_step):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw8bit"}, "text_encoder_overrides": {"optimizer": "lion8bit"},
                                "grouped_8bit_step": grouped_step}))
    cfg = load_optimizer_config(str(path), warn=lambda m: None)
    assert cfg.grouped_8bit_step is grouped_step
    assert optimizer_config_to_json(cfg)["grouped_8bit_step"] is grouped_step
    unet, te = torch.nn.Linear(128, 64), torch.nn.Linear(64, 64)
    # the text-encoder freezing needs a CLIP-like module; build the parts one by one instead
    parts = build_optimizer_parts(cfg, unet=unet, text_encoders=[("text_encoder", None)], total_steps=5, batch_size=1,
                                  grad_accum=1, device_type="cpu", warn=lambda m: None)
    from optimizer.build import build_part
    parts.append(build_part("text_encoder", cfg.text_encoder, list(te.parameters()), total_steps=5, lr_scale=1.0,
                            device_type="cpu", warn=lambda m: None, grouped_8bit_step=cfg.grouped_8bit_step))
    unet_opt, te_opt = parts[0].optimizer, parts[1].optimizer
    if grouped_step:
        assert type(unet_opt) is GroupedAdamW8bit and type(te_opt) is GroupedLion8bit
        assert "adamw8bit (GroupedAdamW8bit)" in describe(parts)
    else:
        assert type(unet_opt) is AdamW8bit and type(te_opt) is Lion8bit
        assert isinstance(unet_opt, bnb.optim.AdamW8bit) and isinstance(te_opt, bnb.optim.Lion8bit)
        assert "adamw8bit (AdamW8bit)" in describe(parts)
    assert unet_opt.param_groups[0]["lr"] == cfg.unet.lr and te_opt.param_groups[0]["betas"] == (0.9, 0.99)
    unet(torch.randn(2, 128)).sum().backward()
    te(torch.randn(2, 64)).sum().backward()
    for part in parts:
        part.optimizer.step()


def test_grouped_8bit_step_is_strictly_typed(tmp_path):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"grouped_8bit_step": 1}))
    with pytest.raises(ConfigError, match="grouped_8bit_step"):
        load_optimizer_config(str(path))
    assert load_optimizer_config(None).grouped_8bit_step is True


def backward_model():
    """make_model's tensors used in one forward pass, so a backward pass accumulates every gradient."""
    torch.manual_seed(0)
    model = make_model()
    lin1, norm, conv, lin2, emb, lin3, lin4 = model

    def loss_fn(step):
        g = torch.Generator().manual_seed(500 + step)
        x = torch.randn(4, 300, generator=g)
        h = lin2(norm(lin1(x)))                                        # 4 x 50
        h = h + emb(torch.tensor([step % 201, 7, 9, 200]))[:, :50]
        h = lin4(lin3(torch.cat([h, h[:, :14]], 1)))                   # 4 x 4097
        c = conv(torch.randn(2, 16, 5, 5, generator=g)).mean()
        return h.square().mean() + c * c
    return model, loss_fn


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_stepping_in_backward_equals_stepping_after(kind):
    """step_in_backward (fused_backward_pass): the same weights and state as step() after backward, bit for bit;
    every gradient is freed by the end of the backward pass; the gradient norm is the one clip_grad_norm_ sees."""
    ref_model, ref_loss = backward_model()
    model, loss_fn = backward_model()
    ref_opt, opt = grouped(kind, list(ref_model.parameters())), grouped(kind, list(model.parameters()))
    ref_sched, sched = scheduler(ref_opt), scheduler(opt)
    opt.step_in_backward()
    for step in range(4):
        ref_loss(step).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(list(ref_model.parameters()), float("inf"))
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        ref_sched.step()
        opt.record_grad_norm = step % 2 == 0
        loss_fn(step).backward()
        assert all(p.grad is None for p in model.parameters()), "a gradient outlived the backward pass"
        opt.step()
        sched.step()
        norm = opt.take_grad_norm()
        if step % 2 == 0:
            torch.testing.assert_close(norm, expected_norm, rtol=1e-5, atol=0)
        else:
            assert norm is None
    assert_same_params(ref_model, model)
    assert_same_grouped_state(ref_opt, opt)


def assert_same_grouped_state(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        for key, value in sa[index].items():
            assert (torch.equal(value, sb[index][key]) if isinstance(value, torch.Tensor)
                    else value == sb[index][key]), (index, key)


def test_backward_steps_with_an_unused_parameter():
    """A chunk with a parameter that gets no gradient is stepped by step() after the backward pass, as step()
    alone would step it."""
    ref_model, ref_loss = backward_model()
    model, loss_fn = backward_model()
    for m in (ref_model, model):
        m[1].bias.requires_grad_(False)     # never gets a gradient; its chunk never completes in backward
    ref_opt = grouped("adam", [p for p in ref_model.parameters()])
    opt = grouped("adam", [p for p in model.parameters()])
    opt.step_in_backward()
    for step in range(3):
        ref_loss(step).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        loss_fn(step).backward()
        assert any(p.grad is not None for p in model.parameters())   # the incomplete chunk waits for step()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_same_params(ref_model, model)
    assert_same_grouped_state(ref_opt, opt)


def test_triton_8bit_step_settings(tmp_path):
    f = tmp_path / "optimizer.json"
    f.write_text(json.dumps({"base": {"optimizer": "lion8bit"}, "triton_8bit_step": True}))
    warnings = []
    assert load_optimizer_config(str(f), warn=warnings.append).triton_8bit_step
    assert any("triton_8bit_step is used by adamw8bit only" in w for w in warnings)
    f.write_text(json.dumps({"grouped_8bit_step": False, "triton_8bit_step": True}))
    with pytest.raises(ConfigError, match="triton_8bit_step true needs grouped_8bit_step true"):
        build_optimizer_parts(load_optimizer_config(str(f)), unet=make_model(), total_steps=10, batch_size=1,
                              grad_accum=1, device_type="cpu")


def test_fused_backward_problems_name_each_fix(tmp_path):
    from optimizer.build import fused_backward_problems
    ok = load_optimizer_config(None)
    te1 = ["text_encoder"]
    assert fused_backward_problems(ok, train_unet=True, train_text_encoders=te1, grad_accum=1, clip_grad_norm=None,
                                   fp16=False, processes=1) == []
    f = tmp_path / "optimizer.json"
    f.write_text(json.dumps({"text_encoder_overrides": {"optimizer": "adamw"}}))
    te_adamw = load_optimizer_config(str(f))
    problems = fused_backward_problems(te_adamw, train_unet=True, train_text_encoders=te1, grad_accum=1,
                                       clip_grad_norm=None, fp16=True, processes=2)
    assert [p.split(":")[0] for p in problems] == ["optimizer.json text_encoder_overrides", "fp16 needs a GradScaler, "
                                                   "which checks all gradients before any step", "2 processes"]
    assert fused_backward_problems(te_adamw, train_unet=True, train_text_encoders=[], grad_accum=1, clip_grad_norm=None,
                                   fp16=False, processes=1) == []   # a frozen text encoder's optimizer is unused


def test_backward_steps_refuse_a_second_gradient_after_the_step():
    """A weight that gets a gradient again after its chunk was stepped would be updated twice: a clear error."""
    model = torch.nn.Linear(4, 4, bias=False)
    opt = grouped("adam", list(model.parameters()))
    opt.step_in_backward()
    x = torch.randn(2, 4)
    a = model(x).sum()
    b = model(x).square().sum()
    a.backward()                      # the chunk completes and is stepped
    with pytest.raises(RuntimeError, match="second gradient in one backward pass"):
        b.backward()                  # no step() in between: the same step's second gradient


def test_overlapped_backward_steps_need_cuda():
    """The second stream is a CUDA stream; on the CPU asking for it is an error, not a silent no-op (the GPU
    check that it trains bit for bit like the main stream is tests/gpu/test_overlap_step.py)."""
    model = make_model()
    with pytest.raises(ValueError, match="overlap needs all parameters on one CUDA device"):
        grouped("adam", model.parameters()).step_in_backward(overlap=True)
