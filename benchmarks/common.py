"""What every benchmark here shares: the input table, the machine description, timing and results files."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_images(folder: Path, images: list[np.ndarray], files: int = 1) -> Path:
    """uint8 RGB `images` as PNG bytes with ids (`img-000000`, ...), over `files` Parquet files in `folder`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    blobs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    ids = [f"img-{i:06d}" for i in range(len(images))]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(images) // files)
    for f in range(files):
        part = slice(f * per_file, (f + 1) * per_file)
        pq.write_table(pa.table({"id": ids[part], "image": pa.array(blobs[part], pa.binary())}), folder / f"part-{f}.parquet")
    return folder


def write_input(folder: Path, rows: int, height: int, width: int | None = None, files: int = 4) -> Path:
    """`rows` painted depth maps (PNG, `height` x `width`) with ids, over `files` Parquet files.

    Depth paintings, so that every task has something plausible to decode: an
    `identity` model hands the input back as its painting.
    """
    from vb_batch.codecs import depth

    width = width or height
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    yy, xx = yy / height, xx / width
    paintings = [
        depth.encode((0.5 + rng.uniform(5, 40) * xx + rng.uniform(1, 20) * yy**2).astype(np.float32))
        for _ in range(rows)
    ]
    return write_images(folder, paintings, files)


def best_of(repeats: int, run: Callable[[], Any], before: Callable[[], Any] = lambda: None) -> tuple[float, list[float]]:
    """(best, all) wall seconds of `repeats` calls of `run`; `before` runs untimed before each.

    The best run is the one least disturbed by the rest of the machine (the
    timeit convention); every time is kept in the results for reference.
    """
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), times


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a figure was measured, including how busy the machine was."""
    import pyarrow as pa

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    return info


def argument_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first line, and `--no-write`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, write no results file")
    return parser


def write_result(name: str, report: dict[str, Any], path: Path | None = None) -> Path:
    """benchmarks/results/<name>.json, or `path` (and a copy under $OUT, where a device run collects results)."""
    path = path or RESULTS_DIR / f"{name}.json"
    text = json.dumps(report, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    return path


def publish(name: str, report: dict[str, Any], print_table: Callable[[dict[str, Any]], None], write: bool) -> dict:
    """Print a benchmark's table and, unless told not to, write its results file."""
    print_table(report)
    if write:
        print(f"wrote {write_result(name, report)}")
    return report
