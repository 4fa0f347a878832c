"""Incremental resumes: bytes read for one new row on a 300 MiB archive, and resume start-up at 1M and 10M committed rows.

    python benchmarks/bench_incremental.py                      # both parts, default sizes
    python benchmarks/bench_incremental.py --part bytes --mib 300
    python benchmarks/bench_incremental.py --part scale --scale 1000000 10000000

Part `bytes`, per kind of input (a Parquet folder, a Delta table, an Iceberg table): an archive of
`--mib` rows of 1 MiB images (a 16 px painting carrying 1 MiB of incompressible bytes in a private PNG
chunk, which decoders skip) in 30 files / versions / snapshots, labelled once; then one new row lands
and the resume's bytes read (`rchar` of /proc/self/io: every read this process made, output and
logs included) are measured side by side, on copies of the same output, for:

    incremental   what vb_batch does now: the input position skips the done files unread
    ids_first     no position (as for an output written before positions): the pending files' id
                  column first, row groups whose ids are all committed left unread
    full_read     neither (what a resume did before): every row read, committed ones dropped after

Part `scale`: an input of 1,000 Parquet files holding N committed rows (its output built with the
sink's own commits and input position) plus one new file of 100 rows; the resume runs in a fresh
process, which reports its peak RSS (and what the process held before the run), the run's start-up
(the driver's time before processing: source, checks, lease, position, id lookup), and how many
committed ids its resume filter holds (what every worker would build a set of); at 1M, the same
resume of a copy of the output without its position (`no_position`: every input id looked up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, argument_parser, machine_info, publish  # noqa: E402

ROWS_PER_FILE = 10


def rchar() -> int:
    """Bytes this process has read through read(2) and friends so far (page cache or not)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def painting_png(i: int, side: int = 16) -> bytes:
    """A PNG that paints a constant depth of 1 + i metres."""
    import io

    from PIL import Image

    from vb_batch.codecs import depth

    buffer = io.BytesIO()
    Image.fromarray(depth.encode(np.full((side, side), 1.0 + i, np.float32))).save(buffer, format="PNG")
    return buffer.getvalue()


def heavy_png(i: int, payload: int) -> bytes:
    """A 16 px depth painting of 1 + i metres with `payload` incompressible bytes in a private ancillary chunk."""
    png = painting_png(i)
    data = np.random.default_rng(i).bytes(payload)
    chunk = len(data).to_bytes(4, "big") + b"prVt" + data + zlib.crc32(b"prVt" + data).to_bytes(4, "big")
    end = png.rindex(b"IEND") - 4  # IEND's length field
    return png[:end] + chunk + png[end:]


def rows(first: int, n: int, payload: int) -> pa.Table:
    return pa.table({"id": [f"img-{i:06d}" for i in range(first, first + n)],
                     "image": pa.array([heavy_png(i, payload) for i in range(first, first + n)], pa.binary())})


class Archive:
    """An input of one kind, grown one file / version / snapshot at a time."""

    def __init__(self, kind: str, root: Path):
        self.kind, self.root, self.files = kind, root / f"in-{kind}", 0
        root.mkdir(parents=True, exist_ok=True)
        self.catalog = {"type": "sql", "uri": f"sqlite:///{root}/catalog-{kind}.db",
                        "warehouse": f"file://{root}/warehouse-{kind}"}

    def add(self, table: pa.Table) -> None:
        if self.kind == "parquet":
            self.root.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, self.root / f"f{self.files:04d}.parquet", compression="none")
        elif self.kind == "delta":
            import deltalake

            deltalake.write_deltalake(str(self.root), table, mode="append")
        else:
            from vb_batch.io.iceberg import iceberg_catalog

            catalog = iceberg_catalog(self.catalog)
            catalog.create_namespace_if_not_exists("src")
            catalog.create_table_if_not_exists("src.images", schema=table.schema).append(table)
        self.files += 1

    def section(self) -> dict[str, Any]:
        if self.kind == "iceberg":
            return {"format": "iceberg", "table": "src.images", "catalog": self.catalog}
        return {"path": str(self.root)}

    def size(self) -> int:
        folder = self.root if self.kind != "iceberg" else Path(self.catalog["warehouse"][len("file://"):])
        return sum(p.stat().st_size for p in folder.rglob("*.parquet"))


