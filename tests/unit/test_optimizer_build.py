"""Optimizers on the tiny SD model, text-encoder freezing, exact resume, and what the trainer reads back."""
import copy
import io

import pytest
import torch

from optimizer.build import (GRAD_SCALER_TWEAKS, build_optimizer_parts, current_lr, describe, eval_weights,
                             grad_scaler_tweak, scale_lr_factor, set_train_mode, uses_train_eval_modes)
from optimizer.config import (OPTIMIZERS, FreezeSettings, OptimizerConfig, PartSettings, load_optimizer_config,
                              with_defaults)
from optimizer.freezing import apply_text_encoder_freezing, freeze_plan
from utils.core.config_schema import ConfigError


@pytest.fixture(scope="module")
def tiny_models(tiny_sd_folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    return (UNet2DConditionModel.from_pretrained(tiny_sd_folder / "unet"),
            CLIPTextModel.from_pretrained(tiny_sd_folder / "text_encoder"))


@pytest.fixture
def models(tiny_models):
    unet, text_encoder = tiny_models
    return copy.deepcopy(unet), copy.deepcopy(text_encoder)


def config(part: PartSettings, te_part: PartSettings | None = None, **freezing) -> OptimizerConfig:
    return OptimizerConfig(unet=with_defaults(part), text_encoder=with_defaults(te_part or part),
                           text_encoder_freezing=FreezeSettings(**freezing))


def build(cfg, unet, text_encoder, total_steps=10, warnings=None, **kw):
    return build_optimizer_parts(cfg, unet=unet, text_encoders=[("text_encoder", text_encoder)],
                                 total_steps=total_steps, batch_size=2, grad_accum=1, device_type="cpu",
                                 warn=(warnings.append if warnings is not None else lambda m: None), **kw)


def train_steps(unet, text_encoder, parts, steps, first_batch=0):
    """Deterministic optimizer steps: batch i is generated from seed i."""
    for i in range(first_batch, first_batch + steps):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 512, (2, 16), generator=g)
        latents = torch.randn(2, 4, 8, 8, generator=g)
        loss = unet(latents, torch.tensor([10, 500]), text_encoder(ids).last_hidden_state).sample.pow(2).mean()
        loss.backward()
        for part in parts:
            part.optimizer.step()
            part.scheduler.step()
            part.optimizer.zero_grad(set_to_none=True)


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


LR = {"prodigy": 1.0, "dadapt_adam": 1.0, "dadapt_lion": 1.0, "dadapt_sgd": 1.0}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_unet_and_text_encoder(models, name):
    unet, text_encoder = models
    part = PartSettings(optimizer=name, lr=LR.get(name, 1e-4),
                        lr_scheduler="constant" if name == "adamw_schedulefree" else "cosine")
    parts = build(config(part), unet, text_encoder)
    assert [p.name for p in parts] == ["unet", "text_encoder"]
    before = {"unet": snapshot(unet), "text_encoder": snapshot(text_encoder)}
    train_steps(unet, text_encoder, parts, 2)
    for module, key in ((unet, "unet"), (text_encoder, "text_encoder")):
        unchanged = [n for n, p in module.named_parameters() if torch.equal(p, before[key][n])]
        assert unchanged == [], f"{name} left {key} tensors unchanged: {unchanged[:3]}"
    assert all(current_lr(p) > 0 for p in parts)


def test_eight_bit_optimizers_keep_8bit_state_on_cpu():
    # bitsandbytes 0.50.2 runs its 8-bit optimizers on CPU; tensors of 4096+ elements get uint8 state
    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64)
    for name in ("adamw8bit", "lion8bit"):
        parts = build(config(PartSettings(optimizer=name, lr=1e-3)), layer, None)
        layer(torch.randn(4, 128)).sum().backward()
        parts[0].optimizer.step()
        assert parts[0].optimizer.state[layer.weight]["state1"].dtype == torch.uint8


def test_frozen_text_encoder_layers_stay_bit_identical_with_no_grad(models):
    unet, text_encoder = models
    cfg = config(PartSettings(optimizer="adamw", lr=1e-3), unfreeze_last_n_layers=1)
    parts = build(cfg, unet, text_encoder)
    te_part = parts[1]
    before = snapshot(text_encoder)
    train_steps(unet, text_encoder, parts, 2)
    frozen_prefixes = ("embeddings.", "encoder.layers.0.")   # embeddings freeze with the layers (EveryDream2)
    trained_ids = {id(p) for p in te_part.params}
    for name, param in text_encoder.named_parameters():
        if name.startswith(frozen_prefixes):
            assert torch.equal(param, before[name]), name
            assert param.grad is None and not param.requires_grad and id(param) not in trained_ids, name
        else:
            assert not torch.equal(param, before[name]) and param.requires_grad, name
    assert sum(p.numel() for p in te_part.params) < te_part.total_params
    assert "last 1 of 2 layers train, embeddings frozen" in describe(parts)


