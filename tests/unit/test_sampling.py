"""Sample prompts (.txt / EveryDream2 .json), schedulers by name, batched generation and the CFG grid."""
import json
import math
import random

import numpy as np
import pytest
import torch

from utils.core.config_schema import ConfigError
from utils.eval.sample_config import (DEFAULT_CFGS, SampleConfigSource, SampleRequest, load_sample_config,
                                     plan_samples, size_for_aspect)
from utils.eval.sample_schedulers import make_sampling_scheduler, parse_scheduler_name, scheduler_names
from utils.eval.sampling import (build_pipeline, generate, make_grid, prompt_encoder, sample_stem, sample_tag,
                                 write_sample)

CAPTIONS = ["a red ball", "a blue cube", "a green cone", "a yellow star", "a white cat", "a black dog"]


def load(path, **kw):
    args = dict(default_seed=555, default_size=(512, 512), default_steps=20)
    args.update(kw)
    return load_sample_config(path, **args)


def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ config files
def test_txt_one_prompt_a_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red ball\n\n   \n  a blue cube  \n", encoding="utf-8")
    c = load(f)
    assert [s.prompt for s in c.samples] == ["a red ball", "a blue cube"]
    assert all(s.seed == 555 and s.size == (512, 512) for s in c.samples)
    assert c.cfgs == DEFAULT_CFGS and c.scheduler == "ddim" and c.num_inference_steps == 20
    reqs = plan_samples(c, CAPTIONS, step=10)
    assert [r.prompt for r in reqs] == ["a red ball", "a blue cube"]


def test_json_every_key(tmp_path):
    f = write_json(tmp_path / "s.json", {
        "documentation": {"anything": "ignored, as in EveryDream2's shipped files"},
        "batch_size": 3, "seed": 42, "cfgs": [7.5, 3], "scheduler": "dpm++_2m_k", "num_inference_steps": 12,
        "resolution": 768, "generate_pretrain_samples": True, "generate_samples_every_n_steps": 100,
        "show_progress_bars": True,
        "samples": [
            {"prompt": "a", "negative_prompt": "blurry", "seed": 7, "size": [640, 384]},
            {"prompt": "b", "aspect_ratio": 1.5},
            {"prompt": "c", "aspect_ratio": "2:3", "seed": -1},
            {"random_caption": True},
            "just a string prompt",
        ]})
    c = load(f)
    assert (c.batch_size, c.seed, c.cfgs, c.scheduler, c.num_inference_steps) == (3, 42, [7.5, 3.0], "dpm++_2m_k", 12)
    assert c.generate_pretrain_samples and c.every_n_steps == 100 and c.show_progress_bars
    a, b, cc, r, s = c.samples
    assert (a.prompt, a.negative_prompt, a.seed, a.size) == ("a", "blurry", 7, (640, 384))
    assert b.size == size_for_aspect(1.5, 768) and b.seed == 42
    assert cc.size == size_for_aspect(2 / 3, 768) and cc.seed == -1
    assert r.random_caption and r.size == (768, 768)
    assert s.prompt == "just a string prompt" and s.size == (768, 768)


def test_json_defaults_and_top_level_size(tmp_path):
    c = load(write_json(tmp_path / "s.json", {"samples": [{"prompt": "x"}]}), default_seed=9, default_batch_size=2)
    assert (c.seed, c.cfgs, c.scheduler, c.num_inference_steps, c.batch_size) == (9, DEFAULT_CFGS, "ddim", 20, 2)
    assert not c.generate_pretrain_samples and c.every_n_steps is None
    c = load(write_json(tmp_path / "t.json", {"size": [576, 448], "samples": ["x"]}))
    assert c.samples[0].size == (576, 448)


@pytest.mark.parametrize("data,message", [
    ({"cfg": [7]}, "unknown key 'cfg' (did you mean cfgs?)"),
    ({"samples": [{"promt": "x"}]}, "samples[0]: unknown key 'promt' (did you mean prompt?)"),
    ({"samples": [{"prompt": "x", "size": [500, 512]}]}, "multiples of 8"),
    ({"samples": [{"prompt": "x", "size": [512, 512], "aspect_ratio": 1.5}]}, "not both"),
    ({"samples": [{"negative_prompt": "x"}]}, "needs a 'prompt'"),
    ({"samples": [{"prompt": "x", "aspect_ratio": "wide"}]}, "aspect_ratio"),
    ({"samples": [3]}, "'samples' must be"),
    ({"seed": "42"}, "'seed' must be"),
    ({"cfgs": []}, "'cfgs' is empty"),
    ({"scheduler": "eulr_a"}, "did you mean euler_a"),
    ({"scheduler": "ddim_k"}, "no Karras"),
    ({"num_inference_steps": 0}, "at least 1"),
])
def test_json_is_strict_and_names_the_file(tmp_path, data, message):
    f = write_json(tmp_path / "bad.json", data)
    with pytest.raises(ConfigError) as e:
        load(f)
    assert message in str(e.value) and "bad.json" in str(e.value)


