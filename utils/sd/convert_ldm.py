"""Command line for single-file conversion: `python -m utils.convert_ldm {to-single,to-diffusers,prune} ...`
(doc/CONVERSION.md). The conversions themselves: utils/sd/ldm_export.py (diffusers folder -> single file),
utils/sd/ldm_import.py (single file -> diffusers folder), utils/sd/ldm_files.py (reading, writing, pruning).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from utils.core.config_schema import ConfigError
from utils.sd.ldm_export import save_single_file
from utils.sd.ldm_files import Fmt, prune_single_file
from utils.sd.ldm_import import single_file_to_diffusers

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.convert_ldm",
                                description="Convert Stable Diffusion 1.x/2.x/XL between diffusers folders and "
                                            "single-file LDM checkpoints (offline).")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-single", help="diffusers folder -> .safetensors/.ckpt (+ .yaml sidecar for SD2 / v)")
    a.add_argument("model_folder", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--fp32", action="store_true", help="keep full precision (default: fp16)")
    a.add_argument("--ckpt", action="store_true", help="write a pickled .ckpt instead of .safetensors")
    a.add_argument("--base", type=Path, default=None,
                   help="diffusers folder to take parts missing from model_folder from (e.g. vae/, scheduler/)")
    a.add_argument("--unet-subfolder", default="unet", help="UNet subfolder to export, e.g. ema_unet")
    a.add_argument("--zero-terminal-snr", action="store_const", const=True, default=None,
                   help="mark the model as trained with zero terminal SNR (ztsnr); default: as its scheduler config says")
    b = sub.add_parser("to-diffusers", help=".safetensors/.ckpt -> diffusers folder")
    b.add_argument("file", type=Path)
    b.add_argument("out_folder", type=Path)
    b.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                   help="override the sidecar yaml; needed for SD2 768-v files that come without one")
    b.add_argument("--overwrite", action="store_true", help="replace out_folder if it exists")
    b.add_argument("--config_folder", type=Path, default=None,
                   help="a diffusers folder of the same architecture: its configs and tokenizers are used "
                        "(for a model that is not a release architecture and whose file does not carry them)")
    c = sub.add_parser("prune", help="drop EMA/optimizer state from a single file and halve it")
    c.add_argument("file", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--fp32", action="store_true", help="keep full precision (default: fp16)")
    c.add_argument("--use-ema", action="store_true", help="keep the EMA UNet weights instead of the trained ones")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits with code 2 on bad usage
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "to-single":
            fmt: Fmt = "ckpt" if args.ckpt or args.out.suffix.lower() == ".ckpt" else "safetensors"
            out = save_single_file(args.model_folder, args.out, half=not args.fp32, fmt=fmt, base_folder=args.base,
                                   unet_subfolder=args.unet_subfolder, zero_terminal_snr=args.zero_terminal_snr)
            sidecar = out.with_suffix(".yaml")
            print(f"wrote {out}" + (f" and {sidecar}" if sidecar.is_file() else ""))
        elif args.command == "to-diffusers":
            out = single_file_to_diffusers(args.file, args.out_folder, prediction_type=args.prediction_type,
                                           config_folder=args.config_folder, overwrite=args.overwrite)
            print(f"wrote {out}")
        else:
            out = prune_single_file(args.file, args.out, half=not args.fp32, use_ema=args.use_ema)
            print(f"wrote {out}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
