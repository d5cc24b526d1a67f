"""GPU tests: the numerical checks of kernels and optimizers that need a CUDA GPU (they were bench/*_check.py
scripts). Run them on a GPU machine with

    python -m pytest -m gpu tests/gpu -s        # -s shows the timing tables they print

A test marked `gpu` skips where CUDA is missing, so a CPU run (CI) passes; tests that need bitsandbytes or Triton
skip without them too. The unmarked tests here exercise the same helpers on the CPU.
"""
import pytest
import torch


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="session")
def sd15_shapes() -> list[torch.Size]:
    """The shapes of SD1.5's UNet and CLIP-L text encoder parameters (882 tensors, 982.6M
    parameters), built on the meta device."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                            num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408))
    return [p.shape for m in (unet, text) for p in m.parameters()]
