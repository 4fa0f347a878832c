"""One writer per output: a lease object under `<output>/_vb/lease.json`.

A run takes the lease before it changes anything in its output and keeps it
alive with a heartbeat thread that rewrites the record every
`output.lease_seconds / 3`; each rewrite bumps a counter (`beat`), so the
record's bytes (its ETag on S3) change on every heartbeat. A second run on the
same output fails with a `LeaseHeldError` naming the holder (run id, host, pid,
last heartbeat).

When a contender may take the lease over, without comparing clocks of two hosts:

* the holder's process is gone on this host (same host name, boot and pid
  namespace; the pid is free or reused): at once, so a `kill -9` and an
  immediate resume just work;
* otherwise only after the contender has itself watched the record stay
  byte-identical for the lease's duration on its own monotonic clock (the
  larger of its own `lease_seconds` and the holder's). A live holder rewrites
  it within a third of that, which makes the contender give up with
  `LeaseHeldError`; a dead, hung (same host: alive but silent) or
  unknown holder does not, and is taken over with a warning. The holder's
  timestamps only ever make a contender give up sooner (a heartbeat that looks
  recent by this host's clock is refused at once), never take over: a holder
  whose clock runs behind is watched, not taken over, and one whose clock runs
  ahead is refused for at most the skew plus the lease.
* a record that is not a lease (damaged, crafted, fields of the wrong type,
  NaN or infinite numbers) is an unknown holder on the same rule; the warning
  says what was found and how to clear it. A `lease.json` that is a folder
  cannot be replaced: the run is refused with the command that clears it.

Waiting happens only when a record exists that no live run renews: a run that
finds no lease, or one released cleanly, starts at once.

The module is longer than most (~550 lines) because the three stores'
compare-and-swap and the rule built on it are one contract, read together.

Every change of the lease object is a compare-and-swap, so two runs that
race for a free or stale lease cannot both win:

* local files: an exclusive `link()` of a fully written temporary file
  creates the lease; renewals and takeovers happen under an advisory
  `flock` on `_vb/lease.lock` and replace the file atomically (`rename`);
* S3: conditional requests, `PUT If-None-Match: *` to create and
  `PUT If-Match: <etag>` / `DELETE If-Match: <etag>` to renew, take over and
  release. A failed condition (412 PreconditionFailed, which s3fs raises as
  `OSError(EINVAL)`, or 409 ConditionalRequestConflict on a race) is the
  lease's own outcome ("it changed"), never a crash;
* other fsspec stores: the same steps without the atomicity (a warning says
  so); `memory://` is one process, where a lock makes them atomic.

Before each commit the sink calls `check()`, which reads the lease object: a
run that lost its lease (its heartbeat failed for longer than the lease lasts,
or another run took it over, even since the last heartbeat) stops with
`LeaseLostError` instead of writing into an output that is no longer its own.
A check is not a fence: a holder paused between its check and its commit would
still commit. The fence lives in the output's log (`vb_batch.io.sinks.base`,
"Fencing"); `taken_over_from` tells the sink that a run it replaced may be such
a paused holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

from vb_batch.io.filesystems import split_scheme

log = logging.getLogger(__name__)

LEASE_NAME = "lease.json"
# A holder's lease beyond a day is not believed: a crafted `seconds` must not make contenders watch forever.
LONGEST_WATCH_S = 86400.0


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease (a job fault: exit 3, nothing was changed)."""


class LeaseLostError(RuntimeError):
    """This run's lease expired or was taken over; it must stop writing."""
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace (Linux): containers sharing a host name and boot see different pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_alive(holder: dict[str, Any]) -> bool | None:
    """Whether the holder's process still runs: True/False on this host, None when it is elsewhere."""
    if holder.get("host") != socket.gethostname() or holder.get("boot_id") != _boot_id():
        return None
    # A holder in another container (host networking shares the host name) has pids this process cannot
    # see: its pid says nothing here, only its heartbeat does. Records without it predate the field.
    if holder.get("pid_ns", _pid_namespace()) != _pid_namespace():
        return None
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("process_start")
    return not started or _process_start(pid) == started


# ---------------------------------------------------------------------------- stores: compare-and-swap on one object


