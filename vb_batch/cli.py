"""`vb-batch`: the command line.

    vb-batch run CONFIG [key.path=value ...]     run a job
    vb-batch validate CONFIG [key.path=value ...] check a config (no I/O; --live: also input, output, model)
    vb-batch plan CONFIG [key.path=value ...]     every check, the output schema, --sample N: time and size
    vb-batch config-reference                     every config key with type, default and meaning (Markdown)
    vb-batch demo                                 held-out scenes + the demo generalist + a real job + eval
    vb-batch eval PREDICTIONS [--truth TRUTH]     metrics against ground truth, next to trivial baselines
    vb-batch scenes PATH --count N                procedural scenes with exact ground truth, as a table
    vb-batch report OUTPUT                        (re)write OUTPUT/_report.html
    vb-batch show OUTPUT --id ID                  previews of one row as PNG files
      (both: --allow-uri-prefix PREFIX [--allow-private-addresses] to show inputs given by URI)
    vb-batch tiny-model PATH --task depth         build a tiny random Marigold checkpoint
    vb-batch describe OUTPUT                      every column with its unit, scale and meaning
    vb-batch compact OUTPUT                       merge small files into files of rows_per_file rows (Parquet,
                                                  Delta, Iceberg: --table --catalog; or --config JOB.yaml)

Anywhere on the line: -v (-vv: debug), -q (errors only), --log-format json (every line on stdout and
stderr one JSON object; --progress-every SECONDS: progress events). Logs, exit codes and scheduler
recipes (cron, Airflow, Dagster): docs/operations.md.

Exit codes (EXIT_*): 0 success (failed rows within run.max_error_fraction), 1 the job failed
or more than run.max_error_fraction of its rows failed (after committing every row), 2 the
config is invalid (the message names the field), 3 another run holds the output's writer lease
(nothing was changed: try again later), 4 a hosted model's quota is exhausted (the rows answered
are committed: resume once the quota is back), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import traceback

from vb_batch._version import __version__
from vb_batch.config import ConfigError, load_config, redacted
from vb_batch.errors import OutputExistsError, QuotaExhaustedError
from vb_batch.logs import (
    configure_logging,
    json_logs,
    json_output,
    print_failure,
    summary_output,
)
from vb_batch.masking import mask_text, secret_values

EXIT_OK = 0
EXIT_FAILED = 1  # the job failed, or too many of its rows did (run.max_error_fraction)
EXIT_CONFIG = 2  # the config must change
EXIT_LEASE_HELD = 3  # another run writes this output now: a scheduler may simply try again later
EXIT_QUOTA = 4  # a hosted model's quota is exhausted (for the day): resume once it is back
EXIT_INTERRUPTED = 130


def config_help() -> str:
    """`run --help`'s epilog: every config key, generated from the pydantic models (as docs/config.md)."""
    from vb_batch.config_reference import render_config_reference

    return (
        "Config keys (YAML sections; any key can be overridden as key.path=value; docs/config.md):\n"
        + render_config_reference()
        + "\nExample:\n  vb-batch run conf/demo.yaml model.batch_size=4 output.mode=overwrite\n"
    )


def _run(args: argparse.Namespace) -> int:
    from vb_batch.job import run_job

    cfg = load_config(args.config, args.overrides)
    args.secrets = secret_values(cfg.model_dump(mode="json"))  # scrubbed from any failure shown
    summary = run_job(cfg)
    code = EXIT_OK if summary.success else EXIT_FAILED
    print(summary_output(summary, code))  # the rendered summary, or one JSON object (--log-format json)
    return code


