"""The speed options change how a step runs, never what it learns: each run here is compared with the plain run."""
import functools

import pytest
import torch

from tests.integration.conftest import base_args, checkpoint_weights, only_run, read_metrics, run_train


def losses(logdir):
    return [row["loss/log_step"] for row in read_metrics(only_run(logdir)) if "loss/log_step" in row]


def last_checkpoint(logdir):
    return next(p for p in (only_run(logdir) / "ckpts").iterdir() if p.name.startswith("last-"))


@pytest.fixture()
def plain_run(tiny_sd_folder, dataset, tmp_path):
    def run(name, **overrides):
        logdir = tmp_path / name
        assert run_train(base_args(tiny_sd_folder, dataset, logdir, **{"max_epochs": 1, **overrides})) == 0
        return logdir
    return run


def test_torch_compile_trains_like_eager_and_saves_plain_keys(plain_run, monkeypatch):
    # aot_eager: dynamo and AOT autograd as in production, without needing inductor's C++ toolchain in CI
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = plain_run("eager")
    compiled = plain_run("compiled", torch_compile=True)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    run_log = next(only_run(compiled).glob("*.log")).read_text()
    assert "compiled in" in run_log and "torch.compile: 1 shape(s) compiled in" in run_log
    weights = checkpoint_weights(last_checkpoint(compiled))
    assert not any("_orig_mod" in k for k in weights)
    reference = checkpoint_weights(last_checkpoint(eager))
    assert weights.keys() == reference.keys()
    assert max((weights[k] - reference[k]).abs().max().item() for k in weights) < 1e-4


def grad_norms(logdir):
    return {(row["step"], k): row[k] for row in read_metrics(only_run(logdir)) for k in row if k.endswith("grad_norm")}


def test_fused_backward_pass_trains_exactly_like_stepping_after_backward(plain_run):
    """The optimizer stepped chunk by chunk inside the backward pass: the same losses, gradient norms and weights
    as the step after the backward pass (adamw8bit, the grouped step; fp32 on the CPU)."""
    after = plain_run("after", log_step=2)
    fused = plain_run("fused", log_step=2, fused_backward_pass=True)
    assert losses(fused) == losses(after)
    assert grad_norms(fused) and grad_norms(fused) == pytest.approx(grad_norms(after), rel=1e-5)
    weights, reference = checkpoint_weights(last_checkpoint(fused)), checkpoint_weights(last_checkpoint(after))
    assert all(torch.equal(weights[k], reference[k]) for k in reference)