def job(section: dict[str, Any], out: Path) -> dict[str, Any]:
    return {"input": section, "output": {"path": str(out), "mode": "resume", "report": False},
            "tasks": ["depth"], "model": {"backend": "identity", "batch_size": 8}, "run": {"progress": False}}


def measure_bytes(kind: str, mib: int, root: Path) -> dict[str, Any]:
    """One archive of `mib` 1 MiB rows, labelled; one new row; the resume's bytes read three ways."""
    import vb_batch
    from vb_batch.engines import core
    from vb_batch.io.sources import Source

    archive = Archive(kind, root)
    per = max(1, mib // 30)
    for first in range(0, mib, per):
        archive.add(rows(first, min(per, mib - first), 1 << 20))
    out = root / f"out-{kind}"
    first = vb_batch.annotate(job(archive.section(), out))
    archive.add(rows(mib, 1, 1 << 20))
    size = archive.size()
    figures: dict[str, Any] = {"archive_bytes": size, "rows_committed": first.rows_ok, "new_rows": 1}
    for way in ("full_read", "ids_first", "incremental"):
        target = root / f"out-{kind}-{way}"
        shutil.copytree(out, target)
        saved = core.usable, Source._all_done
        if way != "incremental":
            core.usable = lambda *args: False
        if way == "full_read":
            Source._all_done = lambda *args: False
        try:
            before, started = rchar(), time.perf_counter()
            summary = vb_batch.annotate(job(archive.section(), target))
            read, seconds = rchar() - before, time.perf_counter() - started
        finally:
            core.usable, Source._all_done = saved
        assert summary.rows_ok == 1 and summary.success, summary.render()
        figures[way] = {"bytes_read": read, "share_of_archive": round(read / size, 5), "seconds": round(seconds, 3),
                        "files_unread": summary.files_unread, "rows_skipped": summary.rows_skipped}
    return figures


# ---------------------------------------------------------------------------- scale


def build_scale(n: int, root: Path) -> dict[str, Any]:
    """An input of 1,000 files with `n` rows, all committed (output built by the sink), plus a new file of 100 rows."""
    import vb_batch
    from vb_batch.config import OutputConfig, load_config
    from vb_batch.io.formats import open_sink
    from vb_batch.io.sinks.staging import part_file_name
    from vb_batch.io.sources import open_source

    started = time.perf_counter()
    inp, out = root / "in", root / "out"
    inp.mkdir(parents=True)
    image = painting_png(0)
    files, per = 1000, n // 1000
    for f in range(files):
        ids = pa.array([f"img-{i:09d}" for i in range(f * per, (f + 1) * per)])
        pq.write_table(pa.table({"id": ids, "image": pa.array([image] * per, pa.binary())}), inp / f"f{f:04d}.parquet")
    # A real run on the first file gives the output's schema, fingerprint and a template row.
    template = root / "template"
    template.mkdir()
    shutil.copy(inp / "f0000.parquet", template / "f0000.parquet")
    vb_batch.annotate(job({"path": str(template)}, root / "template-out"))
    sample = pq.read_table(next((root / "template-out").glob("part-*.parquet")))
    marker = json.loads((root / "template-out" / "_vb" / "output.json").read_text())
    cfg = load_config(job({"path": str(inp)}, out))
    source = open_source(cfg.input)
    state = source.state()
    sink = open_sink(OutputConfig(**cfg.output.model_dump()), "bench-scale", sample.schema, "id",
                     fingerprint=marker["fingerprint"])
    with sink.lease_held():
        sink.open()
        staging = Path(sink._staged_path("x")).parent
        staging.mkdir(parents=True, exist_ok=True)
        one = sample.slice(0, 1)
        for f in range(files):
            ids = pa.array([f"img-{i:09d}" for i in range(f * per, (f + 1) * per)])
            table = one.take(pa.array(np.zeros(per, np.int64))).set_column(0, "id", ids)
            name = part_file_name("bench-scale", f"{f:05d}")
            pq.write_table(table, staging / name)
            sink.stage(name, per)
        sink.position = {**state.position(source.rows_by_file()), "run_id": "bench-scale", "recorded": time.time()}
        sink.close(success=True)
    new = pa.array([f"img-{i:09d}" for i in range(n, n + 100)])
    pq.write_table(pa.table({"id": new, "image": pa.array([image] * 100, pa.binary())}), inp / "f9999.parquet")
    return {"build_seconds": round(time.perf_counter() - started, 1), "input": str(inp), "output": str(out)}


CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import vb_batch
from vb_batch.engines import core
from vb_batch.engines.resume import ResumeFilter
if {no_position!r}:  # as an output written before input positions: every input id looked up
    core.usable = lambda *args: False
held = []
original = ResumeFilter.__init__
def recording(self, done, *args, **kwargs):
    held.append(len(done))
    original(self, done, *args, **kwargs)
ResumeFilter.__init__ = recording
def high_water_mb():  # VmHWM: this process's own peak (ru_maxrss carries the parent's across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
before = high_water_mb()
started = time.perf_counter()
summary = vb_batch.annotate({job!r})
print(json.dumps({{"seconds": round(time.perf_counter() - started, 3),
                   "start_seconds": summary.wall_seconds.get("start"),
                   "peak_rss_mb": round(high_water_mb(), 1),
                   "rss_mb_before_run": round(before, 1), "resume_filter_ids": held,
                   "rows_ok": summary.rows_ok, "files_unread": summary.files_unread,
                   "rows_unread": summary.rows_unread}}))
"""


def measure_scale(n: int, root: Path, without_position: bool) -> dict[str, Any]:
    built = build_scale(n, root)
    figures: dict[str, Any] = {"committed_rows": n, "input_files": 1001, "new_rows": 100,
                               "build_seconds": built["build_seconds"]}
    ways = ["incremental", "no_position"] if without_position else ["incremental"]
    for way in ways:
        out = Path(built["output"])
        if way != ways[-1]:  # every way resumes the same output
            out = out.with_name(f"out-{way}")
            shutil.copytree(built["output"], out)
        code = CHILD.format(bench=str(Path(__file__).resolve().parent), no_position=way == "no_position",
                            job=job({"path": built["input"]}, out))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
        figures[way] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def print_table(report: dict[str, Any]) -> None:
    for kind, figures in report["results"].get("bytes", {}).items():
        print(f"{kind}: archive {figures['archive_bytes'] / 2**20:.0f} MiB, 1 new row")
        for way in ("full_read", "ids_first", "incremental"):
            f = figures[way]
            print(f"  {way:12s} read {f['bytes_read'] / 2**20:8.1f} MiB = {f['share_of_archive']:7.2%} of the archive "
                  f"in {f['seconds']:.2f} s ({f['files_unread']} files unread)")
    for scale in report["results"].get("scale", []):
        for way in ("incremental", "no_position"):
            if way in scale:
                f = scale[way]
                print(f"{scale['committed_rows']:>10,} committed, {way:11s}: start {f['start_seconds']:.2f} s, run "
                      f"{f['seconds']:.2f} s, peak RSS {f['peak_rss_mb']:.0f} MB (before the run "
                      f"{f['rss_mb_before_run']:.0f}), resume filter ids {f['resume_filter_ids']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argument_parser(__doc__)
    parser.add_argument("--part", choices=["bytes", "scale", "both"], default="both")
    parser.add_argument("--mib", type=int, default=300)
    parser.add_argument("--kinds", nargs="+", default=["parquet", "delta", "iceberg"])
    parser.add_argument("--scale", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--without-position-at", type=int, nargs="*", default=[1_000_000],
                        help="scales at which a resume without a position runs too, for comparison")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vb-incremental-") as tmp:
        if args.part in ("bytes", "both"):
            results["bytes"] = {kind: measure_bytes(kind, args.mib, Path(tmp) / kind) for kind in args.kinds}
        if args.part in ("scale", "both"):
            results["scale"] = []
            for n in args.scale:
                results["scale"].append(measure_scale(n, Path(tmp) / f"scale-{n}", n in args.without_position_at))
                shutil.rmtree(Path(tmp) / f"scale-{n}", ignore_errors=True)
    report = {"benchmark": "bench_incremental", "machine": machine_info(), "time": time.time(), "results": results}
    return publish("incremental", report, print_table, not args.no_write)


if __name__ == "__main__":
    os.environ.setdefault("VB_BATCH_LOG", "warning")
    main()
