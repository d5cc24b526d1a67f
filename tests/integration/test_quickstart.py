"""The README's first command shows learning: after examples/quickstart.json, the sample for "a red circle on a blue
background" is blue around a red centre. Judged from the sample's colours, relative to the run's other prompts'
samples (not from the loss, and with no exact pixel values, which move with torch versions).

With a random VAE (the built-in tiny-sd's) every sample decodes to the same mush and this test fails; it passes
because tiny-sd-quickstart's VAE (utils/sd/builtin_models.py colour_vae) decodes latents back to colours.
"""
from pathlib import Path

import numpy as np

from tests.integration.conftest import only_run, run_train

ROOT = Path(__file__).resolve().parents[2]
BLUE = np.array([40, 70, 210])        # examples/make_quickstart_data.py's blue
PROMPT = "a_red_circle_on_a_blue_background"


def regions(grid_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB of the border ring and of the centre of the grid's first cell (the highest CFG scale). The ring is
    the outer 12 pixels, less the top 16 rows where the CFG label is drawn; the centre is the middle 16 x 16."""
    from PIL import Image
    grid = np.asarray(Image.open(grid_path).convert("RGB")).astype(float)
    h = grid.shape[0]
    cell = grid[:, :h]
    ring = np.zeros((h, h), bool)
    ring[-12:] = ring[:, :12] = ring[:, -12:] = True
    ring[:16] = False
    mid = slice(h // 2 - 8, h // 2 + 8)
    return cell[ring].mean(0), cell[mid, mid].reshape(-1, 3).mean(0)


def redness(rgb: np.ndarray) -> float:
    return float(rgb[0] - (rgb[1] + rgb[2]) / 2)


def test_quickstart_sample_is_a_red_centre_on_blue(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config's paths are relative to the repository, as when a user runs it
    logdir = tmp_path / "logs"
    assert run_train(["--config", "examples/quickstart.json", "--logdir", str(logdir)]) == 0
    samples = only_run(logdir) / "samples"
    final = max(int(p.name[2:7]) for p in samples.glob("gs*.jpg"))
    grids = sorted(samples.glob(f"gs{final:05d}-*.jpg"))
    target = [p for p in grids if PROMPT in p.name]
    others = [p for p in grids if PROMPT not in p.name]
    assert len(target) == 1 and others, [p.name for p in grids]
    border, centre = regions(target[0])
    other_borders = [regions(p)[0] for p in others]
    # the background is blue: nearer the data's blue than any other prompt's background
    distance = np.linalg.norm(border - BLUE)
    assert all(distance < np.linalg.norm(b - BLUE) for b in other_borders), (border, other_borders)
    assert border[2] > border[0] + 60 and border[2] > border[1] + 60, border   # and blue, not grey or purple
    # the centre is red against that background
    assert redness(centre) > redness(border) + 100, (centre, border)
    assert centre[0] > border[0] + 100, (centre, border)
