"""`vb-batch`: the command line.

    vb-batch run CONFIG [key.path=value ...]     run a job
    vb-batch validate CONFIG [key.path=value ...] check a config and print it resolved
    vb-batch demo                                 sample images + tiny model + a real job
    vb-batch report OUTPUT                        (re)write OUTPUT/_report.html
    vb-batch show OUTPUT --id ID                  previews of one row as PNG files
    vb-batch tiny-model PATH --task depth         build a tiny random Marigold checkpoint

Exit codes: 0 success, 1 the job failed (or exceeded run.max_error_fraction),
2 the config is invalid (the message names the field).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vb_batch import __version__
from vb_batch.config import ConfigError, load_config, redacted
from vb_batch.errors import OutputExistsError

CONFIG_HELP = """\
Config keys (YAML sections; any key can be overridden as key.path=value):
  input.path            Parquet file/dataset or folder of images (local path or fsspec URL)
  input.image_column    column of image bytes   | input.uri_column  column of image URIs
  input.id_column       row id column (default id; missing: the URI or the content hash)
  output.path           output dataset (default out)
  output.mode           error | overwrite | append | resume (skip ids already committed)
  output.encoding       png (lossless, viewable) | array (raw little-endian values)
  tasks                 [depth, normals, segmentation, referring]
  segmentation.classes  class names (colours from the default palette) | segmentation.legend {name: [r,g,b]}
  referring.phrase      what to segment for the referring task
  model.backend         identity | marigold       model.path  checkpoint dir or hub id
  model.profile         vision-banana | marigold  model.batch_size, model.device, model.dtype
  engine.kind           local
Example:
  vb-batch run conf/demo.yaml model.batch_size=4 output.mode=overwrite
"""


def _run(args: argparse.Namespace) -> int:
    from vb_batch.job import run_job

    cfg = load_config(args.config, args.overrides)
    summary = run_job(cfg)
    print(summary.render())
    return 0 if summary.success else 1


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from vb_batch.io.sources import open_source
    from vb_batch.stages import Plan

    # Resolve the input, backend, profile and legend: faults show up here, not mid-run.
    source = open_source(cfg.input)
    Plan.build(cfg, source.schema, source.image_column, source.uri_column).output_schema()
    print(json.dumps(redacted(cfg), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vb_batch.demo import run_demo

    summary = run_demo(args.out, data_dir=args.data, rows=args.rows)
    return 0 if summary.success else 1


def _report(args: argparse.Namespace) -> int:
    from vb_batch.report import write_report

    print(write_report(args.output, samples=args.samples))
    return 0


def _show(args: argparse.Namespace) -> int:
    from vb_batch.report import show_row

    try:
        files = show_row(args.output, args.id, args.dir)
    except KeyError as exc:
        print(f"vb-batch: {exc.args[0]}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from vb_batch.models.tiny import build_tiny_marigold

    print(build_tiny_marigold(args.path, task=args.task, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vb-batch",
        description="Run a generalist image generator over image tables; write depth, normals and masks as columns.",
    )
    parser.add_argument("--version", action="version", version=f"vb-batch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, func, text in (
        ("run", _run, "run a job from a YAML config"),
        ("validate", _validate, "check a config and print it resolved (secrets masked)"),
    ):
        p = sub.add_parser(
            name, help=text, description=text, epilog=CONFIG_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("config", help="job config YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys (values are YAML)")
        p.set_defaults(func=func)

    p = sub.add_parser(
        "demo",
        help="generate sample images and a tiny model, then run a real job on them",
        description="Generate sample images and a tiny random Marigold pipeline (no download), "
        "annotate the images with depth and normals, write OUT and print the summary.",
    )
    p.add_argument("--out", default="out", help="output dataset (default: out)")
    p.add_argument("--data", default="demo_data", help="where samples and the tiny model go (default: demo_data)")
    p.add_argument("--rows", type=int, default=24, help="number of sample images (default: 24)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "report",
        help="(re)write the HTML run report of an output dataset",
        description="Write OUTPUT/_report.html: sample grid (input, depth, normals, masks), histograms, "
        "errors, config and provenance. Opens from disk; no server needed.",
    )
    p.add_argument("output", help="output dataset path or URL")
    p.add_argument("--samples", type=int, default=12, help="rows in the sample grid (default: 12)")
    p.set_defaults(func=_report)

    p = sub.add_parser("show", help="write the input and preview PNGs of one row")
    p.add_argument("output", help="output dataset path or URL")
    p.add_argument("--id", required=True, help="the row's id")
    p.add_argument("--dir", default="previews", help="where to write the PNGs (default: previews)")
    p.set_defaults(func=_show)

    p = sub.add_parser("tiny-model", help="build a tiny random Marigold checkpoint (for tests and demos)")
    p.add_argument("path", help="directory to save the pipeline to")
    p.add_argument("--task", choices=["depth", "normals"], default="depth")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"vb-batch: {exc}", file=sys.stderr)
        return 2
    except OutputExistsError as exc:
        print(f"vb-batch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vb-batch: interrupted; committed rows are kept, re-run with output.mode=resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
