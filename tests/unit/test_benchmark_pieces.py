import json

import pytest

from utils.benchmark import _memory_growth, compare_main, loss_agreement
from utils.flops import peak_tflops, training_flops_per_image


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
    from utils.builtin_models import BUILTINS
    unet, clip, vae = BUILTINS["sd15"][:3]
    flops = training_flops_per_image(unet, CLIPTextConfig(**clip), None, width=512, height=512,
                                     train_text_encoder=True)
    assert flops / 1e12 == pytest.approx(2.45, rel=0.01)
