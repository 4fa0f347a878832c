#!/usr/bin/env bash
# A vb_batch job for cron: resume the job, log JSON lines, act on vb-batch's exit code.
#
#   # crontab -e: every night at 02:15, one JSON object a line appended to the log
#   15 2 * * * /srv/vb/jobs/cron_job.sh /srv/vb/conf/nightly.yaml >> /var/log/vb_batch.jsonl 2>&1
#
# Arguments are those of `vb-batch run` (a job YAML, then key.path=value overrides); the job runs
# with output.mode=resume, so each run labels only what the output does not hold yet. Exit codes
# (docs/operations.md):
#   0  success (failed rows within run.max_error_fraction)      -> exit 0
#   1  the job failed, or too many rows did                     -> exit 1 (cron mails the log tail, if set up)
#   2  the config is invalid                                     -> exit 2
#   3  another run holds the output's writer lease: try later   -> tried again after VB_RETRY_AFTER_S
#                                                                  (default 600), at most VB_RETRIES
#                                                                  times (default 3), then exit 3
#   4  a hosted model's quota is exhausted                       -> exit 4; the rows answered are
#                                                                  committed and tomorrow's run resumes
# Environment: VB_BATCH (default: vb-batch next to this script's venv, else on PATH), VB_RETRY_AFTER_S,
# VB_RETRIES. Every line it writes itself is a JSON object too, like vb-batch's.
set -u
if [ $# -lt 1 ]; then echo "usage: $0 JOB.yaml [key.path=value ...]" >&2; exit 2; fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${VB_BATCH:-}" ]; then
    if [ -x "$here/../.venv/bin/vb-batch" ]; then VB_BATCH="$here/../.venv/bin/vb-batch"; else VB_BATCH=vb-batch; fi
fi
retry_after="${VB_RETRY_AFTER_S:-600}"
retries="${VB_RETRIES:-3}"

say() {  # level, exit code, message (no quotes or backslashes in it)
    printf '{"time": "%s", "level": "%s", "logger": "cron_job", "event": "cron", "exit_code": %s, "message": "%s"}\n' \
        "$(date +%Y-%m-%dT%H:%M:%S%:z)" "$1" "$2" "$3"
}

attempt=0
while true; do
    "$VB_BATCH" run "$1" output.mode=resume "${@:2}" --log-format json  # your overrides win
    code=$?
    case "$code" in
        0) exit 0 ;;
        3)
            if [ "$attempt" -ge "$retries" ]; then
                say ERROR 3 "the output's writer lease is still held after $retries retries: the next scheduled run tries again"
                exit 3
            fi
            attempt=$((attempt + 1))
            say WARNING 3 "another run holds the output's writer lease: retry $attempt of $retries in $retry_after s"
            sleep "$retry_after"
            ;;
        4)
            say WARNING 4 "quota exhausted: the rows answered are committed; the next scheduled run resumes"
            exit 4
            ;;
        *)
            say ERROR "$code" "vb-batch run exited with $code: see the lines above"
            exit "$code"
            ;;
    esac
done