def test_fused_backward_pass_with_torch_compile(plain_run, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    after = plain_run("after")
    fused = plain_run("fused", fused_backward_pass=True, torch_compile=True)
    assert losses(fused) == pytest.approx(losses(after), rel=1e-4)


@pytest.mark.parametrize("overrides, expected", [
    ({"grad_accum": 2}, "grad_accum is 2: set it to 1"),
    ({"clip_grad_norm": 1.0}, "clip_grad_norm is 1.0: set it to null"),
])
def test_fused_backward_pass_refuses_what_needs_all_gradients(tiny_sd_folder, dataset, tmp_path, capsys, overrides,
                                                             expected):
    args = base_args(tiny_sd_folder, dataset, tmp_path / "logs", fused_backward_pass=True, **overrides)
    assert run_train(args) == 2
    err = capsys.readouterr().err
    assert "fused_backward_pass" in err and expected in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()    # refused before the run folder and before any model loads


def test_compile_blocks_trains_like_eager_and_hands_over_gradients_block_by_block(plain_run, monkeypatch):
    """compile_blocks: each UNet block is its own graph (aot_eager here), so its backward hands over that block's
    gradients as it ends, one block after the other (a compiled whole UNet hands over all of them at its end):
    with fused_backward_pass each block's chunks are stepped and freed before the next block's backward runs.
    Samples (no grad) run the blocks uncompiled."""
    from diffusers import UNet2DConditionModel
    from optimizer import grouped8bit
    from utils.run import torch_settings as compile_module
    from utils.sd.builtin_models import BUILTINS
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    calls_with_grad = []
    original = compile_module.compiled_when_grad_enabled

    def counting(forward, mode):
        run = original(forward, mode)

        def wrapped(*args, **kwargs):
            calls_with_grad.append(torch.is_grad_enabled())
            return run(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(compile_module, "compiled_when_grad_enabled", counting)
    arrivals = []   # (optimizer's tensor count, tensor index) in the order the backward pass accumulates them
    real_ready = grouped8bit.Grouped8bit._gradient_ready

    def ready(self, n, index, param):
        arrivals.append((len(self.param_groups[0]["params"]), index))
        real_ready(self, n, index, param)
    monkeypatch.setattr(grouped8bit.Grouped8bit, "_gradient_ready", ready)

    eager = plain_run("eager")
    blocks = plain_run("blocks", torch_compile=True, compile_blocks=True, fused_backward_pass=True, sample_steps=2)
    assert losses(blocks) == pytest.approx(losses(eager), rel=1e-4)
    assert True in calls_with_grad and False in calls_with_grad      # steps compiled, samples not
    names = [n for n, _ in UNet2DConditionModel(**BUILTINS["tiny-sd"][0]).named_parameters()]
    block = [".".join(n.split(".")[:2]) if n.startswith(("down_blocks", "up_blocks")) else n.split(".")[0]
             for n in names]
    first_step = [i for count, i in arrivals if count == len(names)][:len(names)]
    order = [block[i] for i in first_step]
    compiled = {b for b in block if b.startswith(("down_blocks", "up_blocks", "mid_block"))}
    runs = [b for k, b in enumerate(order) if b in compiled and (k == 0 or order[k - 1] != b)]
    assert sorted(runs) == sorted(compiled), order   # each block's gradients arrive together, not interleaved
    assert runs.index("up_blocks.1") < runs.index("mid_block") < runs.index("down_blocks.0")   # backward order


def test_triton_8bit_step_without_a_gpu_stops_before_loading(tiny_sd_folder, dataset, tmp_path, capsys):
    opt = tmp_path / "optimizer.json"
    opt.write_text('{"triton_8bit_step": true}')
    args = base_args(tiny_sd_folder, dataset, tmp_path / "logs", optimizer_config=str(opt))
    assert run_train(args) == 2
    err = capsys.readouterr().err
    assert "triton_8bit_step true needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_channels_last_trains_like_default(plain_run):
    default, nhwc = plain_run("default"), plain_run("nhwc", channels_last=True)
    assert losses(nhwc) == pytest.approx(losses(default), rel=1e-5)


def test_text_encoder_output_cache_is_exact(plain_run):
    cached = plain_run("cached", disable_textenc_training=True, cache_te_outputs=True, max_epochs=2)
    uncached = plain_run("uncached", disable_textenc_training=True, cache_te_outputs=False, max_epochs=2)
    assert losses(cached) == losses(uncached)


def test_cached_latents_train_like_the_vae_in_the_step(tiny_sd_folder, tmp_path):
    """Square images at the bucket's aspect and no crop jitter: the centre crop is the only crop, so the cached
    posterior gives the same latents, noise and losses as encoding in the step. A second run encodes nothing."""
    from tests.integration.conftest import make_dataset
    data = make_dataset(tmp_path / "square", sizes=((64, 64),))
    common = {"max_epochs": 2, "crop_jitter": 0.0, "flip_p": 0.5}

    def run(name, **overrides):
        logdir = tmp_path / name
        assert run_train(base_args(tiny_sd_folder, data, logdir, **common, **overrides)) == 0
        return logdir, next(only_run(logdir).glob("*.log")).read_text()

    uncached, _ = run("uncached")
    cache_dir = tmp_path / "latents"
    cached, first_log = run("cached", cache_latents=True, latent_cache_dir=str(cache_dir))
    assert losses(cached) == pytest.approx(losses(uncached), rel=1e-6, abs=1e-7)
    assert "0 cached, 16 encoded" in first_log        # 8 images, flipped and not
    _, second_log = run("again", cache_latents=True, latent_cache_dir=str(cache_dir))
    assert "16 cached, 0 encoded" in second_log


def test_benchmark_reports_speed_flops_and_memory(tmp_path):
    from utils.perf.benchmark import run
    result = run(["--arch", "tiny-sd", "--resolution", "64", "--batch_size", "2", "--steps", "2", "--warmup", "2",
                  "--workdir", str(tmp_path), "--cache_latents", "true", "--num_workers", "0",
                  "--loss_trace", str(tmp_path / "loss.jsonl")])
    assert result["images_per_s"] > 0 and result["timed_steps"] == 2
    assert result["tflops"] >= 0 and "host_rss_growth_mib" in result
    assert len((tmp_path / "loss.jsonl").read_text().splitlines()) == 2      # log steps 2 and 4


def test_compile_wraps_only_the_step_modules(tiny_sd_folder, dataset, tmp_path, monkeypatch):
    """Sampling, validation and saving use the plain modules: they must neither recompile for their own shapes nor
    (with DDP) strip the DDP wrapper out of the compiled step module, as accelerate's unwrap_model would."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    from utils.run.config import load_config
    from utils.run.loop import cleanup
    from utils.run.preflight import preflight
    from utils.run.setup import setup
    cfg, _ = load_config(base_args(tiny_sd_folder, dataset, tmp_path / "logs", torch_compile=True))
    run = preflight(cfg)
    try:
        setup(run)
        models = run.models
        assert isinstance(models.unet, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(models.text_encoders[0], torch._dynamo.eval_frame.OptimizedModule)
        assert not isinstance(models.sd.unet, torch._dynamo.eval_frame.OptimizedModule)
        assert models.unet._orig_mod is models.sd.unet
    finally:
        cleanup(run)


def test_sdp_backend_puts_its_kernel_first_for_the_run_only(tiny_sd_folder, dataset, tmp_path):
    """sdp_backend reorders torch's SDPA backends while the trainer lives (every backend stays enabled, so shapes
    the first refuses fall back); cleanup restores torch's order for whatever runs next in the process."""
    from torch.nn.attention import SDPBackend

    from utils.run.config import load_config
    from utils.run.loop import cleanup, train
    from utils.run.preflight import preflight
    from utils.run.setup import setup
    before = torch._C._get_sdp_priority_order()
    cfg, _ = load_config(base_args(tiny_sd_folder, dataset, tmp_path / "logs", sdp_backend="cudnn"))
    run = preflight(cfg)
    try:
        setup(run)
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(SDPBackend.CUDNN_ATTENTION) and sorted(order) == sorted(before)
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert "attention: sdp (cudnn first)" in next(run.run_dir.glob("*.log")).read_text()
        assert train(run, final_outputs=False) == 0
    finally:
        cleanup(run)
    assert torch._C._get_sdp_priority_order() == before


def test_compile_memory_budget_reaches_the_partitioner_and_learns_the_same(plain_run, monkeypatch):
    """The budget is read when AOT autograd partitions a compiled graph into forward and backward, at the first
    step: the backend sees it then. aot_eager_decomp_partition uses the min-cut partitioner that honours it (as
    inductor does) without needing a C++ toolchain. Recomputing instead of keeping changes no value."""
    from torch._dynamo.backends.registry import lookup_backend
    seen = []

    def spy(gm, example_inputs):
        seen.append(torch._functorch.config.activation_memory_budget)
        return lookup_backend("aot_eager_decomp_partition")(gm, example_inputs)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=spy))
    default_budget = torch._functorch.config.activation_memory_budget
    eager = plain_run("eager")
    budget = plain_run("budget", torch_compile=True, compile_memory_budget=0.3)
    assert seen and set(seen) == {0.3}
    assert torch._functorch.config.activation_memory_budget == default_budget   # restored by cleanup
    assert losses(budget) == pytest.approx(losses(eager), rel=1e-4)
    assert "memory budget 0.3" in next(only_run(budget).glob("*.log")).read_text()


