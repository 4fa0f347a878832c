"""Entry point for `spark-submit`: run a vb_batch job config on the Spark engine.

    PYSPARK_PYTHON=$PWD/.venv/bin/python .venv/bin/spark-submit --master spark://head:7077 \\
        jobs/spark_job.py conf/spark.yaml output.mode=resume

PYSPARK_PYTHON is what makes the venv's spark-submit work without activating the venv: pip's
`spark-submit` finds SPARK_HOME by running `$PYSPARK_PYTHON` (else `python3`, which has no
pyspark: "/bin/spark-class: No such file or directory"), the driver runs this file with it, and
so do the executors, each in a folder of its own: hence an absolute path (a relative one is right
only for a venv shipped with `--archives`, e.g. `./environment/bin/python`). Shipping the
environment to a cluster's executors: docs/clusters.md.

The master and resources come from spark-submit (the session it creates is reused); `engine.kind`
is forced to `spark`. Exit codes are those of `vb-batch run`, and spark-submit exits with the
driver's: 0 success, 1 the job failed, 2 the config is invalid (the message names the field),
3 the output's lease is held by another writer.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vb_batch.cli import main as cli_main

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    config, *overrides = args
    return cli_main(["run", config, "engine.kind=spark", *overrides])


if __name__ == "__main__":
    sys.exit(main())
