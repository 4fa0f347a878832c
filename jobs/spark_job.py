"""Entry point for `spark-submit`: run a vb_batch job config on the Spark engine.

    spark-submit --master spark://head:7077 jobs/spark_job.py conf/spark.yaml output.mode=resume

The master and resources come from spark-submit (the session it creates is
reused); `engine.kind` is forced to `spark`. Exit codes as `vb-batch run`.
"""

import sys

from vb_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:2], "engine.kind=spark", *sys.argv[2:]]))
