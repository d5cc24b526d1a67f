"""Noise, timesteps, zero terminal SNR, targets, losses, masks, timestep weights and text conditioning, each
checked against its paper's definition with expected values computed here, independently of the code."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.sd.losses import (loss_per_sample, mask_to_latent_weight, timestep_weights, training_target,
                          use_mask_this_step)
from utils.sd.noise import (make_noise_scheduler, sample_noise, sample_timesteps, sampling_settings,
                         scheduler_supports_zero_terminal_snr)
from utils.sd.text_conditioning import encode_prompts, final_layer_norm, perturb_embeddings

# Stable Diffusion 1.x/2.x schedule, as a model folder's scheduler_config.json holds it (here a PNDM config).
SD_SCHEDULER_CONFIG = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                       "clip_sample": False}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sd_alphas_cumprod_by_hand() -> list[float]:
    """alpha_bar_t for the scaled_linear schedule, in float64: betas = linspace(sqrt(b0), sqrt(b1), T)**2."""
    lo, hi, n = math.sqrt(0.00085), math.sqrt(0.012), 1000
    out, prod = [], 1.0
    for i in range(n):
        beta = (lo + (hi - lo) * i / (n - 1)) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return out


def zero_snr_alphas_cumprod_by_hand() -> list[float]:
    """arXiv 2305.08891 Algorithm 1: shift sqrt(alpha_bar) so the last is 0, scale so the first is unchanged."""
    s = [math.sqrt(a) for a in sd_alphas_cumprod_by_hand()]
    s0, sT = s[0], s[-1]
    return [((x - sT) * s0 / (s0 - sT)) ** 2 for x in s]


# ---------------------------------------------------------------- noise


def test_white_noise_is_seeded_and_follows_latents_dtype():
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    a = sample_noise(latents, gen(1))
    b = sample_noise(latents, gen(1))
    assert a.dtype == torch.bfloat16 and a.shape == latents.shape
    assert torch.equal(a, b)
    assert torch.equal(a, torch.randn(2, 4, 8, 8, generator=gen(1)).to(torch.bfloat16))
    assert torch.equal(sample_noise(latents, gen(1), pyramid_noise_discount=0.0), a)  # 0 = off, as EveryDream2


def test_offset_noise_statistics():
    ratio = 0.3
    latents = torch.zeros(256, 4, 32, 32)
    white = sample_noise(latents, gen(3))
    noise = sample_noise(latents, gen(3), zero_frequency_noise_ratio=ratio)
    offset = noise - white  # the white part is the same draw: what remains is ratio * N(0,1) per sample and channel
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-6)
    assert offset[:, :, 0, 0].std().item() == pytest.approx(ratio, rel=0.06)
    channel_means = noise.mean(dim=(2, 3))  # white part contributes std 1/32
    assert channel_means.std().item() == pytest.approx(math.sqrt(ratio**2 + 1 / 1024), rel=0.06)
    assert noise.std().item() == pytest.approx(math.sqrt(1 + ratio**2), rel=0.02)


def _lag1_correlation(x: torch.Tensor) -> float:
    a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_pyramid_noise_has_unit_std_and_spatial_correlation():
    latents = torch.zeros(8, 4, 64, 64)
    white = sample_noise(latents, gen(5))
    pyramid = sample_noise(latents, gen(5), pyramid_noise_discount=0.8)
    per_sample_std = pyramid.flatten(1).std(dim=1)
    assert torch.allclose(per_sample_std, torch.ones(8), atol=1e-5)
    assert abs(_lag1_correlation(white)) < 0.02
    assert _lag1_correlation(pyramid) > 0.15  # low-frequency levels make neighbours alike
    # a higher discount weights the coarse levels more
    assert _lag1_correlation(sample_noise(latents, gen(5), pyramid_noise_discount=0.9)) > \
        _lag1_correlation(sample_noise(latents, gen(5), pyramid_noise_discount=0.3))
    assert torch.equal(pyramid, sample_noise(latents, gen(5), pyramid_noise_discount=0.8))


@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (2, 4, 7, 13), (1, 4, 96, 64)])
def test_pyramid_noise_odd_shapes(shape):
    noise = sample_noise(torch.zeros(shape), gen(), pyramid_noise_discount=0.5, zero_frequency_noise_ratio=0.1)
    assert noise.shape == shape and torch.isfinite(noise).all()


def test_sample_timesteps_uniform_in_range():
    t = sample_timesteps(20000, gen(7), start=100, end=200, device="cpu")
    assert t.dtype == torch.int64 and t.min().item() == 100 and t.max().item() == 199
    counts = torch.bincount(t - 100, minlength=100)
    assert counts.min().item() > 120 and counts.max().item() < 290  # expected 200 each
    assert torch.equal(t, sample_timesteps(20000, gen(7), start=100, end=200, device="cpu"))
    with pytest.raises(ValueError):
        sample_timesteps(4, gen(), start=500, end=500)


def test_noise_scheduler_from_any_config_matches_the_schedule():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=False)
    assert type(sched).__name__ == "DDPMScheduler"
    expected = torch.tensor(sd_alphas_cumprod_by_hand(), dtype=torch.float64)
    assert torch.allclose(sched.alphas_cumprod.double(), expected, rtol=1e-4, atol=0)
    v = make_noise_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, zero_terminal_snr=False)
    assert v.config.prediction_type == "v_prediction"


def test_zero_terminal_snr_schedule():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=True)
    ab = sched.alphas_cumprod
    assert ab[-1].item() == 0.0  # exactly
    snr = ab.double() / (1 - ab.double())
    assert snr[-1].item() == 0.0 and bool((snr[1:] < snr[:-1]).all())  # strictly decreasing
    expected = torch.tensor(zero_snr_alphas_cumprod_by_hand(), dtype=torch.float64)
    assert torch.allclose(ab.double(), expected, rtol=1e-3, atol=1e-7)
    # the first alpha_bar is kept (Algorithm 1 rescales so sqrt(alpha_bar_0) is unchanged)
    assert ab[0].item() == pytest.approx(1 - 0.00085, rel=1e-6)
    # the flag overrides one already in the model's config
    off = make_noise_scheduler({**SD_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True}, zero_terminal_snr=False)
    assert off.alphas_cumprod[-1].item() > 1e-3


def test_sampling_settings_for_zero_terminal_snr():
    from diffusers import DDIMScheduler, PNDMScheduler
    s = sampling_settings(zero_terminal_snr=True)
    assert s.guidance_rescale == 0.7
    assert s.scheduler_overrides == {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    ddim = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG, **s.scheduler_overrides)
    ddim.set_timesteps(10)
    assert ddim.timesteps[0].item() == 999 and ddim.alphas_cumprod[-1].item() == 0.0
    assert sampling_settings(zero_terminal_snr=False).guidance_rescale == 0.0
    assert scheduler_supports_zero_terminal_snr(DDIMScheduler)
    assert not scheduler_supports_zero_terminal_snr(PNDMScheduler)


# ---------------------------------------------------------------- targets


def test_epsilon_target_is_the_noise():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=False)
    noise = torch.randn(2, 4, 4, 4, generator=gen())
    assert training_target(sched, torch.zeros_like(noise), noise, torch.tensor([1, 2])) is noise


@pytest.mark.parametrize("zero_snr", [False, True])
def test_v_target_identity(zero_snr):
    sched = make_noise_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "v_prediction"}, zero_terminal_snr=zero_snr)
    ab_all = zero_snr_alphas_cumprod_by_hand() if zero_snr else sd_alphas_cumprod_by_hand()
    t = torch.tensor([0, 250, 998, 999])
    x0 = torch.randn(4, 4, 4, 4, generator=gen(1), dtype=torch.float64)
    eps = torch.randn(4, 4, 4, 4, generator=gen(2), dtype=torch.float64)
    ab = torch.tensor([ab_all[i] for i in t], dtype=torch.float64).view(4, 1, 1, 1)
    v = training_target(sched, x0, eps, t)
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-4)
    x_t = sched.add_noise(x0, eps, t)
    x0_back = ab.sqrt() * x_t - (1 - ab).sqrt() * v  # recover x0 from x_t and v
    assert torch.allclose(x0_back, x0, atol=1e-4)
    if zero_snr:
        assert torch.allclose(v[3], -x0[3], atol=1e-6)  # pure noise at t = T-1: v = -x0


def test_unsupported_prediction_type_raises():
    sched = make_noise_scheduler({**SD_SCHEDULER_CONFIG, "prediction_type": "sample"}, zero_terminal_snr=False)
    with pytest.raises(ValueError, match="prediction_type"):
        training_target(sched, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))
    with pytest.raises(ValueError, match="prediction_type"):
        timestep_weights(sched, torch.tensor([1]), prediction_type="sample", min_snr_gamma=5.0)


# ---------------------------------------------------------------- losses

# One sample, four elements: differences pred - target = 0.5, -2, 3, 0.
PRED = torch.tensor([0.5, -2.0, 3.0, 0.0]).view(1, 1, 2, 2)
TARGET = torch.zeros(1, 1, 2, 2)


@pytest.mark.parametrize("loss_type,delta,expected", [
    ("mse", 1.0, (0.25 + 4 + 9 + 0) / 4),
    ("mae", 1.0, (0.5 + 2 + 3 + 0) / 4),
    # Huber, delta 1: 0.5*d^2 where |d| <= 1, else delta*(|d| - delta/2)
    ("huber", 1.0, (0.125 + 1.5 + 2.5 + 0) / 4),
    ("huber", 2.0, (0.125 + 2.0 + 4.0 + 0) / 4),
    ("smooth_l1", 1.0, (0.125 + 1.5 + 2.5 + 0) / 4),
    # smooth L1, beta 2: 0.5*d^2/beta where |d| < beta, else |d| - beta/2
    ("smooth_l1", 2.0, (0.0625 + 1.0 + 2.0 + 0) / 4),
])
def test_loss_values_by_hand(loss_type, delta, expected):
    out = loss_per_sample(PRED, TARGET, torch.tensor([500]), loss_type=loss_type, huber_delta=delta)
    assert out.shape == (1,) and out.dtype == torch.float32
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_blended_losses_direction():
    mse, huber = 13.25 / 4, 4.125 / 4
    pred, target = PRED.repeat(3, 1, 1, 1), TARGET.repeat(3, 1, 1, 1)
    t = torch.tensor([0, 999, 333])
    s = 333 / 999
    mse_huber = loss_per_sample(pred, target, t, loss_type="mse_huber", num_train_timesteps=1000)
    huber_mse = loss_per_sample(pred, target, t, loss_type="huber_mse", num_train_timesteps=1000)
    # "mse_huber": MSE at t = 0, Huber at t = T-1 (the first-named loss at low noise); huber_mse the mirror
    assert mse_huber.tolist() == pytest.approx([mse, huber, (1 - s) * mse + s * huber], rel=1e-6)
    assert huber_mse.tolist() == pytest.approx([huber, mse, (1 - s) * huber + s * mse], rel=1e-6)


def test_loss_runs_in_float32_for_half_inputs():
    out = loss_per_sample(PRED.half(), TARGET.half(), torch.tensor([1]))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(13.25 / 4)


def test_unknown_loss_type_raises():
    with pytest.raises(ValueError, match="loss_type"):
        loss_per_sample(PRED, TARGET, torch.tensor([1]), loss_type="l2")


def test_pixel_weight_multiplies_elementwise_loss():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # [1, 2, 2, 2]
    target = torch.zeros_like(pred)
    w = torch.tensor([[[[1.0, 0.5], [0.0, 2.0]]]])  # [1, 1, 2, 2], same for both channels
    expected = (1 * 1 + 0.5 * 4 + 0 * 9 + 2 * 16 + 1 * 0 + 0.5 * 1 + 0 * 0 + 2 * 1) / 8
    assert loss_per_sample(pred, target, torch.tensor([0]), pixel_weight=w).item() == pytest.approx(expected)
    per_channel = torch.cat([w, torch.ones_like(w)], dim=1)  # [1, 2, 2, 2]
    expected = (1 * 1 + 0.5 * 4 + 0 * 9 + 2 * 16 + 0 + 1 + 0 + 1) / 8
    assert loss_per_sample(pred, target, torch.tensor([0]), pixel_weight=per_channel).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="pixel_weight"):
        loss_per_sample(pred, target, torch.tensor([0]), pixel_weight=torch.ones(1, 1, 4, 4))


def test_mask_weights_and_normalisation():
    # 4x4 pixel mask -> 2x2 latent cells: all white, all black, half white, a quarter white
    mask = torch.tensor([[1, 1, 0, 0],
                         [1, 1, 0, 0],
                         [1, 0, 1, 0],
                         [1, 0, 0, 0]], dtype=torch.float32).view(1, 1, 4, 4)
    w = mask_to_latent_weight(mask, (2, 2), unmasked_weight=0.1)
    expected = torch.tensor([[1.0, 0.1], [0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.25]]).view(1, 1, 2, 2)
    assert w.shape == (1, 1, 2, 2) and torch.allclose(w, expected)
    normalized = mask_to_latent_weight(mask, (2, 2), unmasked_weight=0.1, normalize_masked_area_loss=True)
    assert torch.allclose(normalized, expected / expected.mean())
    assert normalized.mean().item() == pytest.approx(1.0)
    # with mean-1 weights the loss is the weighted mean sum(w*l) / sum(w)
    pred = torch.arange(16.0).view(1, 1, 4, 4)[:, :, ::2, ::2]
    l = pred ** 2
    assert loss_per_sample(pred, torch.zeros_like(pred), torch.tensor([0]), pixel_weight=normalized).item() == \
        pytest.approx(((l * expected).sum() / expected.sum()).item(), rel=1e-6)
    # unmasked_weight 1 ignores the mask; [B, H, W] masks are accepted; None stays None
    assert torch.allclose(mask_to_latent_weight(mask[:, 0], (2, 2), unmasked_weight=1.0), torch.ones(1, 1, 2, 2))
    assert mask_to_latent_weight(None, (2, 2)) is None


def test_mask_normalisation_of_an_all_black_mask_with_zero_weight_stays_finite():
    w = mask_to_latent_weight(torch.zeros(2, 1, 8, 8), (4, 4), unmasked_weight=0.0, normalize_masked_area_loss=True)
    assert torch.equal(w, torch.zeros(2, 1, 4, 4))


def test_use_mask_this_step_frequency():
    g = gen(11)
    used = sum(use_mask_this_step(g, 0.25) for _ in range(4000))
    assert used / 4000 == pytest.approx(0.75, abs=0.03)
    g0, g1 = gen(1), gen(1)
    assert use_mask_this_step(g0, 0.0) is True and use_mask_this_step(g1, 1.0) is False
    assert torch.equal(g0.get_state(), g1.get_state())  # one draw either way


# ---------------------------------------------------------------- timestep weights

T_CHECK = [0, 10, 250, 500, 800, 999]


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_the_paper(gamma):
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=False)
    ab = sd_alphas_cumprod_by_hand()
    snr = [ab[t] / (1 - ab[t]) for t in T_CHECK]
    t = torch.tensor(T_CHECK)
    eps = timestep_weights(sched, t, prediction_type="epsilon", min_snr_gamma=gamma)
    v = timestep_weights(sched, t, prediction_type="v_prediction", min_snr_gamma=gamma)
    assert eps.tolist() == pytest.approx([min(s, gamma) / s for s in snr], rel=1e-3)
    assert v.tolist() == pytest.approx([min(s, gamma) / (s + 1) for s in snr], rel=1e-3)


def test_debiased_estimation_weights():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=False)
    ab = sd_alphas_cumprod_by_hand()
    snr = [ab[t] / (1 - ab[t]) for t in T_CHECK]
    t = torch.tensor(T_CHECK)
    eps = timestep_weights(sched, t, prediction_type="epsilon", debiased_estimation=True)
    v = timestep_weights(sched, t, prediction_type="v_prediction", debiased_estimation=True)
    assert eps.tolist() == pytest.approx([1 / math.sqrt(min(max(s, 1e-3), 1e3)) for s in snr], rel=1e-3)
    assert v.tolist() == pytest.approx([1 / math.sqrt(s + 1) for s in snr], rel=1e-3)
    both = timestep_weights(sched, t, prediction_type="epsilon", min_snr_gamma=5.0, debiased_estimation=True)
    assert both.tolist() == pytest.approx([min(s, 5) / s / math.sqrt(min(max(s, 1e-3), 1e3)) for s in snr], rel=1e-3)


def test_weights_at_zero_terminal_snr_endpoints_are_finite():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=True)
    t = torch.tensor([0, 998, 999])  # SNR(999) = 0 exactly
    eps = timestep_weights(sched, t, prediction_type="epsilon", min_snr_gamma=5.0)
    v = timestep_weights(sched, t, prediction_type="v_prediction", min_snr_gamma=5.0)
    assert eps[2].item() == 1.0 and v[2].item() == 0.0  # the limits of min(SNR, g)/SNR and min(SNR, g)/(SNR+1)
    d_eps = timestep_weights(sched, t, prediction_type="epsilon", debiased_estimation=True)
    d_v = timestep_weights(sched, t, prediction_type="v_prediction", debiased_estimation=True)
    assert d_eps[2].item() == pytest.approx(1 / math.sqrt(1e-3), rel=1e-5) and d_v[2].item() == 1.0
    for w in (eps, v, d_eps, d_v):
        assert torch.isfinite(w).all()


def test_infinite_snr_gives_finite_weights():
    class Sched:  # alpha_bar = 1 at t = 0: SNR = inf
        alphas_cumprod = torch.tensor([1.0, 0.5, 0.0])
    t = torch.tensor([0, 1, 2])
    assert timestep_weights(Sched, t, prediction_type="epsilon", min_snr_gamma=5.0).tolist() == [0.0, 1.0, 1.0]
    assert timestep_weights(Sched, t, prediction_type="v_prediction", min_snr_gamma=5.0).tolist() == [0.0, 0.5, 0.0]
    d = timestep_weights(Sched, t, prediction_type="v_prediction", debiased_estimation=True)
    assert d.tolist() == pytest.approx([0.0, 1 / math.sqrt(2), 1.0])
    assert timestep_weights(Sched, t, prediction_type="epsilon", debiased_estimation=True)[0].item() == \
        pytest.approx(1 / math.sqrt(1000))


def test_no_weighting_is_ones():
    sched = make_noise_scheduler(SD_SCHEDULER_CONFIG, zero_terminal_snr=False)
    assert torch.equal(timestep_weights(sched, torch.tensor([3, 900]), prediction_type="epsilon"), torch.ones(2))


# ---------------------------------------------------------------- text conditioning


@pytest.fixture(scope="module")
def tiny_text_encoder(tiny_sd_folder):
    from transformers import CLIPTextModel
    return CLIPTextModel.from_pretrained(tiny_sd_folder / "text_encoder").eval()


IDS = torch.tensor([[512, 40, 41, 42, 513, 513, 513, 513], [512, 60, 513, 513, 513, 513, 513, 513]])


def test_clip_skip_selects_layers_through_the_final_layer_norm(tiny_text_encoder):
    te = tiny_text_encoder  # 2 layers
    captured = {}
    hook = te.encoder.layers[0].register_forward_hook(
        lambda m, i, o: captured.__setitem__("layer0", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            last = encode_prompts(te, IDS, clip_skip=0)
            one = encode_prompts(te, IDS, clip_skip=1)
            two = encode_prompts(te, IDS, clip_skip=2)
    finally:
        hook.remove()
    norm = te.final_layer_norm
    by_hand = lambda x: F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)
    assert torch.equal(last, one) and last.shape == (2, 8, 16)
    with torch.no_grad():
        assert torch.allclose(last, te(IDS).last_hidden_state)
        # clip_skip 2 = the penultimate layer's output (here layer 1 of 2) through the final layer norm
        assert torch.allclose(two, by_hand(captured["layer0"]), atol=1e-6)
        assert torch.allclose(two, by_hand(te(IDS, output_hidden_states=True).hidden_states[-2]), atol=1e-6)
    assert not torch.allclose(two, last)
    for bad in (3, -1):  # 3 would skip every layer of this 2-layer encoder
        with pytest.raises(ValueError, match="clip_skip"):
            encode_prompts(te, IDS, clip_skip=bad)


def test_final_layer_norm_found_on_transformers_4_layout(tiny_text_encoder):
    class Wrapped(torch.nn.Module):  # transformers 4.x: CLIPTextModel.text_model.final_layer_norm
        def __init__(self, inner):
            super().__init__()
            self.text_model = inner

        def forward(self, input_ids, **kw):
            return self.text_model(input_ids, **kw)

    wrapped = Wrapped(tiny_text_encoder)
    assert final_layer_norm(wrapped) is tiny_text_encoder.final_layer_norm
    with torch.no_grad():
        expected = encode_prompts(tiny_text_encoder, IDS, clip_skip=2)
        assert torch.equal(encode_prompts(wrapped, IDS, clip_skip=2), expected)


def test_embedding_perturbation_std():
    d = 256
    gamma = 2.0
    emb = torch.zeros(64, 77, d)
    out = perturb_embeddings(emb, gen(9), gamma=gamma)
    assert out.std().item() == pytest.approx(gamma / math.sqrt(d), rel=0.02)  # 2/16 = 0.125
    assert out.mean().abs().item() < 0.002
    assert torch.equal(out, perturb_embeddings(emb, gen(9), gamma=gamma))
    assert perturb_embeddings(emb, gen(9), gamma=0.0) is emb
    leaf = torch.zeros(2, 3, 8, requires_grad=True)
    perturb_embeddings(leaf, gen(), gamma=1.0).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))  # additive noise: gradients pass through unchanged


def test_final_layer_norm_is_found_through_a_ddp_wrapper(tiny_sd_folder):
    """Several processes wrap the text encoder in DistributedDataParallel, which exposes it as .module."""
    from transformers import CLIPTextModel
    from utils.sd.text_conditioning import final_layer_norm
    te = CLIPTextModel.from_pretrained(tiny_sd_folder / "text_encoder")

    class Wrapper(torch.nn.Module):  # what DDP looks like from outside: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module
    assert final_layer_norm(Wrapper(te)) is final_layer_norm(te)
