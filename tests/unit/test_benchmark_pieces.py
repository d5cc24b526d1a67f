import json

import pytest

from utils.perf.benchmark import _memory_growth, compare_main, loss_agreement, sync_sites
from utils.perf.flops import peak_tflops, training_flops_per_image


def trace(losses):
    return [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]


def test_equal_traces_agree():
    r = loss_agreement(trace([1.0, 0.9, 0.8, 0.7]), trace([1.0, 0.9, 0.8, 0.7]), steps=4)
    assert r["ok"] and r["mean_rel_diff"] == 0 and r["steps"] == 4


def test_a_drifting_trace_fails_on_the_last_quarter():
    ref = trace([1.0] * 100)
    cand = trace([1.0] * 75 + [1.2] * 25)        # overall mean off by 5 %, the last quarter by 20 %
    r = loss_agreement(ref, cand, steps=100, tolerance=0.1)
    assert r["mean_rel_diff"] == pytest.approx(0.05) and r["last_quarter_rel_diff"] == pytest.approx(0.2)
    assert not r["ok"]


def test_only_the_first_steps_and_common_steps_count():
    r = loss_agreement(trace([1.0, 1.0, 5.0]), trace([1.0, 1.0]), steps=2)
    assert r["steps"] == 2 and r["ok"]
    with pytest.raises(ValueError):
        loss_agreement(trace([1.0]), [{"step": 9, "loss": 1.0}], steps=10)


def test_compare_command_exit_code(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps(r) for r in trace([1.0, 1.0])))
    b.write_text("\n".join(json.dumps(r) for r in trace([1.0, 2.0])))
    assert compare_main([str(a), str(a), "2"]) == 0
    assert compare_main([str(a), str(b), "2"]) == 1


def test_memory_growth_from_warmup_to_last_step():
    mib = 2**20
    memory = {5: (100 * mib, 200 * mib, 1000 * mib), 10: (100 * mib, 260 * mib, 1010 * mib)}
    g = _memory_growth(memory, [5, 10])
    assert g["gpu_allocated_growth_mib"] == 0 and g["gpu_reserved_growth_mib"] == 60
    assert g["host_rss_mib"] == [1000, 1010]


def test_peak_table_prefers_specific_names():
    assert peak_tflops("NVIDIA H200") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops("Some future GPU") is None


def test_sd15_training_flops_match_the_reference_count():
    """2.45 TFLOP per image with cached latents (../shared/bench/README.md counts the same way)."""
    from transformers import CLIPTextConfig
    from utils.sd.builtin_models import BUILTINS
    from utils.sd.families import FAMILIES
    unet, clip, vae = BUILTINS["sd15"][:3]
    flops = training_flops_per_image(FAMILIES["sd1"], unet, [CLIPTextConfig(**clip)], None, width=512, height=512,
                                     train_text_encoders=[True])
    assert flops / 1e12 == pytest.approx(2.45, rel=0.01)


