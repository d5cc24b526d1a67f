"""Shared fixtures. Nothing in the test run may reach the network: any hub access fails at once."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest
import torch

# The tiny test models gain nothing from threads, and OpenMP spinning on a shared 2-core machine costs 10x.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """The built-in tiny SD model (fixed seeds) saved once per test run as a diffusers folder."""
    from utils.sd.builtin_models import builtin_folder
    return builtin_folder("tiny-sd", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> Path:
    """The built-in tiny SDXL model (two text encoders, fixed seeds) saved once per test run."""
    from utils.sd.builtin_models import builtin_folder
    return builtin_folder("tiny-sdxl", tmp_path_factory.mktemp("models"))


def pytest_configure(config):
    """Triton kernels (optimizer/triton8bit.py) run on CPU tensors in Triton's interpreter. It must be switched on
    before triton is imported (triton.language's own functions are built then): here, before any test module is.
    A run of the GPU tests alone (`-m gpu`) leaves it off, so they time and check the compiled kernel."""
    if config.getoption("markexpr", "").strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