def test_freezing_options(models):
    _, text_encoder = models

    def trained(**freezing):
        params, _ = apply_text_encoder_freezing(text_encoder, FreezeSettings(**freezing), lambda m: None)
        ids = {id(p) for p in params}
        return sorted({n.split(".")[0] if not n.startswith("encoder") else ".".join(n.split(".")[:3])
                       for n, p in text_encoder.named_parameters() if id(p) in ids})

    everything = ["embeddings", "encoder.layers.0", "encoder.layers.1", "final_layer_norm"]
    assert trained() == everything
    assert trained(unfreeze_last_n_layers=1) == ["encoder.layers.1", "final_layer_norm"]
    assert trained(unfreeze_last_n_layers=1, freeze_embeddings=False) == \
        ["embeddings", "encoder.layers.1", "final_layer_norm"]
    assert trained(freeze_embeddings=True, freeze_final_layer_norm=True) == ["encoder.layers.0", "encoder.layers.1"]
    assert trained(unfreeze_last_n_layers=0) == ["final_layer_norm"]
    assert trained(unfreeze_last_n_layers=5) == everything       # capped at the layer count
    assert trained(freeze_front_n_layers=1) == ["encoder.layers.1", "final_layer_norm"]
    # calling again re-enables what an earlier call froze
    assert trained() == everything


def test_freeze_plan_for_sd21_sized_encoder():
    warnings = []
    plan = freeze_plan(FreezeSettings(freeze_front_n_layers=21), 23, warnings.append)
    assert (plan.trained_layers, plan.freeze_embeddings, plan.freeze_final_layer_norm) == (2, True, False)
    plan = freeze_plan(FreezeSettings(unfreeze_last_n_layers=30), 23, warnings.append)
    assert plan.trained_layers == 23 and not plan.freeze_embeddings and "has 23 layers" in warnings[0]


def test_transformers_4_layout_under_text_model(models):
    _, text_encoder = models

    class LegacyCLIPTextModel(torch.nn.Module):   # transformers 4.x: parts under .text_model
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

    legacy = LegacyCLIPTextModel(text_encoder)
    params, plan = apply_text_encoder_freezing(legacy, FreezeSettings(unfreeze_last_n_layers=1), lambda m: None)
    assert plan.total_layers == 2 and not text_encoder.embeddings.token_embedding.weight.requires_grad
    assert len(params) == len([p for p in legacy.parameters() if p.requires_grad]) > 0


def test_freezing_a_model_of_another_shape_is_an_error():
    other = torch.nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="needs a CLIP text encoder"):
        apply_text_encoder_freezing(other, FreezeSettings(unfreeze_last_n_layers=1), lambda m: None)
    params, plan = apply_text_encoder_freezing(other, FreezeSettings(), lambda m: None)
    assert len(params) == 2 and plan is None


def test_a_fully_frozen_text_encoder_is_not_trained(models):
    unet, text_encoder = models
    warnings = []
    parts = build(config(PartSettings(), unfreeze_last_n_layers=0, freeze_final_layer_norm=True), unet,
                  text_encoder, warnings=warnings)
    assert [p.name for p in parts] == ["unet"] and "not trained" in warnings[0]
    assert not any(p.requires_grad for p in text_encoder.parameters())


def test_parts_that_are_none_are_not_built(models):
    unet, text_encoder = models
    assert [p.name for p in build(config(PartSettings()), None, text_encoder)] == ["text_encoder"]
    assert [p.name for p in build(config(PartSettings()), unet, None)] == ["unet"]
    with pytest.raises(ConfigError, match="nothing to train"):
        build(config(PartSettings()), None, None)


def test_separate_settings_per_part(models):
    unet, text_encoder = models
    cfg = config(PartSettings(optimizer="adamw", lr=1e-6),
                 PartSettings(optimizer="lion", lr=5e-7, lr_scheduler="cosine", weight_decay=0.0))
    parts = build(cfg, unet, text_encoder, total_steps=100)
    assert type(parts[0].optimizer).__name__ == "AdamW" and type(parts[1].optimizer).__name__ == "Lion"
    assert parts[1].optimizer.param_groups[0]["weight_decay"] == 0.0
    assert (parts[1].settings.lr_warmup_steps, parts[1].settings.lr_decay_steps) == (2, 100)
    assert current_lr(parts[0]) == 1e-6 and current_lr(parts[1]) == pytest.approx(5e-7 / 3)  # warmup step 0


def test_scale_lr(models):
    unet, text_encoder = models
    warnings = []
    cfg = config(PartSettings(optimizer="adamw", lr=1e-6), PartSettings(optimizer="prodigy", lr=1.0))
    parts = build_optimizer_parts(cfg, unet=unet, text_encoders=[("text_encoder", text_encoder)], total_steps=10,
                                  batch_size=4, grad_accum=2, scale_lr=True, device_type="cpu", warn=warnings.append)
    assert scale_lr_factor(4, 2) == pytest.approx(8 ** 0.55)
    assert parts[0].optimizer.param_groups[0]["lr"] == pytest.approx(1e-6 * 8 ** 0.55)
    assert parts[1].optimizer.param_groups[0]["lr"] == 1.0 and "not applied to prodigy" in warnings[0]
    assert "scale_lr" in describe(parts).splitlines()[0]