@pytest.mark.parametrize("name, category", [
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t>, false, false, false, false, true, true, false, false>(flash::Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("sm90_xmma_wgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x256x64_warpgroupsize1x1x1",
     "conv"),
    ("sm80_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nchw_tilesize64x64x64_stage5", "conv"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true, "
     "(cudnnKernelDataType_t)0>(...)", "copy/cast"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_32x6_tn", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
     "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>(...)", "gemm"),
    ("void kOptimizerStatic8bit2StateBlockwise<float, 2, 256, 1>(float*, float*, unsigned char*, ...)", "optimizer"),
    ("void kOptimizer32bit2State<float, 5, 0>(float*, float*, float*, float*, float*, ...)", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, 2>, float*, int>", "optimizer"),
    ("triton_poi_fused_add_mul_0", "triton"),
    ("triton_red_fused_native_group_norm_1", "triton"),
    ("triton_poi_fused_convolution_3", "triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::copy_kernel_cuda("
     "at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(float)#1}>", "copy/cast"),
    ("Memcpy HtoD (Pageable -> Device)", "copy/cast"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, ...)",
     "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(...)", "norm"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel<float>(...)", "norm"),
    ("void at::native::(anonymous namespace)::distribution_elementwise_grid_stride_kernel<float, 4, "
     "at::native::templates::cuda::normal_and_transform<float, float, ...>", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
     "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >", "elementwise"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>",
     "elementwise"),
    ("ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "other"),
    # the CPU ops of a run without CUDA
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::convolution_backward", "conv"),
    ("aten::addmm", "gemm"),
    ("aten::native_group_norm", "norm"),
    ("aten::copy_", "copy/cast"),
    ("Optimizer.step#AdamW.step", "optimizer"),
    ("aten::mul", "other"),
])
def test_kernel_category(name, category):
    from utils.perf.profile_report import kernel_category
    assert kernel_category(name) == category


def test_summarize_profile_per_step_and_largest_first():
    from utils.perf.profile_report import summarize_profile
    rows = [("void pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel<...>", 6000.0, 32),
            ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", 10000.0, 64),
            ("ampere_bf16_s16816gemm_bf16_128x64_ldg8_f2f_stages_32x6_tn", 2000.0, 8),
            ("triton_poi_fused_add_mul_0" + "_x" * 60, 1000.0, 2),
            ("some_unknown_kernel", 4.0, 2)]
    by_category, top = summarize_profile(rows, steps=2, top=3)
    assert by_category == {"gemm": 6.0, "attention": 3.0, "triton": 0.5, "other": 0.0}
    assert list(by_category) == ["gemm", "attention", "triton", "other"]
    assert [t[0] for t in top] == [rows[1][0], rows[0][0], rows[2][0]]
    assert top[0] == ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", 5.0, 32.0, "gemm")
    _, top = summarize_profile(rows, steps=2)
    assert len(top) == 5 and len(top[3][0]) == 90 and top[3][1:] == (0.5, 1.0, "triton")


def test_profile_rows_count_each_kernel_once():
    """The profiler also puts record_function ranges (the optimizer's "Optimizer.step#...") on the GPU timeline,
    spanning kernels it lists too: counting them counted the optimizer twice (GPU run 10)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from utils.perf.profile_report import profile_rows

    def event(key, device_type, us, annotation=False):
        return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=us, self_cpu_time_total=us,
                               count=2, is_user_annotation=annotation)
    events = [event("Optimizer.step#GroupedAdamW8bit.step", DeviceType.CUDA, 70.0, annotation=True),
              event("kOptimizerStatic8bit2StateBlockwise", DeviceType.CUDA, 50.0),
              event("aten::add_", DeviceType.CPU, 9.0),
              event("idle", DeviceType.CUDA, 0.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    assert profile_rows(prof, cuda=True) == [("kOptimizerStatic8bit2StateBlockwise", 50.0, 2)]
    assert profile_rows(prof, cuda=False) == [("aten::add_", 9.0, 2)]


def test_idle_by_phase_charges_gpu_gaps_to_what_the_host_was_doing():
    from utils.perf.profile_report import idle_by_phase
    kernels = [(10e3, 40e3), (35e3, 60e3), (90e3, 100e3), (100e3, 120e3)]   # overlapping and touching (us)
    phases = [("step: data", 0.0, 15e3), ("step: forward", 15e3, 70e3), ("step: optimizer", 80e3, 110e3)]
    out = idle_by_phase(kernels, phases, start=0.0, steps=2)
    # gaps 0-10 ms (data) and 60-90 (forward until 70, nothing 70-80, optimizer from 80); the window ends at 120
    assert out == {"window_ms": 60.0, "gpu_busy_ms": 40.0, "gpu_idle_ms": 20.0,
                   "idle_while_ms": {"step: data": 5.0, "step: forward": 5.0, "loop": 5.0, "step: optimizer": 5.0},
                   "host_ms": {"step: data": 7.5, "step: forward": 27.5, "step: optimizer": 15.0}}
    cpu_only = idle_by_phase([], phases, start=0.0, steps=1)   # no GPU: the window is the host's
    assert cpu_only["window_ms"] == 110.0 and cpu_only["host_ms"]["step: forward"] == 55.0


def test_annotated_yields_everything_inside_profiler_ranges():
    import torch

    from utils.run.loop import annotated
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert list(annotated(iter([1, 2, 3]), "step: data")) == [1, 2, 3]
    assert sum(e.name == "step: data" for e in prof.events()) == 4   # three items and the fetch that ended it


def test_synthetic_data_folder_per_count_and_size(tmp_path):
    from utils.perf.benchmark import synthetic_data_folder
    a = synthetic_data_folder(tmp_path, 3, [(64, 64)])
    b = synthetic_data_folder(tmp_path, 5, [(64, 64)])
    assert a != b and len(list(a.iterdir())) == 3 and len(list(b.iterdir())) == 5
    stamp = a.stat().st_mtime_ns
    assert synthetic_data_folder(tmp_path, 3, [(64, 64)]) == a and a.stat().st_mtime_ns == stamp   # reused
    assert not list(tmp_path.glob("*.partial"))


def test_synthetic_data_folder_takes_several_sizes_in_turn(tmp_path):
    from PIL import Image
    from utils.perf.benchmark import synthetic_data_folder
    one = synthetic_data_folder(tmp_path, 4, [(64, 64)])
    mixed = synthetic_data_folder(tmp_path, 4, [(64, 64), (96, 32)])
    assert mixed != one
    sizes = {}
    for path in mixed.iterdir():
        with Image.open(path) as img:
            sizes[img.size] = sizes.get(img.size, 0) + 1
    assert sizes == {(64, 64): 2, (96, 32): 2}


def test_sync_sites_count_the_lines_that_made_the_host_wait():
    import warnings

    def record(message, filename, lineno):
        return warnings.WarningMessage(message, UserWarning, filename, lineno)

    records = [record("called a synchronizing CUDA operation", "/x/utils/run/trainer.py", 751),
               record("some other warning", "/x/utils/sd/step.py", 3),
               record("called a synchronizing CUDA operation", "/x/utils/sd/step.py", 55),
               record("called a synchronizing CUDA operation", "/x/utils/sd/step.py", 55)]
    assert sync_sites(records) == {"step.py:55": 2, "trainer.py:751": 1}
    assert list(sync_sites(records)) == ["step.py:55", "trainer.py:751"]
    assert sync_sites([]) == {}


def test_sdxl_flops_count_both_text_encoders_and_the_added_conditioning():
    """The SDXL family's step (two encoders, pooled embedding and time ids into the UNet) counts on the meta
    device; training the encoders adds their backward pass."""
    from transformers import CLIPTextConfig
    from utils.sd.builtin_models import BUILTINS, SECOND_TEXT_ENCODER
    from utils.sd.families import FAMILIES
    unet, clip, vae = BUILTINS["tiny-sdxl"][:3]
    configs = [CLIPTextConfig(**clip), CLIPTextConfig(**SECOND_TEXT_ENCODER["tiny-sdxl"])]
    frozen = training_flops_per_image(FAMILIES["sdxl"], unet, configs, None, width=64, height=64,
                                      train_text_encoders=[False, False])
    trained = training_flops_per_image(FAMILIES["sdxl"], unet, configs, None, width=64, height=64,
                                       train_text_encoders=[True, True])
    assert 0 < frozen < trained