def _validate(args: argparse.Namespace) -> int:
    from vb_batch.planning import plan, validate

    if args.live:
        result = plan(args.config, args.overrides, live=True)
        if not result.ok:
            print(result.render())
            for line in result.errors():
                print(f"vb-batch: {line}", file=sys.stderr)
            return result.exit_code
    cfg = validate(args.config, args.overrides)
    shown = redacted(cfg)
    if cfg.model.backend:
        from vb_batch.models.base import resolved_model_settings

        # What the backend fills in where the config is silent (a distilled klein's 4 steps, Qwen's CFG,
        # the working sizes), read from the checkpoint's local files only.
        shown["model_resolved"] = resolved_model_settings(cfg.model)
    print(json.dumps(shown, indent=None if json_logs() else 2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from vb_batch.planning import plan

    result = plan(args.config, args.overrides, live=not args.static, sample=args.sample, workers=args.workers)
    print(result.render())
    if args.json and result.estimate is not None:
        with open(args.json, "w") as f:
            json.dump(result.estimate.as_dict(), f, indent=2)
            f.write("\n")
    for line in result.errors():
        print(f"vb-batch: {line}", file=sys.stderr)
    return result.exit_code


def _config_reference(args: argparse.Namespace) -> int:
    from vb_batch.config_reference import render_config_reference

    print(render_config_reference(markdown=not args.text), end="" if not args.text else "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vb_batch.demo import run_demo

    summary = run_demo(args.out, data_dir=args.data, rows=args.rows)
    return 0 if summary.success else 1


def _eval(args: argparse.Namespace) -> int:
    from vb_batch.evaluation.confidence import render_confidence
    from vb_batch.evaluation.scoring import (
        confidence_report,
        metrics_json,
        metrics_path,
        render_metrics,
        score,
        write_metrics,
    )

    try:
        scores = score(args.predictions, args.truth, baselines=not args.no_baselines, max_depth=args.max_depth,
                       protocol=args.protocol, truth_format=args.truth_format, alignment=args.alignment,
                       averaging=args.averaging, min_depth=args.min_depth,
                       alignment_max_res=args.alignment_max_res)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"vb-batch eval: {exc}", file=sys.stderr)
        return 2
    metrics = scores.metrics
    print(render_metrics(metrics))
    print(f"metrics: {write_metrics(metrics, args.out or metrics_path(args.predictions))}")
    result = metrics_json(metrics)
    if args.confidence:
        result["confidence"] = confidence_report(scores)
        print(render_confidence(result["confidence"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        print(f"metrics: {args.json}")
    return 0


def _scenes(args: argparse.Namespace) -> int:
    from vb_batch.scenes import write_scene_table

    print(write_scene_table(args.path, args.count, args.start_seed, (args.height, args.width), args.encoding))
    return 0


def _report(args: argparse.Namespace) -> int:
    import time

    from vb_batch.report import write_report

    started = time.perf_counter()
    target = write_report(args.output, samples=args.samples, allow_uri_prefixes=args.allow_uri_prefix,
                          allow_private_addresses=args.allow_private_addresses)
    print(f"{target} (in {time.perf_counter() - started:.1f} s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from vb_batch.report import show_row

    try:
        files = show_row(args.output, args.id, args.dir, max_side=args.max_side, allow_uri_prefixes=args.allow_uri_prefix,
                         allow_private_addresses=args.allow_private_addresses)
    except KeyError as exc:
        print(f"vb-batch: {exc.args[0]}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


def _describe(args: argparse.Namespace) -> int:
    import vb_batch

    print(vb_batch.describe(args.output))
    return 0


def _compact(args: argparse.Namespace) -> int:
    from vb_batch.io.sinks.compaction import compact_output, output_for_compaction

    cfg = output_for_compaction(args.output, args.config, args.format, args.table, args.catalog, args.storage)
    args.secrets = secret_values(cfg.model_dump(mode="json"))  # scrubbed from any failure shown
    result = compact_output(cfg, rows_per_file=args.rows_per_file, retention_hours=args.retention_hours,
                            enforce_retention=not args.allow_short_retention,
                            progress=lambda line: print(line, file=sys.stderr))
    print(result.render())
    return EXIT_OK


def _tiny_model(args: argparse.Namespace) -> int:
    from vb_batch.models.tiny import build_tiny_marigold

    print(build_tiny_marigold(args.path, task=args.task, seed=args.seed))
    return 0


URI_RULES_HELP = """\
Pictures come from the output itself (stored input images, maps). Inputs given by URI are
read only where you say, with --allow-uri-prefix PREFIX (repeatable), and never from
loopback, private or link-local http hosts unless --allow-private-addresses: whoever wrote
the output chose its URIs and its stored config, so neither decides what is read.
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
    _logging_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    epilog = config_help()
    for name, func, text in (
        ("run", _run, "run a job from a YAML config"),
        ("validate", _validate, "check a config with no I/O and print it resolved (secrets masked)"),
        ("plan", _plan, "check a job (config, input, output, model) and estimate its time and size"),
    ):
        p = sub.add_parser(
            name, help=text, description=text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("config", help="job config YAML file")
        p.add_argument("overrides", nargs="*", metavar="key.path=value", help="override config keys (values are YAML)")
        p.set_defaults(func=func)
        if name == "validate":
            p.add_argument("--live", action="store_true",
                           help="also open the input and output and check the model's weights and device (vb-batch plan)")
        if name == "plan":
            p.add_argument("--static", action="store_true", help="config checks and output schema only: no I/O")
            p.add_argument("--sample", type=int, default=0, metavar="N",
                           help="run the job on the first N rows (a temporary output) and project time and size")
            p.add_argument("--workers", type=int, default=1, metavar="N",
                           help="also project the time on N workers like this machine (default: 1)")
            p.add_argument("--json", metavar="FILE", help="write the estimate as JSON to FILE")

    p = sub.add_parser(
        "config-reference",
        help="print every config key with its type, default and meaning",
        description="Every job config key, generated from the pydantic models: Markdown (docs/config.md is "
        "`vb-batch config-reference > docs/config.md`), or --text as in `vb-batch run --help`.",
    )
    p.add_argument("--text", action="store_true", help="plain text instead of Markdown")
    p.set_defaults(func=_config_reference)

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

    from vb_batch.evaluation.protocols import PROTOCOLS

    p = sub.add_parser(
        "eval",
        help="score an output's depth, normals and segmentation against ground truth",
        description="Depth AbsRel / RMSE / delta1 (metric, and scale-and-shift aligned), normals angular errors, "
        "segmentation mIoU and per-class IoU, next to trivial baselines (median depth, mean normal, majority "
        "class). Truth columns are found by their vb.role = truth field metadata, in PREDICTIONS itself "
        "(kept input columns) or in --truth, joined on the id column; a benchmark's own encodings (KITTI, NYU, "
        "Cityscapes labelIds, ADE20K, DSINE normals) are declared with --truth-format, its protocol with --protocol. "
        "Writes a metrics table (Parquet).",
    )
    p.add_argument("predictions", help="output dataset path or URL (or any table with vb_batch map columns)")
    p.add_argument("--truth", help="table with the ground-truth columns (default: PREDICTIONS itself)")
    p.add_argument("--out", help="metrics table to write (default: PREDICTIONS/_metrics.parquet)")
    p.add_argument("--json", help="also write the metrics as JSON here")
    p.add_argument("--no-baselines", action="store_true", help="score the model only")
    p.add_argument("--protocol", default="generic", choices=list(PROTOCOLS),
                   help="benchmark protocol: crops, depth range, alignment, averaging (default: generic)")
    p.add_argument("--truth-format", metavar="SPEC|YAML",
                   help="declare the truth's encodings: task=encoding[:column], ... (kitti-png, nyu-png, metres, "
                   "normals-png, normals-array, cityscapes-labelids, cityscapes-trainids, ade20k, class-ids), "
                   "task.option=value (depth.mask=COLUMN: the dataset's validity mask, as DIODE's; "
                   "segmentation.instances=COLUMN: Cityscapes instanceIds for iIoU) or a YAML")
    p.add_argument("--alignment", choices=["none", "scale", "scale-shift", "scale-shift-disparity"],
                   help="depth alignment of the _aligned metrics (default: the protocol's)")
    p.add_argument("--averaging", choices=["per-image", "pooled"], help="depth and normals averaging (default: the protocol's)")
    p.add_argument("--min-depth", type=float, help="depth range floor in metres, exclusive (default: the protocol's)")
    p.add_argument("--max-depth", type=float, help="depth range cap in metres, exclusive (default: the protocol's; generic 80)")
    p.add_argument("--alignment-max-res", type=int, metavar="PIXELS",
                   help="fit the depth alignment at this resolution as Marigold's --alignment_max_res (default: the "
                   "protocol's: 1024 for eth3d, else full); 0 = full resolution")
    p.add_argument("--confidence", action="store_true",
                   help="also judge the stored confidence: AUSE and the error of rows kept at each min_confidence")
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
    p.add_argument("--max-side", type=int, default=1024, metavar="PIXELS",
                   help="longest side of each PNG, larger pictures are scaled down (default: 1024; 0: full size)")
    _uri_rule_flags(p)
    p.set_defaults(func=_show)

    p = sub.add_parser("tiny-model", help="build a tiny random Marigold checkpoint (for tests and demos)")
    p.add_argument("path", help="directory to save the pipeline to")
    p.add_argument("--task", choices=["depth", "normals"], default="depth")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    # `describe`: what every column of an output means (units, scale), which DuckDB and Polars cannot show.
    p = sub.add_parser(
        "describe",
        help="print every column of an output with its unit, scale and meaning",
        description="Print every column of OUTPUT (a Parquet output, a Delta table, an Iceberg table's location, "
        "or a folder Spark wrote from vb_batch.spark.annotate) with type, unit, how stored numbers map to values, "
        "and meaning. Python: print(vb_batch.describe(OUTPUT)).",
    )
    p.add_argument("output", help="output dataset path or URL")
    p.set_defaults(func=_describe)
    p = sub.add_parser(
        "compact",
        help="merge an output's small files into files of rows_per_file rows, under its writer lease",
        description="Merge the small part files that appends leave into files of --rows-per-file rows, in one "
        "atomic commit under the output's writer lease (a run holding it: exit 3); rows, ids and values are "
        "unchanged. Then Delta: VACUUM of unreferenced files older than --retention-hours; Iceberg: snapshots "
        "older than it expire and the files only they referenced are deleted. A killed compaction is "
        "recovered by the next run or compaction.",
    )
    p.add_argument("output", nargs="?", help="output path or URL (Parquet dataset, Delta table)")
    p.add_argument("--config", metavar="JOB.yaml", help="compact the output section of this job")
    p.add_argument("--format", choices=["auto", "parquet", "delta", "iceberg"], default="auto",
                   help="the output's format (default: auto, detected; iceberg with --table)")
    p.add_argument("--table", help="iceberg: the table, namespace.name")
    p.add_argument("--catalog", action="append", default=[], metavar="KEY=VALUE",
                   help="iceberg: a catalog property, as output.catalog (repeatable)")
    p.add_argument("--storage", action="append", default=[], metavar="KEY=VALUE",
                   help="how to reach object storage, as output.storage (repeatable), e.g. endpoint_url=http://...")
    p.add_argument("--rows-per-file", type=int, metavar="N",
                   help="rows per merged file (default: the job's output.rows_per_file, else 1024)")
    p.add_argument("--retention-hours", type=float, default=168.0, metavar="H",
                   help="Delta: vacuum files unreferenced for longer; Iceberg: expire older snapshots (default: 168)")
    p.add_argument("--allow-short-retention", action="store_true",
                   help="Delta: allow a retention below the table's own (readers of older versions may fail)")
    p.set_defaults(func=_compact)
    for p in sub.choices.values():  # every command, those added above included: the flags go anywhere
        _logging_flags(p, anywhere=True)
    return parser


def _logging_flags(parser: argparse.ArgumentParser, anywhere: bool = False) -> None:
    """-v / -q / --log-format on the main parser (with defaults) and on each command (defaults suppressed:
    a flag given before the command is not reset by the command's parser)."""
    keep = {"default": argparse.SUPPRESS} if anywhere else {}
    parser.add_argument("-v", "--verbose", action="count", help="log progress (-vv: debug details)",
                        **(keep or {"default": 0}))
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only", **keep)
    parser.add_argument("--log-format", choices=["text", "json"],
                        help="text (default), or json: every line on stdout and stderr one JSON object (docs/operations.md)",
                        **(keep or {"default": "text"}))
    parser.add_argument("--progress-every", type=float, metavar="SECONDS",
                        help="with --log-format json: a progress event every SECONDS while a job runs (default: 10)",
                        **(keep or {"default": None}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose, args.quiet, args.log_format, args.progress_every)
    with json_output() if args.log_format == "json" else contextlib.nullcontext():
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print_failure(EXIT_INTERRUPTED, "interrupted; committed rows are kept, re-run with output.mode=resume")
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - every failure ends in one clear line (the traceback with -v)
            code, text = failure(exc)
            secrets = getattr(args, "secrets", ())
            shown = mask_text(traceback.format_exc(), secrets) if args.verbose else None
            if shown and args.log_format != "json":
                print(shown, file=sys.stderr, end="")
            print_failure(code, mask_text(text, secrets), shown)
            return code


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with --log-format json a usage error, too, is one JSON object (exit 2)."""
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    wants_json = "--log-format=json" in words or any(
        a == "--log-format" and b == "json" for a, b in zip(words, words[1:]))
    if not wants_json:
        return parser.parse_args(argv)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            configure_logging(log_format="json")
            lines = said.getvalue().strip().splitlines()
            print_failure(EXIT_CONFIG, lines[-1] if lines else "invalid command line", said.getvalue().strip())
        raise


def failure(exc: BaseException) -> tuple[int, str]:
    """(exit code, one line) for a failure: EXIT_CONFIG when the config must change, EXIT_LEASE_HELD when
    another run writes the output (a lost lease is this run's failure: EXIT_FAILED), else EXIT_FAILED."""
    from vb_batch.io.lease import LeaseHeldError, LeaseLostError

    if isinstance(exc, ConfigError):
        return EXIT_CONFIG, str(exc)
    if isinstance(exc, LeaseHeldError):
        return EXIT_LEASE_HELD, str(exc)
    if isinstance(exc, QuotaExhaustedError):
        return EXIT_QUOTA, (f"quota exhausted: {exc}; the rows answered are committed: re-run with "
                            "output.mode=resume once the quota is back (recorded batch jobs are re-attached)")
    if isinstance(exc, (OutputExistsError, LeaseLostError)):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, FileNotFoundError):
        return EXIT_FAILED, f"not found: {exc}"
    if isinstance(exc, PermissionError):
        return EXIT_FAILED, (f"permission denied: {exc}; check that the output is writable and the storage "
                             "credentials (AWS_* environment, storage.profile) are allowed to read the input and "
                             "write the output")
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if _is_connection_failure(exc):
        return EXIT_FAILED, (f"cannot reach storage: {reason}; check input.storage / output.storage endpoint_url "
                             "and the network (committed rows are kept; re-run with output.mode=resume)")
    return EXIT_FAILED, f"the job failed: {reason} (run with -v for the traceback; committed rows are kept)"


def _is_connection_failure(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectionError", "EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "TimeoutError", "ReadTimeoutError"})

if __name__ == "__main__":
    sys.exit(main())
