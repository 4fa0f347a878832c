"""Entrypoint for `ray job submit`: run one vb_batch job on the Ray cluster the job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/ray_job.py conf/ray-s3.yaml output.mode=resume model.batch_size=32

Arguments are those of `vb-batch run`: a config file, then key.path=value
overrides. `engine.kind` is set to `ray` (an override can still change it), and
Ray joins the submitting cluster (it sets RAY_ADDRESS for a submitted job;
`engine.address: auto` works too). The job's summary goes to stdout, where
`ray job logs` shows it. Exit codes are those of `vb-batch run`: 0 success,
1 the job failed, 2 the config is invalid (the message names the field), 3 the
output's lease is held; `ray job submit` itself exits 1 for any failure and
prints the code (`failed with exit code 2`).

The Jobs API needs `ray[default]` on the head (the `ray` extra installs it);
`python` is found on the PATH the head's `ray start` ran with; the working_dir
ships this folder to the driver and every worker. Shipping the environment,
token authentication: docs/clusters.md.
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
    return cli_main(["run", config, "engine.kind=ray", *overrides])


if __name__ == "__main__":
    sys.exit(main())
