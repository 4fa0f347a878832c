"""The out-of-the-box demo: held-out procedural scenes, the built-in demo generalist, a real job, an evaluation.

`vb-batch demo` renders scenes the demo model never saw in training (`vb_batch.scenes`, with
exact depth, normals and classes as `gt_*` columns), annotates them with depth, normals and
segmentation through the normal pipeline (`model.backend: demo`, the weights shipped in
`vb_batch/demo_model/`, loaded like any checkpoint), writes the output and its run report
(`<out>/_report.html`: predictions and truth side by side), then scores the predictions
against the truth next to trivial baselines (`<out>/_metrics.parquet`). Nothing is trained
or downloaded. The demo model knows only these synthetic rooms: for real images use a real
checkpoint.

`make_sample_images` writes scenes as image files in awkward formats (EXIF-rotated JPEG, RGBA
and palette PNG, 16-bit grey, WebP, three sizes), for tests of the image decoding path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from vb_batch.config import load_config
from vb_batch.job import RunSummary, run_job
from vb_batch.scenes import HELD_OUT_SEED_START, SCENE_CLASSES, render_scene, write_scene_table

SIZES = [(96, 128), (128, 96), (80, 80)]


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
    """Write `count` rendered scenes (deterministic for a seed) into `folder` as image files of mixed formats."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [_save(render_scene(HELD_OUT_SEED_START + seed + i, *SIZES[i % len(SIZES)]).rgb, i, folder) for i in range(count)]


def run_demo(out: str = "out", data_dir: str = "demo_data", rows: int = 24) -> RunSummary:
    from vb_batch.evaluate import evaluate, metrics_path, render_metrics, write_metrics
    from vb_batch.models.demo_generalist import SHIPPED_MODEL

    scenes_path = Path(data_dir) / "scenes.parquet"
    print(f"vb-batch demo: rendering {rows} held-out scenes with exact depth, normals and classes into {scenes_path}")
    write_scene_table(scenes_path, rows, start_seed=HELD_OUT_SEED_START)
    config = Path(__file__).resolve().parent.parent / "conf" / "demo.yaml"
    overrides = [f"input.path={scenes_path}", f"output.path={out}", f"model.path={SHIPPED_MODEL}"]
    print(f"vb-batch demo: annotating them with the demo generalist ({SHIPPED_MODEL}; synthetic scenes only)")
    cfg = load_config(config if config.exists() else _DEMO_CONFIG, overrides)
    summary = run_job(cfg)
    print(summary.render())
    if summary.rows_ok:
        metrics = evaluate(out)
        target = write_metrics(metrics, metrics_path(out))
        print(f"vb-batch demo: predictions vs ground truth ({target}):")
        print(render_metrics(metrics))
    print(f"read the labels back: python -c \"import vb_batch; print(vb_batch.load_arrays('{out}', 'depth')[0].shape)\"")
    return summary


# Used when the package is installed without the repo's conf/ folder (keep in step with conf/demo.yaml).
_DEMO_CONFIG = {
    "input": {"path": "demo_data/scenes.parquet", "image_column": "image"},
    "output": {"path": "out", "mode": "overwrite"},
    "tasks": ["depth", "normals", "segmentation"],
    "segmentation": {"classes": list(SCENE_CLASSES)},
    "model": {"backend": "demo", "batch_size": 8, "device": "cpu"},
}
