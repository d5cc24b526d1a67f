"""Marker tensors in single files: `v_pred` (a v-prediction model) and `ztsnr` (trained with zero terminal SNR).

Both are empty tensors (torch.tensor([]): float32, shape [0]) whose presence is the information: ComfyUI's
convention. Its checkpoint saver writes `v_pred` into every v-prediction model it saves, and its loader decides
v-prediction by `'v_pred' in state_dict` and zero terminal SNR by `'ztsnr' in state_dict`, without reading the
header or a .yaml sidecar. (In the ComfyUI sources we read, that check sits in its SDXL-family model classes; for SD2
it guesses from a weight statistic and for SD1 it assumes epsilon.) Other trainers and merge tools write the same
markers. Export adds them beside the header and the sidecar, which A1111 and Forge read; import reads them back.
"""
from __future__ import annotations

import torch

from utils.sd.noise import sampling_settings

V_PRED, ZTSNR = "v_pred", "ztsnr"
MARKER_KEYS = (V_PRED, ZTSNR)


def marker_tensors(prediction_type: str, zero_terminal_snr: bool) -> dict[str, torch.Tensor]:
    """The markers a model with this prediction type and noise schedule carries (none for plain epsilon)."""
    out = {}
    if prediction_type == "v_prediction":
        out[V_PRED] = torch.tensor([])
    if zero_terminal_snr:
        out[ZTSNR] = torch.tensor([])
    return out


def ztsnr_scheduler_config(keys) -> dict:
    """The diffusers scheduler settings a file's `ztsnr` marker stands for: betas rescaled to zero terminal SNR and
    the trailing timestep spacing that sampling such a model needs (arXiv 2305.08891, Sec. 3.3); {} without one."""
    if ZTSNR not in keys:
        return {}
    return dict(sampling_settings(zero_terminal_snr=True).scheduler_overrides)