def test_compile_layout_optimization_reaches_inductor_and_learns_the_same(plain_run, monkeypatch):
    """Inductor reads its config when it compiles, at the first step: the backend sees the run's settings then
    (size asserts always off when compiling, the layout optimization as asked); cleanup restores both. The
    layout of a convolution changes no value (aot_eager: no C++ toolchain needed in CI)."""
    import torch._inductor.config as inductor
    from torch._dynamo.backends.registry import lookup_backend
    seen = []

    def spy(gm, example_inputs):
        seen.append((inductor.force_layout_optimization, inductor.size_asserts))
        return lookup_backend("aot_eager")(gm, example_inputs)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=spy))
    before = (inductor.force_layout_optimization, inductor.size_asserts)
    eager = plain_run("eager")
    layout = plain_run("layout", torch_compile=True, compile_layout_optimization=True)
    assert seen and set(seen) == {(True, False)}
    seen.clear()
    torch._dynamo.reset()   # else dynamo reuses the graph compiled for the same code in the run above
    plain_run("compiled", torch_compile=True)
    assert seen and set(seen) == {(False, False)}
    assert (inductor.force_layout_optimization, inductor.size_asserts) == before   # restored by cleanup
    assert losses(layout) == pytest.approx(losses(eager), rel=1e-4)
    assert "convolutions channels-last" in next(only_run(layout).glob("*.log")).read_text()


def test_overlap_optimizer_step_needs_the_fused_step_and_a_gpu(tiny_sd_folder, dataset, tmp_path, capsys):
    from utils.run.config import load_config
    from utils.core.config_schema import ConfigError
    with pytest.raises(ConfigError, match="overlap_optimizer_step true needs fused_backward_pass true"):
        load_config(base_args(tiny_sd_folder, dataset, tmp_path / "logs", overlap_optimizer_step=True))
    args = base_args(tiny_sd_folder, dataset, tmp_path / "logs", overlap_optimizer_step=True, fused_backward_pass=True)
    assert run_train(args) == 2
    err = capsys.readouterr().err
    assert "overlap_optimizer_step true needs a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()
