"""Regenerate ldm_reference_keys.json.gz: the tensor names and shapes of the original SD1.5 and SD2.1 LDM files.

Derived from the original model code, never from this project's converter, so the converter's output can be checked
against an independent source. Nothing here downloads weights: every module is built on the meta device.

Sources (wheels from PyPI, unpacked into a scratch folder; none of them is a project dependency):
  stable-diffusion-sdkit==2.1.5  the Stability-AI `ldm` package (MIT): UNetModel, VAE Encoder/Decoder, and
                                 DDPM.register_schedule (noise-schedule buffers, values computed by that code)
  open_clip_torch==3.3.0         OpenCLIP (MIT): the ViT-H-14 text tower that SD2's FrozenOpenCLIPEmbedder wraps
                                 (visual tower deleted, as that embedder does)
  transformers==4.30.2           CLIPTextModel as SD1's FrozenCLIPEmbedder saved it: `text_model.` prefix and the
  (+ huggingface_hub==0.16.4,    persistent `position_ids` buffer of transformers < 4.31
     tokenizers==0.13.3)
  einops, omegaconf              needed by the ldm modules (installed with pip --target into EXTRA_SRC)

Run (paths to the unpacked wheels):
  LDM_SRC=/tmp/oc/sdk OPEN_CLIP_SRC=/tmp/oc/x TF4_SRC=/tmp/oc/tf430 EXTRA_SRC=/tmp/oc/deps \
      python tests/assets/gen_ldm_reference_keys.py
The transformers 4.30 part runs in a subprocess so it never mixes with the installed transformers 5.
"""
from __future__ import annotations

import ast
import gzip
import importlib
import json
import os
import subprocess
import sys
import textwrap
import types
from functools import partial
from pathlib import Path

OUT = Path(__file__).with_name("ldm_reference_keys.json.gz")
SCHEDULE_SAMPLE = [0, 1, 10, 100, 500, 998, 999]  # timesteps whose buffer values are stored

# model.params.unet_config.params and first_stage_config.params of v1-inference.yaml / v2-inference(-v).yaml
UNET_V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
UNET_V2 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
               num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
               use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, use_checkpoint=True,
               legacy=False)
DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")

TF4_SNIPPET = textwrap.dedent("""
    import json, torch
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        m = CLIPTextModel(CLIPTextConfig(**json.loads('%s')))
    print(json.dumps({k: list(v.shape) for k, v in m.state_dict().items()}))
""")


def _shapes(module, prefix: str) -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in module.state_dict().items()}


def _schedule_buffers(ldm_src: Path) -> dict[str, list[float]]:
    """Run the original DDPM.register_schedule (cut out of ddpm.py, whose imports need pytorch_lightning)."""
    import numpy as np
    import torch
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    tree = ast.parse((ldm_src / "ldm/models/diffusion/ddpm.py").read_text())
    ddpm = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DDPM")
    fn = next(n for n in ddpm.body if isinstance(n, ast.FunctionDef) and n.name == "register_schedule")
    ns = {"np": np, "torch": torch, "partial": partial, "make_beta_schedule": make_beta_schedule,
          "exists": lambda x: x is not None}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "ddpm.py", "exec"), ns)
    holder = torch.nn.Module()
    holder.v_posterior, holder.parameterization = 0.0, "eps"
    ns["register_schedule"](holder, beta_schedule="linear", timesteps=1000, linear_start=0.00085,
                            linear_end=0.012)
    return {k: [float(v[i]) for i in SCHEDULE_SAMPLE] for k, v in holder.state_dict().items()}


def _open_clip_h_text() -> dict[str, list[int]]:
    import torch
    src = Path(os.environ["OPEN_CLIP_SRC"]) / "open_clip"
    pkg = types.ModuleType("open_clip")  # skip the package __init__ (it wants torchvision, ftfy, ...)
    pkg.__path__ = [str(src)]
    sys.modules["open_clip"] = pkg
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # open_clip.utils imports FrozenBatchNorm2d for ResNet towers only, so a stand-in suffices. transformers
        # (imported by open_clip.hf_model) must be imported before the stand-in exists, or it takes it for real.
        import transformers  # noqa: F401
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = type("FrozenBatchNorm2d", (), {})
    model_mod = importlib.import_module("open_clip.model")
    cfg = json.loads((src / "model_configs/ViT-H-14.json").read_text())
    with torch.device("meta"):
        clip = model_mod.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    del clip.visual  # as ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder does
    return _shapes(clip, "cond_stage_model.model.")


def main() -> None:
    ldm_src = Path(os.environ["LDM_SRC"])
    sys.path[:0] = [str(ldm_src), os.environ["EXTRA_SRC"]]
    import torch
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    def vae() -> dict[str, list[int]]:
        with torch.device("meta"):
            parts = {"encoder": Encoder(**DDCONFIG), "decoder": Decoder(**DDCONFIG),
                     # ldm.models.autoencoder.AutoencoderKL.__init__ (embed_dim 4)
                     "quant_conv": torch.nn.Conv2d(2 * DDCONFIG["z_channels"], 2 * 4, 1),
                     "post_quant_conv": torch.nn.Conv2d(4, DDCONFIG["z_channels"], 1)}
        out = {}
        for name, m in parts.items():
            out.update(_shapes(m, f"first_stage_model.{name}."))
        return out

    env = {**os.environ, "PYTHONPATH": os.environ["TF4_SRC"]}
    clip_l = json.loads(subprocess.run([sys.executable, "-c", TF4_SNIPPET % json.dumps(CLIP_L)], env=env,
                                       check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    schedule = _schedule_buffers(ldm_src)
    buffers = {k: [1000] for k in schedule}
    with torch.device("meta"):
        unet_v1, unet_v2 = UNetModel(**UNET_V1), UNetModel(**UNET_V2)
    ref = {
        "sd15": {**_shapes(unet_v1, "model.diffusion_model."), **vae(),
                 **{"cond_stage_model.transformer." + k: v for k, v in clip_l.items()}, **buffers},
        "sd21": {**_shapes(unet_v2, "model.diffusion_model."), **vae(), **_open_clip_h_text(), **buffers},
        "schedule_sample_timesteps": SCHEDULE_SAMPLE,
        "schedule_sample_values": schedule,
    }
    data = json.dumps(ref, sort_keys=True, separators=(",", ":")).encode("utf-8")
    OUT.write_bytes(gzip.compress(data, mtime=0))  # mtime 0: the same inputs give the same bytes
    print(f"{OUT}: sd15 {len(ref['sd15'])} tensors, sd21 {len(ref['sd21'])} tensors")


if __name__ == "__main__":
    main()