def write_temp_file(path: str, data: bytes) -> str:
    """`data` in a new temporary file next to local `path`, flushed to disk; its name (removed on failure).

    The first half of every atomic local write: the caller then renames or links it into place.
    """
    temp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        # A full disk fails every write: without this, each would leave a partial file behind.
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    return temp


class _Store:
    """Atomic operations on one small object; `tag` identifies the version read (content hash or ETag)."""

    def read(self) -> tuple[bytes, str] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> str | None:
        """Create the object if absent; its tag, or None when it exists."""
        raise NotImplementedError

    def replace(self, data: bytes, tag: str) -> str | None:
        """Replace the object if it is still at `tag`; the new tag, or None when it changed."""
        raise NotImplementedError

    def delete(self, tag: str) -> bool:
        raise NotImplementedError


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalStore(_Store):
    def __init__(self, path: str):
        self.path = path
        self.lock_path = posixpath.join(posixpath.dirname(path), "lease.lock")

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write_temp(self, data: bytes) -> str:
        return write_temp_file(self.path, data)

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data):
        os.makedirs(posixpath.dirname(self.path), exist_ok=True)
        temp = self._write_temp(data)
        try:
            os.link(temp, self.path)  # fails if the lease exists: an atomic, fully written create
        except FileExistsError:
            return None
        finally:
            os.unlink(temp)
        return _digest(data)

    def replace(self, data, tag):
        with self._locked():
            current = self.read()
            if current is None or current[1] != tag:
                return None
            os.replace(self._write_temp(data), self.path)
        return _digest(data)

    def delete(self, tag):
        with self._locked():
            current = self.read()
            if current is None or current[1] != tag:
                return False
            os.unlink(self.path)
        return True


def _precondition_failed(exc: OSError) -> bool:
    """Whether an S3 error is a failed condition: 412 PreconditionFailed or 409 ConditionalRequestConflict.

    s3fs raises 412 as `OSError(EINVAL)` (or `FileExistsError` for `If-None-Match`) and 409 as an
    `OSError` too; the botocore error it wraps says which it was.
    """
    if isinstance(exc, FileExistsError):
        return True
    response = getattr(exc.__cause__, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or status in (409, 412)


class _S3Store(_Store):
    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self):
        async def get():
            response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with response["Body"] as body:
                return await body.read(), response["ETag"]

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition) -> str | None:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except FileNotFoundError:  # If-Match on a key that is gone
            return None
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise  # a storage fault, not an answer: the heartbeat retries it, acquire fails with it

    def create(self, data):
        return self._put(data, IfNoneMatch="*")

    def replace(self, data, tag):
        return self._put(data, IfMatch=tag)

    def delete(self, tag):
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise


_PROCESS_LOCK = threading.Lock()


class _GenericStore(_Store):
    """Any other fsspec store: the same steps, atomic only within this process."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self):
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def create(self, data):
        with _PROCESS_LOCK:
            if self.fs.exists(self.path):
                return None
            self.fs.pipe_file(self.path, data)
        return _digest(data)

    def replace(self, data, tag):
        with _PROCESS_LOCK:
            current = self.read()
            if current is None or current[1] != tag:
                return None
            self.fs.pipe_file(self.path, data)
        return _digest(data)

    def delete(self, tag):
        with _PROCESS_LOCK:
            current = self.read()
            if current is None or current[1] != tag:
                return False
            self.fs.rm_file(self.path)
        return True


def _store(fs, meta_dir: str, url: str) -> _Store:
    path = posixpath.join(meta_dir, LEASE_NAME)
    scheme = split_scheme(url)[0]
    if scheme in ("file", "local"):
        return _LocalStore(path)
    if scheme in ("s3", "s3a"):
        return _S3Store(fs, path)
    if scheme != "memory":
        log.warning("output on %s://: the one-writer lease is not atomic on this store", scheme)
    fs.makedirs(meta_dir, exist_ok=True)
    return _GenericStore(fs, path)


# ---------------------------------------------------------------------------- reading a record


def _number(value: Any) -> float | None:
    """A finite real number from a JSON value, else None (text, booleans, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def parse_record(data: bytes) -> tuple[dict[str, Any], str | None]:
    """A lease record and, when it is not one this module could have written, what is wrong with it.

    The problem names types and fields, never the record's text: a crafted record's bytes are
    not echoed into logs.
    """
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}, f"it is unreadable: not JSON ({len(data)} bytes)"
    if not isinstance(holder, dict):
        return {}, f"it holds a JSON {type(holder).__name__}, not an object"
    if not isinstance(holder.get("token"), str) or not holder["token"]:
        return {}, "it has no token"
    heartbeat, seconds, pid = (holder.get(k) for k in ("heartbeat", "seconds", "pid"))
    if _number(heartbeat) is None:
        return holder, f"its heartbeat is {_kind(heartbeat)}, not a finite number"
    if _number(seconds) is None or not 0 < seconds <= LONGEST_WATCH_S:
        return holder, f"its lease length is {_kind(seconds)}, not a number of seconds in (0, {LONGEST_WATCH_S:.0f}]"
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**22:
        return holder, f"its pid is {_kind(pid)}, not a process id"
    if not all(isinstance(holder.get(k, ""), str) for k in ("host", "run_id", "boot_id", "pid_ns", "process_start")):
        return holder, "its host, run id or process fields are not text"
    return holder, None