def test_bad_json_and_extension(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text('{"samples": [', encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.json: invalid JSON at line 1"):
        load(f)
    with pytest.raises(ConfigError, match=r"\.txt file .* or a \.json"):
        load(tmp_path / "prompts.yaml")


def test_zero_terminal_snr_refuses_schedulers_that_cannot_rescale(tmp_path):
    f = write_json(tmp_path / "s.json", {"scheduler": "pndm", "samples": ["x"]})
    assert load(f).scheduler == "pndm"
    with pytest.raises(ConfigError, match="zero-terminal-SNR"):
        load(f, zero_terminal_snr=True)


@pytest.mark.parametrize("how", ["none", "missing", "empty_txt", "empty_json"])
def test_no_prompts_sample_up_to_four_training_captions(tmp_path, how):
    path = {"none": None, "missing": tmp_path / "nope.txt", "empty_txt": tmp_path / "e.txt",
            "empty_json": tmp_path / "e.json"}[how]
    if how == "empty_txt":
        path.write_text("\n \n", encoding="utf-8")
    if how == "empty_json":
        write_json(path, {"samples": []})
    c = load(path)
    assert ("not found" in c.note) == (how == "missing")
    first = plan_samples(c, CAPTIONS, step=0)
    assert len(first) == 4 and len({r.prompt for r in first}) == 4 and {r.prompt for r in first} <= set(CAPTIONS)
    # the same captions at every sampling, so grids compare across steps; independent of the caption order
    assert plan_samples(c, list(reversed(CAPTIONS)), step=500) == first
    assert [r.prompt for r in plan_samples(c, CAPTIONS[:2], step=0)] in (CAPTIONS[:2], CAPTIONS[1::-1])
    assert [r.prompt for r in plan_samples(c, [], step=0)] == [""]


@pytest.mark.parametrize("resolution", [512, 768, 1024])
@pytest.mark.parametrize("aspect", [1.0, 4 / 3, 1.5, 16 / 9, 2.0, 3.0, 0.75, 2 / 3, 9 / 16, 0.5])
def test_aspect_ratio_sizes_at_any_resolution(resolution, aspect):
    w, h = size_for_aspect(aspect, resolution)
    assert w % 64 == 0 and h % 64 == 0
    assert 0.75 <= w * h / resolution ** 2 <= 1.25
    assert abs(math.log(w / h / aspect)) < 0.16           # within one 64-pixel step of the shape
    assert size_for_aspect(1 / aspect, resolution) == (h, w)  # tall and wide are mirror images
    if aspect == 1.0:
        assert (w, h) == (resolution, resolution)


def test_seed_minus_one_is_isolated_fresh_per_sampling_and_reproducible(tmp_path):
    c = load(write_json(tmp_path / "s.json", {"samples": [{"prompt": "x", "seed": -1}, {"prompt": "y", "seed": -1},
                                                          {"prompt": "z"}]}))
    random.seed(1)
    torch.manual_seed(1)
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    a = plan_samples(c, CAPTIONS, step=10)
    assert random.getstate() == py_state and torch.equal(torch.get_rng_state(), torch_state)
    assert a == plan_samples(c, CAPTIONS, step=10)                      # a rerun reproduces it
    b = plan_samples(c, CAPTIONS, step=20)
    assert a[0].seed != b[0].seed and a[0].seed != a[1].seed           # new each sampling, differs per sample
    assert a[2].seed == b[2].seed == 555                               # fixed seeds stay fixed
    assert all(0 <= r.seed < 2**31 for r in a + b)


def test_random_caption_picks_a_training_caption_each_sampling(tmp_path):
    c = load(write_json(tmp_path / "s.json", {"samples": [{"random_caption": True, "seed": 3}, "fixed"]}))
    picks = [plan_samples(c, CAPTIONS, step=s) for s in range(0, 200, 10)]
    assert all(p[0].prompt in CAPTIONS and p[0].random_caption and p[0].seed == 3 for p in picks)
    assert len({p[0].prompt for p in picks}) > 1
    assert all(p[1].prompt == "fixed" and not p[1].random_caption for p in picks)
    assert {sample_tag("", 0, p[0]) for p in picks} == {"samples/00_random_caption"}


def test_source_rereads_edits_and_keeps_the_last_good_file(tmp_path):
    f = tmp_path / "s.json"
    write_json(f, {"samples": ["one"]})
    src = SampleConfigSource(str(f), default_seed=1, default_size=(64, 64), default_steps=5)
    warnings = []
    write_json(f, {"samples": ["two"], "cfgs": [3]})
    assert [s.prompt for s in src.reload(warnings.append).samples] == ["two"]
    f.write_text("{broken", encoding="utf-8")
    for _ in range(3):
        assert [s.prompt for s in src.reload(warnings.append).samples] == ["two"]
    assert len(warnings) == 1 and "keeping the previous prompts" in warnings[0]
    write_json(f, {"samples": [{"prompt": "x", "bogus": 1}]})     # a different problem is reported again
    src.reload(warnings.append)
    assert len(warnings) == 2 and "bogus" in warnings[1]
    write_json(f, {"samples": ["three"]})
    assert [s.prompt for s in src.reload(warnings.append).samples] == ["three"] and len(warnings) == 2


def test_source_raises_at_start(tmp_path):
    f = write_json(tmp_path / "s.json", {"sampels": []})
    with pytest.raises(ConfigError, match="did you mean samples"):
        SampleConfigSource(str(f), default_seed=1, default_size=(64, 64), default_steps=5)


def test_older_plan_samples_call_with_a_path(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello\n", encoding="utf-8")
    assert plan_samples(str(f), CAPTIONS, seed=7, size=(64, 64)) == [SampleRequest("hello", seed=7, size=(64, 64))]


# ------------------------------------------------------------------------------------------------ schedulers
@pytest.fixture(scope="module")
def tiny_scheduler_config(tiny_sd_folder):
    return json.loads((tiny_sd_folder / "scheduler" / "scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_folder):
    from utils.sd.models import load_sd_model
    return load_sd_model(tiny_sd_folder)


def pipe_with(tiny_sd, config, name, zero_terminal_snr=False):
    import dataclasses
    return build_pipeline(dataclasses.replace(tiny_sd, scheduler_config=config), scheduler=name,
                          zero_terminal_snr=zero_terminal_snr)


def encoder(tiny_sd):
    return prompt_encoder(tiny_sd, "cpu")


@pytest.mark.parametrize("name", scheduler_names() + ["dpm++ 2m", "dpm++", "dpm++ sde", "DPM++ 2M Karras", "Euler a"])
def test_every_scheduler_builds_and_samples_two_steps(tiny_sd, tiny_scheduler_config, name):
    pipe = pipe_with(tiny_sd, tiny_scheduler_config, name)
    key, karras = parse_scheduler_name(name)
    assert bool(pipe.scheduler.config.get("use_karras_sigmas", False)) == karras
    assert pipe.scheduler.config.num_train_timesteps == 1000 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    (req, images), = generate(pipe, [SampleRequest("a red ball", seed=1, size=(32, 32))], encode=encoder(tiny_sd),
                              cfg_scales=[4.0],
                              steps=2, device="cpu", autocast_dtype=None, output_type="np")
    assert images[0].shape == (32, 32, 3) and np.isfinite(images[0]).all()


def test_names_and_karras_variants(tiny_scheduler_config):
    assert parse_scheduler_name("dpm++ 2m") == parse_scheduler_name("dpm++_2m") == parse_scheduler_name("dpm++") \
        == ("dpm++_2m", False)
    assert parse_scheduler_name("dpm++_2m_k") == parse_scheduler_name("DPM++ 2M Karras") == ("dpm++_2m", True)
    sde = make_sampling_scheduler("dpm++ sde", tiny_scheduler_config, zero_terminal_snr=False)
    assert type(sde).__name__ == "DPMSolverMultistepScheduler" and sde.config.algorithm_type == "sde-dpmsolver++"
    for name in ("euler_k", "lms_k", "heun_k", "dpm++_2m_k", "dpm++_sde_k", "kdpm2_k"):
        assert make_sampling_scheduler(name, tiny_scheduler_config, zero_terminal_snr=False).config.use_karras_sigmas
        assert not make_sampling_scheduler(name[:-2], tiny_scheduler_config,
                                           zero_terminal_snr=False).config.use_karras_sigmas
    with pytest.raises(ConfigError, match="did you mean"):
        parse_scheduler_name("dpm+ 2m")


def test_zero_terminal_snr_scheduler_and_guidance_rescale(tiny_sd, tiny_scheduler_config):
    s = make_sampling_scheduler("ddim", tiny_scheduler_config, zero_terminal_snr=True)
    assert s.config.rescale_betas_zero_snr and s.config.timestep_spacing == "trailing"
    assert float(s.alphas_cumprod[-1]) < 1e-6
    s.set_timesteps(10)
    assert int(s.timesteps[0]) == 999
    assert not make_sampling_scheduler("ddim", {**tiny_scheduler_config, "rescale_betas_zero_snr": True},
                                       zero_terminal_snr=False).config.rescale_betas_zero_snr
    with pytest.raises(ConfigError, match="zero-terminal-SNR"):
        make_sampling_scheduler("heun", tiny_scheduler_config, zero_terminal_snr=True)
    pipe = pipe_with(tiny_sd, tiny_scheduler_config, "euler", zero_terminal_snr=True)
    (_, images), = generate(pipe, [SampleRequest("x", seed=1, size=(32, 32))], encode=encoder(tiny_sd),
                              cfg_scales=[7.0], steps=2,
                            device="cpu", autocast_dtype=None, guidance_rescale=0.7, output_type="np")
    assert np.isfinite(images[0]).all()


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])   # euler_a also draws noise at every step
def test_batching_gives_the_same_images_as_one_at_a_time(tiny_sd, tiny_scheduler_config, scheduler):
    pipe = pipe_with(tiny_sd, tiny_scheduler_config, scheduler)
    reqs = [SampleRequest("a red ball", seed=1, size=(32, 32)),
            SampleRequest("a blue cube", negative_prompt="green", seed=2, size=(48, 32)),
            SampleRequest("a green cone", seed=3, size=(32, 32)),
            SampleRequest("a red ball", seed=4, size=(32, 32))]
    kw = dict(cfg_scales=[7.0, 1.01], steps=3, device="cpu", autocast_dtype=None, output_type="np",
              encode=encoder(tiny_sd))
    batched = generate(pipe, reqs, batch_size=3, **kw)
    single = generate(pipe, reqs, batch_size=1, **kw)
    assert [r for r, _ in batched] == reqs                      # results come back in request order
    for (_, a), (_, b) in zip(batched, single):
        assert len(a) == 2
        for x, y in zip(a, b):
            assert np.abs(x - y).max() < 1e-5
    assert batched[1][1][0].shape == (32, 48, 3)
    assert np.abs(batched[0][1][0] - batched[3][1][0]).max() > 1e-3   # different seed, different image


def test_generate_leaves_global_rng_alone(tiny_sd, tiny_scheduler_config):
    pipe = pipe_with(tiny_sd, tiny_scheduler_config, "euler_a")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(pipe, [SampleRequest("x", seed=1, size=(32, 32))], cfg_scales=[7.0], steps=2, device="cpu",
             autocast_dtype=None, encode=encoder(tiny_sd))
    assert torch.equal(torch.rand(3), expected)


def test_grid_one_column_per_cfg_with_label(tiny_sd, tiny_scheduler_config, tmp_path):
    pipe = pipe_with(tiny_sd, tiny_scheduler_config, "ddim")
    (req, images), = generate(pipe, [SampleRequest("a red ball", seed=1, size=(64, 48))], encode=encoder(tiny_sd),
                              cfg_scales=DEFAULT_CFGS,
                              steps=2, device="cpu", autocast_dtype=None)
    grid = make_grid(images, DEFAULT_CFGS)
    assert grid.size == (3 * 64, 48)
    arr, first = np.asarray(grid), np.asarray(images[0].convert("RGB"))
    assert not np.array_equal(arr[:, :64], first)                  # the label is drawn on the image
    assert np.array_equal(arr[-10:, :64], first[-10:])             # ... and only in its corner
    stem = sample_stem("ema-", 250, 0, req)
    assert stem == "ema-gs00250-0-a_red_ball"
    path = write_sample(tmp_path / "samples", stem, grid, req, load(None))
    assert path.exists() and json.loads(path.with_suffix(".txt").read_text())["seed"] == 1
    assert sample_tag("", 2, req) == "samples/02_a_red_ball"


def test_example_file_loads():
    from pathlib import Path
    example = Path(__file__).resolve().parents[2] / "examples" / "sample_prompts.json"
    c = load(example)
    assert len(c.samples) == 5 and c.scheduler == "dpm++_2m_k" and c.generate_pretrain_samples
    assert c.samples[2].size == (640, 448) and c.samples[3].size == (512, 768) and c.samples[4].random_caption
