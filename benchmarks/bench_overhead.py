"""What vb_batch adds around the model: the `identity` job against pyarrow alone, side by side.

The `identity` backend hands each input image back as its painting, so a job
with it is all pipeline and no model. Three things run on the same Parquet
input (`--rows` PNG images), in the same process, best of `--repeats`:

    pyarrow copy   pq.read_table(input) then pq.write_table(...): the I/O floor
    hand loop      pyarrow and the codec library by hand, one thread: read; per row,
                   PIL decode, depth + normals + segmentation decode, confidence means;
                   write the input columns plus the maps (raw float32 / id bytes, as the
                   job's `array` encoding stores them)
    vb_batch       the identity job for the same three tasks, `output.encoding: array`,
                   local engine: everything the loop does plus ids, per-row error
                   capture, summaries (depth min/median/max, class fractions),
                   provenance, bounded prefetch threads, staged files, atomic commit

Two ratios come out. vb_batch / hand loop is the pipeline's overhead over the
same work (target <= 1.3x). vb_batch / pyarrow copy is also printed: it is
the cost of decoding images and colours at all, which no engine can remove
(decoding a 128x128 PNG alone takes longer than copying its bytes).

    python benchmarks/bench_overhead.py                 # writes benchmarks/results/overhead.json
    python benchmarks/bench_overhead.py --rows 256 --repeats 1 --no-write
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import argument_parser, best_of, clear_dir, machine_info, publish, write_input  # noqa: E402

CLASSES = ["road", "car", "person", "sky"]


def pyarrow_copy(input_dir: Path, output_file: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(input_dir), output_file)


def hand_loop(input_dir: Path, output_file: Path, steps: dict[str, float] | None = None) -> None:
    """The same decoding, written with pyarrow, PIL and the codecs, one row at a time.

    `steps` (if given) receives the seconds spent in each step: where the time goes.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from vb_batch.codecs import depth, normals, segmentation

    spent = dict.fromkeys(("read", "PNG decode", "depth decode", "normals decode", "segmentation decode", "write"), 0.0)
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        spent[step] += now - clock
        clock = now

    legend = segmentation.Legend.from_names(CLASSES)
    table = pq.read_table(input_dir)
    columns: dict[str, list] = {name: [] for name in ("depth", "depth_confidence", "normals", "segmentation")}
    cells = table.column("image").to_pylist()
    lap("read")
    for cell in cells:
        rgb = np.asarray(Image.open(io.BytesIO(cell)).convert("RGB"))
        lap("PNG decode")
        depth_map = depth.decode(rgb)
        columns["depth"].append(depth_map.values.astype(np.float32).tobytes())
        columns["depth_confidence"].append(float(np.mean(depth_map.confidence)))
        lap("depth decode")
        columns["normals"].append(normals.decode(rgb).values.astype(np.float32).tobytes())
        lap("normals decode")
        columns["segmentation"].append(segmentation.decode(rgb, legend).values.tobytes())
        lap("segmentation decode")
    for name, values in columns.items():  # next to the input columns, image included, as the job keeps them
        table = table.append_column(name, pa.array(values))
    pq.write_table(table, output_file)
    lap("write")
    if steps is not None:
        steps.update(spent)


def job_config(input_dir: Path, output_dir: Path) -> dict:
    return {
        "input": {"path": str(input_dir)},
        "output": {"path": str(output_dir), "mode": "overwrite", "report": False, "encoding": "array"},
        "run": {"progress": False},
        "tasks": ["depth", "normals", "segmentation"],
        "segmentation": {"classes": CLASSES},
        "model": {"backend": "identity", "batch_size": 16},
    }


