"""A small captioned dataset of mixed aspect ratios and a helper that runs train.main in-process."""
import json
from pathlib import Path

import pytest

import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_dataset(root: Path, sizes=((64, 64), (96, 64), (64, 96), (128, 64)), per_colour=2) -> Path:
    from PIL import Image, ImageDraw
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, rgb in COLOURS.items():
        for k in range(per_colour):
            w, h = sizes[(n + k) % len(sizes)]
            img = Image.new("RGB", (w, h), rgb)
            ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=(255 - rgb[0], 255 - rgb[1], 255 - rgb[2]))
            if k % 2:
                img.save(root / f"a {name} square_{k}.png")             # caption from the file name
            else:
                img.save(root / f"img{n}_{k}.jpg", quality=95)
                (root / f"img{n}_{k}.txt").write_text(f"a {name} picture, round, plain")  # sidecar caption
        n += 1
    return root


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def only_run(logdir: Path) -> Path:
    runs = [p for p in logdir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(runs) == 1, runs
    return runs[0]


def base_args(model: Path, data: Path, logdir: Path, **overrides) -> list[str]:
    args = {"resume_ckpt": str(model), "data_root": str(data), "logdir": str(logdir), "project_name": "t",
            "resolution": 64, "batch_size": 2, "max_epochs": 2, "seed": 7, "optimizer_config": None,
            "lr": 1e-3, "log_step": 1, "sample_steps": 1000, "sample_num_steps": 2, "num_workers": 0,
            "sample_prompts": None, "zero_frequency_noise_ratio": 0.0, "cond_dropout": 0.0,
            "mixed_precision": "no"}
    args.update(overrides)
    argv = []
    for k, v in args.items():
        argv += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return argv


def checkpoint_weights(ckpt: Path) -> dict:
    """The trained parts' tensors of a checkpoint folder, keyed part.name."""
    from safetensors.torch import load_file
    out = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if not (ckpt / part).is_dir():
            continue  # SD1/SD2 have no second text encoder
        f = next((ckpt / part).glob("*.safetensors"))
        out.update({f"{part}.{k}": v for k, v in load_file(f).items()})
    return out


def run_train(argv: list[str]) -> int:
    return train.main(argv)
