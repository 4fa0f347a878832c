"""`vb-batch`: the command line.

    vb-batch run CONFIG [key.path=value ...]     run a job
    vb-batch validate CONFIG [key.path=value ...] check a config and print it resolved
    vb-batch demo                                 held-out scenes + the demo generalist + a real job + eval
    vb-batch eval PREDICTIONS [--truth TRUTH]     metrics against ground truth, next to trivial baselines
    vb-batch scenes PATH --count N                procedural scenes with exact ground truth, as a table
    vb-batch report OUTPUT                        (re)write OUTPUT/_report.html
    vb-batch show OUTPUT --id ID                  previews of one row as PNG files
      (both: --allow-uri-prefix PREFIX, --allow-private-addresses to fetch inputs given by URI)
    vb-batch tiny-model PATH --task depth         build a tiny random Marigold checkpoint

Exit codes: 0 success, 1 the job failed (or exceeded run.max_error_fraction),
2 the config is invalid (the message names the field).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback

from vb_batch._version import __version__
from vb_batch.config import ConfigError, load_config, redacted
from vb_batch.errors import OutputExistsError
from vb_batch.masking import mask_text, mask_url, scrub, secret_values

CONFIG_HELP = """\
Config keys (YAML sections; any key can be overridden as key.path=value):
  input.path            Parquet file/dataset, folder of images, or Delta table (local path or URL: s3://...)
  input.format          auto | parquet | images | delta | iceberg (input.table, input.catalog)
  input.image_column    column of image bytes   | input.uri_column  column of image URIs
  input.id_column       row id column (default id; missing: the URI or the content hash)
  input.filter          row filter, e.g. "day = '2026-11-01' and camera in ('a', 'b')"
  input.allowed_prefixes  where URIs may point (default: the input's own scheme)
  input.storage / output.storage  endpoint_url, region, anonymous, profile, max_attempts, timeout_s
  output.path           output dataset or Delta table (default out)
  output.format         parquet | delta | iceberg (output.table, output.catalog, output.partition_by)
  output.mode           error | overwrite | append | resume (skip ids already committed)
  output.encoding       png (lossless, viewable) | array (raw little-endian values)
  tasks                 [depth, normals, segmentation, referring]
  segmentation.classes  class names (colours from the default palette) | segmentation.legend {name: [r,g,b]}
  segmentation.ensemble K passes with permuted legends, majority vote
  referring.phrase      what to segment for the referring task (or referring.phrase_column)
  model.backend         identity | marigold | diffusers | http | demo | package.module:Class
  model.path            checkpoint dir or hub id (marigold: {depth: ..., normals: ...})
  model.profile         vision-banana | open-vision-banana | marigold
  model.batch_size, model.device (auto|cpu|cuda|cuda:N|mps|xpu), model.dtype, model.seed, model.options
  engine.kind           local | ray (engine.address, actors, gpus_per_actor) | spark (engine.master, gpus_per_task)
  run.max_error_fraction  fail the run (exit 1) above this fraction of failed rows (default 0.5)
Example:
  vb-batch run conf/demo.yaml model.batch_size=4 output.mode=overwrite
"""


def _run(args: argparse.Namespace) -> int:
    from vb_batch.job import run_job

    cfg = load_config(args.config, args.overrides)
    args.secrets = secret_values(cfg.model_dump(mode="json"))  # scrubbed from any failure shown
    summary = run_job(cfg)
    print(summary.render())
    return 0 if summary.success else 1


def _open_input(cfg):
    from vb_batch.io.sources import open_source

    try:
        return open_source(cfg.input)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage faults (credentials, network) are named, not traced
        shown = mask_url(cfg.input.path or cfg.input.table or "")
        raise ConfigError(f"input.path: cannot open {shown!r}: {type(exc).__name__}: {exc}") from None


def _validate(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from vb_batch.stages import Plan

    # Resolve the input, backend, profile and legend: faults show up here, not mid-run.
    try:
        source = _open_input(cfg)
        Plan.build(cfg, source.schema, source.image_column, source.uri_column).output_schema()
    except ConfigError as exc:
        # A message may quote a URL or a storage client's words: masked like the config itself.
        raise ConfigError(scrub(str(exc), secret_values(cfg.model_dump(mode="json")))) from None
    print(json.dumps(redacted(cfg), indent=2))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vb_batch.demo import run_demo

    summary = run_demo(args.out, data_dir=args.data, rows=args.rows)
    return 0 if summary.success else 1


def _eval(args: argparse.Namespace) -> int:
    from vb_batch.evaluate import evaluate, metrics_json, metrics_path, render_metrics, write_metrics

    try:
        metrics = evaluate(args.predictions, args.truth, baselines=not args.no_baselines, max_depth=args.max_depth)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"vb-batch eval: {exc}", file=sys.stderr)
        return 2
    print(render_metrics(metrics))
    print(f"metrics: {write_metrics(metrics, args.out or metrics_path(args.predictions))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics_json(metrics), f, indent=2)
            f.write("\n")
        print(f"metrics: {args.json}")
    return 0


def _scenes(args: argparse.Namespace) -> int:
    from vb_batch.scenes import write_scene_table

    print(write_scene_table(args.path, args.count, args.start_seed, (args.height, args.width), args.encoding))
    return 0


def _report(args: argparse.Namespace) -> int:
    from vb_batch.report import write_report

    print(write_report(args.output, samples=args.samples, allow_uri_prefixes=args.allow_uri_prefix,
                       allow_private_addresses=args.allow_private_addresses))
    return 0


def _show(args: argparse.Namespace) -> int:
    from vb_batch.report import show_row

    try:
        files = show_row(args.output, args.id, args.dir, allow_uri_prefixes=args.allow_uri_prefix,
                         allow_private_addresses=args.allow_private_addresses)
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


URI_RULES_HELP = """\
Inputs given by URI are fetched for their pictures under the default rules (URIs in the
scheme of the output's stored input path; never loopback, private or link-local http
hosts), narrowed by the stored input.allowed_prefixes. The output's stored config cannot
widen them: whoever wrote the output wrote it. Widen them yourself, knowingly, with
--allow-uri-prefix (replaces the prefixes) and --allow-private-addresses.
"""


def _uri_rule_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-uri-prefix", action="append", metavar="PREFIX",
        help="fetch input pictures given by URI only under PREFIX (repeatable), e.g. s3://bucket/images/",
    )
    parser.add_argument(
        "--allow-private-addresses", action="store_true",
        help="also fetch http(s) URIs on loopback, private or link-local hosts",
    )


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
        help="render held-out scenes, annotate them with the demo generalist, evaluate",
        description="Render procedural scenes with exact ground truth (never trained on), annotate them with "
        "depth, normals and segmentation by the built-in demo generalist (shipped weights, no download, no "
        "training), write OUT with its report, and print the metrics next to trivial baselines. The demo model "
        "knows only these synthetic scenes; real images need a real checkpoint.",
    )
    p.add_argument("--out", default="out", help="output dataset (default: out)")
    p.add_argument("--data", default="demo_data", help="where the scene table goes (default: demo_data)")
    p.add_argument("--rows", type=int, default=24, help="number of scenes (default: 24)")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "eval",
        help="score an output's depth, normals and segmentation against ground truth",
        description="Depth AbsRel / RMSE / delta1 (metric, and scale-and-shift aligned), normals angular errors, "
        "segmentation mIoU and per-class IoU, next to trivial baselines (median depth, mean normal, majority "
        "class). Truth columns are found by their vb.role = truth field metadata, in PREDICTIONS itself "
        "(kept input columns) or in --truth, joined on the id column. Writes a metrics table (Parquet).",
    )
    p.add_argument("predictions", help="output dataset path or URL (or any table with vb_batch map columns)")
    p.add_argument("--truth", help="table with the ground-truth columns (default: PREDICTIONS itself)")
    p.add_argument("--out", help="metrics table to write (default: PREDICTIONS/_metrics.parquet)")
    p.add_argument("--json", help="also write the metrics as JSON here")
    p.add_argument("--no-baselines", action="store_true", help="score the model only")
    p.add_argument("--max-depth", type=float, default=80.0, help="depth range cap in metres (default: 80)")
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "scenes",
        help="write procedural scenes with exact ground truth as an image table (Parquet)",
        description="Render rooms with boxes, spheres and cylinders (vb_batch.scenes) and write one Parquet file: "
        "id, image (PNG), gt_depth, gt_normals, gt_segmentation, gt_instances (vb.role = truth) and the intrinsics. "
        "Seeds from 1000000 on are held out from the demo model's training.",
    )
    p.add_argument("path", help="Parquet file to write")
    p.add_argument("--count", type=int, default=200, help="number of scenes (default: 200)")
    p.add_argument("--start-seed", type=int, default=1_000_000, help="first seed (default: 1000000, held out)")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--encoding", choices=["array", "png"], default="array", help="truth storage (default: array, exact)")
    p.set_defaults(func=_scenes)

    p = sub.add_parser(
        "report",
        help="(re)write the HTML run report of an output dataset",
        description="Write OUTPUT/_report.html: sample grid (input, depth, normals, masks), histograms, "
        "errors, config and provenance. Opens from disk; no server needed; runs no script.",
        epilog=URI_RULES_HELP,
    )
    p.add_argument("output", help="output dataset path or URL")
    p.add_argument("--samples", type=int, default=12, help="rows in the sample grid (default: 12)")
    _uri_rule_flags(p)
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "show",
        help="write the input and preview PNGs of one row",
        description="Write OUTPUT's row ID as PNG files: its input picture and a preview of each map.",
        epilog=URI_RULES_HELP,
    )
    p.add_argument("output", help="output dataset path or URL")
    p.add_argument("--id", required=True, help="the row's id")
    p.add_argument("--dir", default="previews", help="where to write the PNGs (default: previews)")
    _uri_rule_flags(p)
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
    except KeyboardInterrupt:
        print("vb-batch: interrupted; committed rows are kept, re-run with output.mode=resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends in one clear line (the traceback with -v)
        code, text = failure(exc)
        if args.verbose:
            traceback.print_exc()
        print(f"vb-batch: {mask_text(text, getattr(args, 'secrets', ()))}", file=sys.stderr)
        return code


def failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for a failure: 2 when the config must change, 1 when the run failed."""
    from vb_batch.io.lease import LeaseHeldError, LeaseLostError

    if isinstance(exc, ConfigError):
        return 2, str(exc)
    if isinstance(exc, (OutputExistsError, LeaseHeldError, LeaseLostError)):
        return 1, str(exc)
    if isinstance(exc, FileNotFoundError):
        return 1, f"not found: {exc}"
    if isinstance(exc, PermissionError):
        return 1, (f"permission denied: {exc}; check that the output is writable and the storage credentials "
                   "(AWS_* environment, storage.profile) are allowed to read the input and write the output")
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if _is_connection_failure(exc):
        return 1, (f"cannot reach storage: {reason}; check input.storage / output.storage endpoint_url and the "
                   "network (committed rows are kept; re-run with output.mode=resume)")
    return 1, f"the job failed: {reason} (run with -v for the traceback; committed rows are kept)"


def _is_connection_failure(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "TimeoutError", "ReadTimeoutError"})

if __name__ == "__main__":
    sys.exit(main())