def measure(rows: int = 1024, side: int = 128, repeats: int = 3) -> dict[str, Any]:
    import vb_batch

    with tempfile.TemporaryDirectory(prefix="vb-bench-overhead-") as tmp:
        root = Path(tmp)
        input_dir = write_input(root / "input", rows, side)
        input_bytes = sum(f.stat().st_size for f in input_dir.iterdir())
        output_dir = root / "out-vb_batch"
        cfg = job_config(input_dir, output_dir)
        vb_batch.annotate(cfg)  # warm-up: imports, the segmentation colour table
        steps: list[dict[str, float]] = []  # per hand-loop run

        def timed_hand_loop() -> None:
            steps.append({})
            hand_loop(input_dir, root / "loop.parquet", steps[-1])

        timings = {
            "pyarrow copy": best_of(repeats, lambda: pyarrow_copy(input_dir, root / "copy.parquet")),
            "hand loop": best_of(repeats, timed_hand_loop),
            "vb_batch identity": best_of(repeats, lambda: vb_batch.annotate(cfg), before=lambda: clear_dir(output_dir)),
        }
        # Same work: the loop's depth maps are vb_batch's, bit for bit.
        import pyarrow.parquet as pq

        from vb_batch.io.outputs import read_output

        loop = pq.read_table(root / "loop.parquet").sort_by("id")
        output_bytes = loop.nbytes
        ours = read_output(str(output_dir)).sort_by("id")
        same_depth = all(
            np.array_equal(np.frombuffer(a, np.float32).reshape(b.shape), b)
            for a, b in zip(loop.column("depth").to_pylist(), vb_batch.load_arrays(ours, "depth"))
        )

    best = {side_name: t for side_name, (t, _) in timings.items()}
    fastest_loop = min(steps, key=lambda spent: sum(spent.values()))
    return {
        "benchmark": "benchmarks/bench_overhead.py",
        "machine": machine_info(),
        "settings": {
            "rows": rows, "side": side, "input_bytes": input_bytes, "repeats": repeats,
            "tasks": ["depth", "normals", "segmentation"], "encoding": "array",
            "timing": "wall seconds from reading the input to the written output, best of repeats",
        },
        "results": [
            {"side": name, "seconds": round(t, 3), "seconds_all_runs": [round(x, 3) for x in runs],
             "rows_per_second": round(rows / t, 1)}
            for name, (t, runs) in timings.items()
        ],
        "ratio_vb_batch_to_hand_loop": round(best["vb_batch identity"] / best["hand loop"], 3),
        "ratio_vb_batch_to_pyarrow_copy": round(best["vb_batch identity"] / best["pyarrow copy"], 1),
        "depth_identical_to_hand_loop": same_depth,
        # Where the work goes, whoever does it: the fastest hand-loop run, step by step, one thread.
        "hand_loop_seconds_by_step": {step: round(t, 3) for step, t in fastest_loop.items()},
        "output_bytes_in_memory": output_bytes,
        "target": "vb_batch identity <= 1.3x the same work without it (hand loop)",
    }


def print_table(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"identity job, {s['tasks']}, {s['rows']} images {s['side']}x{s['side']} "
          f"({s['input_bytes'] / 1e6:.1f} MB), best of {s['repeats']}")
    print(f"{'side':<18} {'seconds':>8} {'rows/s':>9}")
    for r in report["results"]:
        print(f"{r['side']:<18} {r['seconds']:>8.3f} {r['rows_per_second']:>9.1f}")
    print(f"vb_batch / hand loop: {report['ratio_vb_batch_to_hand_loop']:.2f}x   "
          f"vb_batch / pyarrow copy: {report['ratio_vb_batch_to_pyarrow_copy']:.1f}x   "
          f"same depth maps: {report['depth_identical_to_hand_loop']}")
    copy = next(r["seconds"] for r in report["results"] if r["side"] == "pyarrow copy")
    print(f"where the hand loop's time goes (one thread; the table written is {report['output_bytes_in_memory'] / 1e6:.0f} MB "
          f"in memory, {s['input_bytes'] / 1e6:.1f} MB read):")
    for step, seconds in report["hand_loop_seconds_by_step"].items():
        print(f"  {step:<20} {seconds:>7.3f} s  {seconds / copy:>7.1f}x the pyarrow copy")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report = measure(args.rows, args.side, args.repeats)
    return publish("overhead", report, print_table, write=not args.no_write)


if __name__ == "__main__":
    main()
