"""What a command writes on stdout and stderr: text for people, or one JSON object a line for schedulers.

Text (the default): log lines `time LEVEL logger: message` on stderr, a progress bar
only when stderr is a terminal, the rendered summary on stdout.

JSON (`--log-format json`): every line on stdout and on stderr is one JSON object with at
least `time` (ISO 8601 with the UTC offset), `level`, `logger` and `message`:

    a log record    {"time", "level", "logger", "message"[, "exception"]}                     stderr
    progress        {"event": "progress", "run_id", "engine", "rows_done", "rows_total",
                     "rows_ok", "rows_failed", "rows_per_second", "elapsed_s"}                 stderr
                    every `--progress-every` seconds (default 10) while `run.progress` is on, and
                    once at the end; -q turns it off
    an estimate     {"event": "estimate", "estimate": {...}}: a hosted backend's requests and cost  stderr
    the summary     {"event": "summary", "run_id", "success", "exit_code", "rows_read", "rows_ok",
                     "rows_failed", "rows_skipped", "errors_by_code", "seconds", "wall_seconds",
                     "estimate", "output", ...}: `RunSummary.as_dict()` (its message as `detail`)  stdout
    a failure       {"event": "failure", "exit_code", "message"[, "exception" with -v]}          stderr

What does not come through Python's logging is made to, or caught:
- other libraries' progress bars are off (`TQDM_DISABLE`, `HF_HUB_DISABLE_PROGRESS_BARS`; the
  diffusers and transformers loading bars: `vb_batch.models.loading.quiet_loading`), in this
  process and in the workers it starts, which inherit its environment;
- Python warnings go through logging (`logging.captureWarnings`); the stream handlers other
  libraries give their own loggers (Ray's) get the JSON formatter;
- Spark's driver JVM logs through `log4j2-json.properties` (the same four keys), without the
  console progress bar (`spark_log_conf`, read by the Spark engine when it starts the session);
- anything else written to file descriptors 1 and 2, by C++ (Ray's core worker), by the JVM
  itself, by a handler that kept the old stream, or forwarded by Ray from its workers, is
  turned into one object a line by `JsonLines`: `"logger": "stdout"` or `"stderr"`, the
  level read from the line where it names one (then dropped below the chosen level like any
  log record), else INFO on stdout and WARNING on stderr.

The text mode changes nothing of the above but the progress bar: drawn only on a terminal,
never in a log file or under a scheduler.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

# The Spark driver's log4j2 configuration for JSON logs (see `spark_log_conf`).
LOG4J2_JSON = Path(__file__).resolve().parent / "log4j2-json.properties"

# Set for the command's duration with JSON logs: progress bars of other libraries, here and in workers.
QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@dataclass
class LogSettings:
    """How this process logs: set by `configure_logging` (the command line), read by runs and engines."""

    format: str = "text"  # "text" | "json"
    level: int = logging.WARNING
    progress_every_s: float = 10.0


SETTINGS = LogSettings()
_write_lock = threading.Lock()
_adopted: dict[logging.Handler, logging.Formatter | None] = {}  # other libraries' handlers -> their formatter


def json_logs() -> bool:
    """Whether every line this process writes must be a JSON object (`--log-format json`)."""
    return SETTINGS.format == "json"


def timestamp(seconds: float | None = None) -> str:
    """Local time in ISO 8601 with milliseconds and the UTC offset: 2026-12-07T11:45:35.624+00:00."""
    moment = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds).astimezone()
    return moment.isoformat(timespec="milliseconds")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (and the traceback, when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": timestamp(record.created), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class CurrentStderrHandler(logging.StreamHandler):
    """A handler that writes to `sys.stderr` as it is when a record comes, not as it was when it was made:
    one left on the root logger after `main` returned (tests, notebooks) never writes to a stream that a
    capture has closed since (a library logging from `__del__`, py4j's, hit that)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: int = 0, quiet: bool = False, log_format: str = "text",
                      progress_every_s: float | None = None) -> None:
    """Level from -v / -q (WARNING by default), lines as text with the level name, or as JSON objects."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    SETTINGS.format, SETTINGS.level = log_format, level
    if progress_every_s is not None:
        SETTINGS.progress_every_s = progress_every_s
    handler = CurrentStderrHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_vb_batch", False)]:
        root.removeHandler(old)
    handler._vb_batch = True  # ours to replace when main runs again in one process (tests, notebooks)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(log_format == "json")
    adopt_library_handlers()


def adopt_library_handlers() -> None:
    """Give the console handlers other libraries put on their own loggers (Ray's) the JSON formatter,
    or their own back in text mode. Called at configuration and again when a run starts (after
    `ray.init` or a model load has set theirs up)."""
    if not json_logs():
        for handler, formatter in _adopted.items():
            handler.setFormatter(formatter)
        _adopted.clear()
        return
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (type(handler) is logging.StreamHandler and id(handler.stream) in consoles
                    and not getattr(handler, "_vb_batch", False) and handler not in _adopted):
                _adopted[handler] = handler.formatter
                handler.setFormatter(JsonLogFormatter())


# ---------------------------------------------------------------------------- events


def emit(event: str, message: str, level: str = "INFO", stream: TextIO | None = None,
         logger: str = "vb_batch", **fields: Any) -> None:
    """Write one JSON object (an event, not a log record: never filtered by level) as one line."""
    entry = {"time": timestamp(), "level": level, "logger": logger, "message": message, "event": event, **fields}
    line = json.dumps(entry, default=str) + "\n"
    target = stream or sys.stderr
    with _write_lock:
        target.write(line)
        target.flush()


def summary_output(summary, exit_code: int) -> str:
    """What `vb-batch run` prints on stdout at the end: the rendered summary, or one JSON object."""
    if not json_logs():
        return summary.render()
    record = summary.as_dict()
    detail = record.pop("message", "")
    status = "finished" if summary.success else "FAILED"
    return json.dumps({
        "time": timestamp(), "level": "INFO" if summary.success else "ERROR", "logger": "vb_batch.summary",
        "message": f"vb-batch run {summary.run_id} {status} ({summary.engine} engine) in {summary.seconds:.1f} s: "
                   f"{summary.rows_ok} ok, {summary.rows_failed} failed, {summary.rows_skipped} skipped"
                   + (f"; {detail}" if detail else ""),
        "event": "summary", "exit_code": exit_code, "detail": detail, **record,
    }, default=str)


def print_failure(exit_code: int, message: str, exception: str | None = None) -> None:
    """The one line a failed command ends with, on stderr: `vb-batch: message`, or a JSON object."""
    if not json_logs():
        print(f"vb-batch: {message}", file=sys.stderr)
        return
    fields = {"exception": exception} if exception else {}
    emit("failure", message, level="ERROR", logger="vb_batch.cli", exit_code=exit_code, **fields)


def print_estimate(line: str, estimate: dict[str, Any]) -> None:
    """A hosted backend's requests and cost before the run: a line on stderr, or a JSON event."""
    if json_logs():
        emit("estimate", line, logger="vb_batch.engines.core", estimate=estimate)
    else:
        print(line, file=sys.stderr, flush=True)


class Progress:
    """A run's progress: a tqdm bar on a terminal, periodic JSON events with JSON logs, else nothing.

    Off with `run.progress: false` or -q. Events come every `SETTINGS.progress_every_s` seconds
    from a thread (so a scheduler sees the run alive while a slow model works) and once at the end.
    """

    def __init__(self, run_id: str, engine: str, total: int | None, enabled: bool = True):
        self.run_id, self.engine, self.total = run_id, engine, total or None
        self.done = self.ok = self.failed = 0
        self.started = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled or SETTINGS.level > logging.WARNING:
            self.mode = "off"
        elif json_logs():
            self.mode = "events"
            adopt_library_handlers()
            self._thread = threading.Thread(target=self._tick, name="vb-progress", daemon=True)
            self._thread.start()
        elif sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.mode = "bar"
            self._bar = tqdm(total=self.total, unit="img", desc="vb-batch", smoothing=0.1)
        else:
            self.mode = "off"

    def update(self, rows: int, ok: int, failed: int) -> None:
        """`rows` more rows are done (processed or skipped); `ok` and `failed`: the run's totals so far."""
        self.done += rows
        self.ok, self.failed = ok, failed
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix(ok=ok, failed=failed, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._event()

    def _tick(self) -> None:
        while not self._stop.wait(SETTINGS.progress_every_s):
            self._event()

    def _event(self) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        emit("progress", f"run {self.run_id}: {self.done}{of} rows ({self.ok} ok, {self.failed} failed), "
             f"{rate:.2f} rows/s", logger="vb_batch.progress", run_id=self.run_id, engine=self.engine,
             rows_done=self.done, rows_total=self.total, rows_ok=self.ok, rows_failed=self.failed,
             rows_per_second=round(rate, 3), elapsed_s=round(elapsed, 3))


# ---------------------------------------------------------------------------- engines


def spark_log_conf() -> dict[str, str]:
    """Spark settings for this process's logs, read by the Spark engine when it starts a session.

    No console progress bar unless stderr is a terminal and logs are text; with JSON logs the
    driver JVM logs through `log4j2-json.properties` at WARN (-q: ERROR, -vv: INFO). Under
    `spark-submit` the JVM is already running: give it
    `--driver-java-options "-Dlog4j2.configurationFile=<that file>"` yourself.
    """
    conf = {}
    if json_logs() or not sys.stderr.isatty():
        conf["spark.ui.showConsoleProgress"] = "false"
    if json_logs():
        level = "error" if SETTINGS.level >= logging.ERROR else "info" if SETTINGS.level <= logging.DEBUG else "warn"
        path = str(LOG4J2_JSON)
        path = f'"{path}"' if " " in path else path
        conf["spark.driver.extraJavaOptions"] = f"-Dlog4j2.configurationFile={path} -Dvb_batch.log_level={level}"
    return conf


# ---------------------------------------------------------------------------- the line guard

_LEVEL_NAMES = {"TRACE": "DEBUG", "DEBUG": "DEBUG", "INFO": "INFO", "WARN": "WARNING", "WARNING": "WARNING",
                "ERROR": "ERROR", "SEVERE": "ERROR", "CRITICAL": "CRITICAL", "FATAL": "CRITICAL",
                "D": "DEBUG", "I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_LEVEL_PATTERNS = (
    # Python logging's usual formats, Ray's: "2026-12-07 11:45:41,222\tWARNING file.py:85 -- ..."
    re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s+(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)\b"),
    # log4j's default layout: "26/12/07 11:46:47 WARN Utils: ..."
    re.compile(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d (?P<level>TRACE|DEBUG|INFO|WARN|ERROR|FATAL)\b"),
    # glog, Ray's C++ core: "[2026-12-07 11:45:43,845 E 7640 7640] core_worker.cc:2465: ..."
    re.compile(r"^\[[\d\- :,.]+ (?P<level>[DIWEF]) \d+ \d+\]"),
    # "WARNING: Using incubator modules" (the JVM), "ERROR: ...", "INFO - ..."
    re.compile(r"^(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|SEVERE|CRITICAL|FATAL)\b[:\s]"),
)
# What Ray puts before a line its workers wrote: "(MapWorker(...) pid=123, ip=10.0.0.5) ".
_RAY_WORKER_PREFIX = re.compile(r"^\(.*?\bpid=\d+[^)]*\)\s*")


def line_level(line: str) -> str | None:
    """The level a foreign log line names (Python logging, Ray, log4j, glog), or None."""
    text = _RAY_WORKER_PREFIX.sub("", line, count=1)
    for pattern in _LEVEL_PATTERNS:
        match = pattern.match(text)
        if match:
            return _LEVEL_NAMES[match.group("level")]
    return None


def json_line(line: str, stream: str, level: int = logging.NOTSET) -> str | None:
    """`line` as one JSON object: unchanged when it is one, else wrapped; None to drop it (blank,
    or naming a level below `level`)."""
    line = line.rstrip("\r\n")
    if "\r" in line:  # a terminal would show the last rewrite only (progress bars)
        line = next((part for part in reversed(line.split("\r")) if part.strip()), "")
    if not line.strip():
        return None
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            if isinstance(json.loads(line), dict):
                return line
    named = line_level(line)
    if named is not None and logging.getLevelName(named) < level:
        return None
    shown = named or ("INFO" if stream == "stdout" else "WARNING")
    return json.dumps({"time": timestamp(), "level": shown, "logger": stream, "message": line})


class JsonLines:
    """Make every line written to file descriptors 1 and 2 one JSON object (see the module docstring).

    Each descriptor is pointed at a pipe that a thread reads: a line that is a JSON object
    passes unchanged, any other becomes one (`json_line`). Child processes inherit the pipes,
    so a JVM's or a C++ library's lines are caught too. On exit the descriptors are restored and
    what is still in the pipes is written out.

    >>> with JsonLines(logging.WARNING):   # doctest: +SKIP
    ...     os.system("echo plain text")   # -> {"time": ..., "level": "INFO", "logger": "stdout", "message": "plain text"}
    """

    MAX_LINE = 1 << 20  # a longer line without a newline is written out as it stands

    def __init__(self, level: int = logging.NOTSET, fds: tuple[int, ...] = (1, 2)):
        self.level = level
        self.fds = fds
        self._stop = threading.Event()
        self._pumps: list[tuple[threading.Thread, int, int, int]] = []  # (thread, fd, pipe read end, saved fd)

    def __enter__(self) -> JsonLines:
        _flush_std()
        for fd in self.fds:
            saved = os.dup(fd)
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            name = "stdout" if fd == 1 else "stderr" if fd == 2 else f"fd{fd}"
            thread = threading.Thread(target=self._pump, args=(read, saved, name), name=f"vb-json-{name}", daemon=True)
            thread.start()
            self._pumps.append((thread, fd, read, saved))
        return self

    def __exit__(self, *exc) -> None:
        _flush_std()
        for _, fd, _, saved in self._pumps:
            os.dup2(saved, fd)  # our write end is gone; a child process may still hold its copy
        self._stop.set()
        for thread, _, read, saved in self._pumps:
            thread.join(timeout=5)
            os.close(read)
            os.close(saved)
        self._pumps = []

    def _pump(self, read: int, out: int, stream: str) -> None:
        pending = b""
        broken = False  # the reader of `out` went away: keep draining so that writers never block
        while True:
            ready, _, _ = select.select([read], [], [], 0.1)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            try:
                data = os.read(read, 1 << 16)
            except OSError:
                break
            if not data:
                break
            pending += data
            lines = pending.split(b"\n")
            pending = lines.pop()
            if len(pending) > self.MAX_LINE:
                lines.append(pending)
                pending = b""
            broken = self._write(out, lines, stream, broken)
        if pending:
            self._write(out, [pending], stream, broken)

    def _write(self, out: int, lines: list[bytes], stream: str, broken: bool) -> bool:
        if broken or not lines:
            return broken
        shown = []
        for raw in lines:
            try:
                line = json_line(raw.decode("utf-8", "replace"), stream, self.level)
            except Exception:  # noqa: BLE001 - never lose a line, never stop draining the pipe
                line = json.dumps({"time": timestamp(), "level": "WARNING", "logger": stream,
                                   "message": raw.decode("utf-8", "replace")})
            if line is not None:
                shown.append(line + "\n")
        data = "".join(shown).encode()
        try:
            while data:
                data = data[os.write(out, data):]
        except OSError:
            return True
        return False


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


@contextlib.contextmanager
def json_output() -> Iterator[None]:
    """For a command with JSON logs: other libraries' bars off (`QUIET_ENV`) and every line on
    stdout and stderr one JSON object (`JsonLines`); both undone on the way out."""
    saved = {key: os.environ.get(key) for key in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    try:
        with JsonLines(SETTINGS.level):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