def _kind(value: Any) -> str:
    """A JSON value described without its text: numbers as themselves, anything else by its type."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return "missing" if value is None else f"a JSON {type(value).__name__}"


# ---------------------------------------------------------------------------- the lease


class Lease:
    """The writer lease of one output, held by one run (see the module docstring).

    >>> lease = Lease(fs, "/data/out/_vb", "/data/out", run_id="20261203T...", seconds=120)  # doctest: +SKIP
    >>> with lease:            # acquire (at once, or after watching a silent holder), heartbeat, release
    ...     lease.check()      # before each commit
    """

    def __init__(self, fs, meta_dir: str, url: str, run_id: str, seconds: float, describe: str = "",
                 store: _Store | None = None):
        # `store`: the record kept elsewhere than `<meta_dir>/lease.json` (an Iceberg table's property,
        # `vb_batch.io.sinks.iceberg`): any object with `_Store`'s four methods and a `path` for messages.
        self.store = store if store is not None else _store(fs, meta_dir, url)
        self.path = store.path if store is not None else posixpath.join(meta_dir, LEASE_NAME)
        self.run_id = run_id
        self.seconds = seconds
        self.describe = describe or url
        self.token = uuid.uuid4().hex
        self._beat = 0
        self._tag: str | None = None
        self._lost: str | None = None
        # The run whose lease this one took over (None: the lease was free). The sink fences that run
        # out of the output's log before it recovers anything (`vb_batch.io.sinks.base`).
        self.taken_over_from: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _record(self, acquired: float | None = None) -> bytes:
        now = time.time()
        pid = os.getpid()
        self._beat += 1  # the record's bytes change on every heartbeat, whatever the clock says
        return json.dumps({
            "token": self.token, "run_id": self.run_id, "host": socket.gethostname(), "pid": pid,
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "process_start": _process_start(pid),
            "acquired": acquired or now, "heartbeat": now, "beat": self._beat, "seconds": self.seconds,
        }).encode()

    # ---------------------------------------------------------------- acquire / release
    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeldError` naming a live holder (see the module docstring)."""
        watched: tuple[str, float] | None = None  # (tag, monotonic time first seen) of a silent record
        races = 0
        while True:
            self._tag = self.store.create(self._record())
            if self._tag is not None:
                break
            current = self._read_existing()
            if current is None:  # released in between: create it again
                races += 1
                if races > 5:
                    raise LeaseHeldError(f"{self.describe}: another run keeps taking the writer lease; try again later")
                continue
            data, tag = current
            holder, problem = parse_record(data)
            if problem is None and holder_alive(holder) is False:
                if self._take_over(tag, holder, f"its process {holder['pid']} on this host has exited"):
                    break
                continue
            if problem is None and 0 <= time.time() - holder["heartbeat"] <= holder["seconds"]:
                raise LeaseHeldError(self._held_message(holder, problem))  # looks alive: give up at once
            wait = max(self.seconds, holder["seconds"] if problem is None else 0.0)
            if watched is None:
                watched = (tag, time.monotonic())
                log.warning("%s: %s; watching it for %.0f s: a live run rewrites it within %.0f s, otherwise it "
                            "is taken over (if no run writes this output, delete %s to clear it now)", self.describe,
                            self._holder_text(holder, problem), wait, wait / 3, self.path)
            elif watched[0] != tag:
                raise LeaseHeldError(self._held_message(holder, problem) + "; its record changed while watched")
            elif time.monotonic() - watched[1] >= wait:
                unchanged = f"its record did not change for {wait:.0f} s, as watched from this host"
                if self._take_over(tag, holder, f"{problem}; {unchanged}" if problem else unchanged):
                    break
                watched = None
                continue
            time.sleep(min(1.0, max(0.05, wait / 40)))
        self._thread = threading.Thread(target=self._heartbeat, name="vb-lease", daemon=True)
        self._thread.start()

    def _read_existing(self) -> tuple[bytes, str] | None:
        try:
            return self.store.read()
        except IsADirectoryError:
            raise LeaseHeldError(
                f"{self.describe}: {self.path} is a folder, not a lease record, so no run can hold or take this "
                f"output's writer lease; if no run writes this output, remove it (rm -r {self.path})") from None

    def _take_over(self, tag: str, holder: dict[str, Any], why: str) -> bool:
        self._tag = self.store.replace(self._record(), tag)
        if self._tag is not None:
            self.taken_over_from = holder.get("run_id", "?") if isinstance(holder.get("run_id"), str) else "?"
            log.warning("%s: taking over the writer lease of run %s (%s)", self.describe, self.taken_over_from, why)
        return self._tag is not None

    def _holder_text(self, holder: dict[str, Any], problem: str | None) -> str:
        if problem is not None:
            return f"{self.path} names an unknown holder: {problem}"
        return (f"the writer lease of run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, "
                f"pid {holder['pid']}) looks stale or skewed by this host's clock")

    def _held_message(self, holder: dict[str, Any], problem: str | None) -> str:
        if problem is not None:
            who = f"an unknown run ({problem})"
        else:
            age = time.time() - holder["heartbeat"]
            who = (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}, pid {holder['pid']}, "
                   f"last heartbeat {age:.0f} s ago by this host's clock)")
        return (f"{self.describe} is being written by {who}; one writer per output: wait for it to finish "
                f"(a run whose record stops changing for its lease, {self.seconds:.0f} s or more, is taken over)")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._tag is not None and self._lost is None:
                if not self.store.delete(self._tag):
                    log.warning("%s: the writer lease changed hands before this run released it", self.describe)
            self._tag = None

    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ---------------------------------------------------------------- while held
    def _heartbeat(self) -> None:
        interval = self.seconds / 3
        acquired = time.time()
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            with self._lock:
                if self._lost is not None or self._tag is None:
                    return
                try:
                    tag = self.store.replace(self._record(acquired), self._tag)
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: retried on the next beat
                    log.warning("%s: lease heartbeat failed: %s", self.describe, exc)
                    if time.monotonic() - last_ok > self.seconds:
                        self._lost = f"no heartbeat could be written for {time.monotonic() - last_ok:.0f} s"
                    continue
                if tag is None:
                    self._lost = "another run took the writer lease over"
                    log.error("%s: %s; this run stops writing", self.describe, self._lost)
                    return
                self._tag, last_ok = tag, time.monotonic()

    def check(self) -> None:
        """Raise `LeaseLostError` when this run no longer holds the lease (call before every commit).

        The lease object itself is read: a takeover between two heartbeats (another host judged this
        run dead while it was paused or cut off) stops the next commit, not only the next heartbeat.
        """
        if self._lost is None and self._tag is not None:
            try:
                current = self.store.read()
            except IsADirectoryError:
                current = (b"", "")
            holder = parse_record(current[0])[0] if current is not None else {}
            if holder.get("token") != self.token:
                self._lost = (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}) took the writer lease "
                              "over" if holder else "the writer lease was removed or replaced")
        if self._lost is not None:
            raise LeaseLostError(f"{self.describe}: lease lost: {self._lost}; this run commits nothing more (its "
                                 "committed rows are kept), re-run with output.mode=resume")
        if self._tag is None:
            raise LeaseLostError(f"{self.describe}: this run does not hold the writer lease")
