"""What the per-row decode budget costs ordinary images: decode time with and without it.

The budget (`input.decode_timeout_s`, `input.max_jpeg_scans`) counts a JPEG's scans before
decoding and feeds the decoder `DECODE_CHUNK_BYTES` at a time, checking the row's CPU time
between chunks. "without" is the same `decode_image` with the count and the checks switched
off and Pillow's own 64 KiB chunks. Images are photo-like (smooth structure plus sensor
noise), as JPEG (baseline and progressive) and PNG; times are the best CPU seconds of
`--repeats` decodes, interleaved (alternating which goes first) so that both see the same load.

    python benchmarks/bench_decode_budget.py                 # writes benchmarks/results/decode_budget.json
    python benchmarks/bench_decode_budget.py --repeats 5 --no-write
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, machine_info, publish  # noqa: E402

from vb_batch.io import images  # noqa: E402

SIZES = {"1 MP": (1024, 1024), "12 MP": (3000, 4000)}


def photo(height: int, width: int) -> np.ndarray:
    """Smooth colour structure (an upscaled 24 x 32 field) plus noise: compresses like a photo."""
    rng = np.random.default_rng(0)
    field = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(field, np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encoded(rgb: np.ndarray) -> dict[str, bytes]:
    out = {}
    for name, fmt, options in (("JPEG", "JPEG", {"quality": 90}), ("JPEG progressive", "JPEG",
                                {"quality": 90, "progressive": True}), ("PNG", "PNG", {"compress_level": 6})):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt, **options)
        out[name] = buf.getvalue()
    return out


@contextlib.contextmanager
def without_budget():
    """`decode_image` as it was before the budget: no scan count, no CPU checks, Pillow's chunks."""
    saved = images.DECODE_CHUNK_BYTES, images._BudgetedBytes.check, images._check_scans
    images.DECODE_CHUNK_BYTES = ImageFile.MAXBLOCK
    images._BudgetedBytes.check = lambda self: None
    images._check_scans = lambda data, max_scans: None
    try:
        yield
    finally:
        images.DECODE_CHUNK_BYTES, images._BudgetedBytes.check, images._check_scans = saved


def cpu_seconds(data: bytes) -> float:
    started = time.thread_time()
    images.decode_image(data, max_pixels=64_000_000)
    return time.thread_time() - started


def measure(repeats: int) -> dict:
    rows = []
    for size_name, (height, width) in SIZES.items():
        for fmt, data in encoded(photo(height, width)).items():
            with_budget, without = [], []
            for i in range(repeats):  # alternating which goes first: neither always finds the caches warm
                if i % 2:
                    with_budget.append(cpu_seconds(data))
                with without_budget():
                    without.append(cpu_seconds(data))
                if not i % 2:
                    with_budget.append(cpu_seconds(data))
            rows.append({"image": f"{fmt} {size_name}", "bytes": len(data), "without_s": min(without),
                         "with_s": min(with_budget), "overhead_pct": 100 * (min(with_budget) / min(without) - 1)})
    return {"machine": machine_info(), "repeats": repeats, "chunk_bytes": images.DECODE_CHUNK_BYTES, "rows": rows}


def print_table(report: dict) -> None:
    print(f"{'image':<26}{'bytes':>11}{'without s':>11}{'with s':>10}{'overhead':>10}")
    for row in report["rows"]:
        print(f"{row['image']:<26}{row['bytes']:>11}{row['without_s']:>11.4f}{row['with_s']:>10.4f}"
              f"{row['overhead_pct']:>9.1f}%")


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=61)
    args = parser.parse_args()
    publish("decode_budget", measure(args.repeats), print_table, not args.no_write)


if __name__ == "__main__":
    main()
