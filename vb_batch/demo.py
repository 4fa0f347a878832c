"""The out-of-the-box demo: sample images the project draws itself, a tiny model built locally, a real job.

No weights can be downloaded, so until a trained demo generalist exists the
demo runs the tiny *random* Marigold pipeline: the labels are meaningless,
but every stage (decode, bucketing by size, model, encoding, atomic commit)
runs for real. The samples deliberately include awkward inputs: EXIF-rotated
JPEG, RGBA and palette PNG, 16-bit grey, mixed sizes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vb_batch.config import load_config
from vb_batch.job import RunSummary, run_job

SIZES = [(96, 128), (128, 96), (80, 80)]


def draw_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A simple room: sky-to-wall gradient, a floor receding to a horizon, a few shaded boxes and discs."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.35, 0.6)
    top = rng.uniform(120, 230, 3)
    image = np.broadcast_to(top * (0.6 + 0.4 * yy[..., None] / height), (height, width, 3)).copy()
    floor = yy > horizon
    checker = ((xx // 12 + (yy - horizon) // 6) % 2).astype(np.float32)
    floor_colour = rng.uniform(60, 200, 3)
    image[floor] = (floor_colour * (0.7 + 0.3 * checker[..., None]))[floor]
    for _ in range(rng.integers(2, 5)):
        colour = rng.uniform(30, 255, 3)
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.3, 0.9) * height
        r = rng.uniform(0.08, 0.2) * min(height, width)
        if rng.random() < 0.5:
            inside = (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r * 0.8)
            shade = 0.75 + 0.25 * (xx - cx + r) / (2 * r)
        else:
            d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
            inside = d2 < 1
            shade = np.sqrt(np.clip(1 - d2, 0, 1)) * 0.6 + 0.4
        image[inside] = (colour * shade[..., None])[inside]
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(rgb: np.ndarray, index: int, folder: Path) -> Path:
    """Save in one of several formats and modes, as a real archive would hold them."""
    kind = index % 6
    image = Image.fromarray(rgb)
    if kind == 0:
        path = folder / f"scene_{index:03d}.jpg"
        image.save(path, quality=90)
    elif kind == 1:
        # Stored sideways with an EXIF orientation tag: the pipeline must rotate it back.
        path = folder / f"scene_{index:03d}_exif.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    elif kind == 2:
        path = folder / f"scene_{index:03d}_rgba.png"
        image.putalpha(255)
        image.save(path)
    elif kind == 3:
        path = folder / f"scene_{index:03d}_palette.png"
        image.quantize(64).save(path)
    elif kind == 4:
        path = folder / f"scene_{index:03d}_grey16.png"
        grey = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(grey).save(path)
    else:
        path = folder / f"scene_{index:03d}.webp"
        buf = io.BytesIO()
        image.save(buf, format="WEBP", quality=90)
        path.write_bytes(buf.getvalue())
    return path


def make_sample_images(folder: str | Path, count: int = 24, seed: int = 0) -> list[Path]:
    """Write `count` procedurally drawn sample images (deterministic for a seed) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return [_save(draw_scene(rng, *SIZES[i % len(SIZES)]), i, folder) for i in range(count)]


def run_demo(out: str = "out", data_dir: str = "demo_data", rows: int = 24) -> RunSummary:
    from vb_batch.models.tiny import build_tiny_marigold

    data = Path(data_dir)
    images = data / "images"
    print(f"vb-batch demo: drawing {rows} sample images into {images}/")
    make_sample_images(images, rows)
    model_dirs = {}
    for task in ("depth", "normals"):
        model_dirs[task] = data / "tiny-marigold" / task
        if not (model_dirs[task] / "model_index.json").exists():
            print(f"vb-batch demo: building a tiny random Marigold {task} pipeline in {model_dirs[task]}/ (no download)")
            build_tiny_marigold(model_dirs[task], task=task)
    config = Path(__file__).resolve().parent.parent / "conf" / "demo.yaml"
    overrides = [
        f"input.path={images}",
        f"output.path={out}",
        f"model.path={{depth: {model_dirs['depth']}, normals: {model_dirs['normals']}}}",
    ]
    cfg = load_config(config if config.exists() else _DEMO_CONFIG, overrides)
    summary = run_job(cfg)
    print(summary.render())
    print(f"read the labels back: python -c \"import vb_batch; print(vb_batch.load_arrays('{out}', 'depth')[0].shape)\"")
    return summary


# Used when the package is installed without the repo's conf/ folder.
_DEMO_CONFIG = {
    "input": {"path": "demo_data/images"},
    "output": {"path": "out", "mode": "overwrite"},
    "tasks": ["depth", "normals"],
    "model": {"backend": "marigold", "batch_size": 4},
}