def test_current_lr_of_adaptive_optimizers_is_d_times_lr(models):
    unet, text_encoder = models
    parts = build(config(PartSettings(optimizer="prodigy", lr=0.5)), unet, text_encoder)
    train_steps(unet, text_encoder, parts, 2)
    group = parts[0].optimizer.param_groups[0]
    assert current_lr(parts[0]) == pytest.approx(group["d"] * 0.5) and group["lr"] == 0.5
    assert current_lr(parts[0]) != group["lr"]   # d starts at d0 = 1e-6 and grows as it learns the scale


def test_describe_has_one_line_per_part(models):
    unet, text_encoder = models
    cfg = load_optimizer_config(None)
    lines = describe(build(cfg, unet, text_encoder, total_steps=50)).splitlines()
    assert len(lines) == 2 and lines[0].startswith("unet: adamw8bit (GroupedAdamW8bit), lr 1e-06, constant;")
    assert lines[1].startswith("text_encoder: adamw8bit") and "12,960 of 12,960 parameters train" in lines[1]


def test_schedule_free_train_and_eval_modes(models):
    unet, text_encoder = models
    parts = build(config(PartSettings(optimizer="adamw_schedulefree", lr=1e-3, lr_warmup_steps=4)), unet,
                  text_encoder)
    assert all(uses_train_eval_modes(p) for p in parts)
    assert current_lr(parts[0]) == pytest.approx(1e-3 / 4)      # its own warmup: (k + 1) / warmup
    train_steps(unet, text_encoder, parts, 2)
    train_weights = snapshot(unet)
    with eval_weights(parts):
        name = next(iter(train_weights))
        assert not torch.equal(dict(unet.named_parameters())[name], train_weights[name])  # averaged weights
    train_steps(unet, text_encoder, parts, 1, first_batch=2)      # back in train mode: steps work
    set_train_mode(parts, False)
    with pytest.raises(Exception, match="not in train mode"):
        parts[0].optimizer.step()


def test_non_schedule_free_parts_ignore_mode_switches(models):
    unet, text_encoder = models
    parts = build(config(PartSettings(optimizer="adamw")), unet, text_encoder)
    before = snapshot(unet)
    with eval_weights(parts):
        pass
    assert not uses_train_eval_modes(parts[0])
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adamw8bit", "adamw_schedulefree"])
def test_state_dict_round_trip_resumes_exactly(tiny_models, name):
    """4 steps straight == 2 steps, save, load into fresh objects, 2 steps: bit-equal on CPU."""
    part = PartSettings(optimizer=name, lr=LR.get(name, 1e-3),
                        lr_scheduler="constant_with_warmup" if name == "adamw_schedulefree" else "cosine",
                        lr_warmup_steps=1)
    cfg = config(part, unfreeze_last_n_layers=1)

    straight = copy.deepcopy(tiny_models)
    parts = build(cfg, *straight, total_steps=4)
    train_steps(*straight, parts, 4)

    first = copy.deepcopy(tiny_models)
    parts = build(cfg, *first, total_steps=4)
    train_steps(*first, parts, 2)
    buffer = io.BytesIO()   # through bytes, as a checkpoint on disk would be
    # resumable checkpoints save schedule-free weights in train mode; eval mode is for the exported model
    torch.save({"models": [m.state_dict() for m in first],
                "optimizers": [p.optimizer.state_dict() for p in parts],
                "schedulers": [p.scheduler.state_dict() for p in parts]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = copy.deepcopy(tiny_models)
    for module, state in zip(resumed, saved["models"]):
        module.load_state_dict(state)
    parts = build(cfg, *resumed, total_steps=4)
    for part, opt_state, sched_state in zip(parts, saved["optimizers"], saved["schedulers"]):
        part.optimizer.load_state_dict(opt_state)
        part.scheduler.load_state_dict(sched_state)
    train_steps(*resumed, parts, 2, first_batch=2)

    for a, b in zip(straight, resumed):
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), f"{name}: {n} differs after resume"
    assert parts[0].scheduler.last_epoch == 4


def test_grad_scaler_tweaks_follow_everydream2():
    assert grad_scaler_tweak(499) is None and grad_scaler_tweak(0) is None
    assert grad_scaler_tweak(500) == (1.8, 1 / 1.8, 100)
    assert grad_scaler_tweak(4000) == (1.15, 1 / 1.15, 2000)
    assert sorted(GRAD_SCALER_TWEAKS) == [500, 1000, 2000, 4000]
