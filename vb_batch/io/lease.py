"""One writer per output: a lease object under `<output>/_vb/lease.json`.

A run takes the lease before it changes anything in its output and keeps it
alive with a heartbeat thread; a second run on the same output fails fast
with a `LeaseHeldError` naming the holder (run id, host, pid, last heartbeat).
A lease whose holder is gone is taken over with a warning: on the same host
when its process no longer exists (so a `kill -9` and an immediate resume
just work), anywhere once its heartbeat is older than `output.lease_seconds`.

Every change of the lease object is a compare-and-swap, so two runs that
race for a free or stale lease cannot both win:

* local files: an exclusive `link()` of a fully written temporary file
  creates the lease; renewals and takeovers happen under an advisory
  `flock` on `_vb/lease.lock` and replace the file atomically (`rename`);
* S3: conditional requests, `PUT If-None-Match: *` to create and
  `PUT If-Match: <etag>` / `DELETE If-Match: <etag>` to renew, take over and
  release (S3 has supported conditional writes since 2024; moto's server
  implements them);
* other fsspec stores: the same steps without the atomicity (a warning says
  so); `memory://` is one process, where a lock makes them atomic.

Before each commit the sink calls `check()`, which reads the lease object: a
run that lost its lease (its heartbeat failed for longer than the lease lasts,
or another run took it over, even since the last heartbeat) stops with
`LeaseLostError` instead of writing into an output that is no longer its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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


class LeaseHeldError(RuntimeError):
    """Another run holds the output's lease (a job fault: exit 1, nothing was changed)."""


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

    def create(self, data):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfNoneMatch="*")["ETag"]
        except FileExistsError:
            return None

    def replace(self, data, tag):
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=data, IfMatch=tag)["ETag"]
        except (FileNotFoundError, OSError):  # 412: it changed; 404: it is gone
            return None

    def delete(self, tag):
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=tag)
            return True
        except (FileNotFoundError, OSError):
            return False


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


# ---------------------------------------------------------------------------- the lease


class Lease:
    """The writer lease of one output, held by one run (see the module docstring).

    >>> lease = Lease(fs, "/data/out/_vb", "/data/out", run_id="20261203T...", seconds=120)  # doctest: +SKIP
    >>> with lease:            # acquire, heartbeat, release
    ...     lease.check()      # before each commit
    """

    def __init__(self, fs, meta_dir: str, url: str, run_id: str, seconds: float, describe: str = ""):
        self.store = _store(fs, meta_dir, url)
        self.run_id = run_id
        self.seconds = seconds
        self.describe = describe or url
        self.token = uuid.uuid4().hex
        self._tag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _record(self, acquired: float | None = None) -> bytes:
        now = time.time()
        pid = os.getpid()
        return json.dumps({
            "token": self.token, "run_id": self.run_id, "host": socket.gethostname(), "pid": pid,
            "boot_id": _boot_id(), "pid_ns": _pid_namespace(), "process_start": _process_start(pid),
            "acquired": acquired or now,
            "heartbeat": now, "seconds": self.seconds,
        }).encode()

    # ---------------------------------------------------------------- acquire / release
    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeldError` naming a live holder."""
        for _ in range(5):  # lost races re-read the lease; five in a row means a live contender
            self._tag = self.store.create(self._record())
            if self._tag is not None:
                break
            current = self.store.read()
            if current is None:
                continue  # released in between: try to create it again
            data, tag = current
            holder = _parse(data)
            why = self._stale(holder)
            if why is None:
                raise LeaseHeldError(self._held_message(holder))
            self._tag = self.store.replace(self._record(), tag)
            if self._tag is not None:
                log.warning("%s: taking over the writer lease of run %s (%s)", self.describe,
                            holder.get("run_id", "?"), why)
                break
        else:
            raise LeaseHeldError(f"{self.describe}: another run keeps taking the writer lease; try again later")
        self._thread = threading.Thread(target=self._heartbeat, name="vb-lease", daemon=True)
        self._thread.start()

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder's lease may be taken over, or None when it is alive."""
        if not holder:
            # Creates write whole records, so an unreadable one was damaged (or written by something else).
            return "its record is unreadable"
        alive = holder_alive(holder)
        if alive is False:
            return f"its process {holder.get('pid')} on this host has exited"
        age = time.time() - float(holder.get("heartbeat") or 0)
        limit = float(holder.get("seconds") or self.seconds)
        if alive is None and age > limit:
            return f"no heartbeat for {age:.0f} s (lease {limit:.0f} s)"
        return None

    def _held_message(self, holder: dict[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat") or 0)
        return (
            f"{self.describe} is being written by run {holder.get('run_id', '?')} "
            f"(host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, last heartbeat {age:.0f} s ago); "
            f"one writer per output: wait for it to finish, or, if that run is dead on another host, "
            f"re-run after its lease expires ({float(holder.get('seconds') or self.seconds):.0f} s)"
        )

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
        last_ok = acquired
        while not self._stop.wait(interval):
            with self._lock:
                if self._lost is not None or self._tag is None:
                    return
                try:
                    tag = self.store.replace(self._record(acquired), self._tag)
                except Exception as exc:  # noqa: BLE001 - a storage hiccup: retried on the next beat
                    log.warning("%s: lease heartbeat failed: %s", self.describe, exc)
                    if time.time() - last_ok > self.seconds:
                        self._lost = f"no heartbeat could be written for {time.time() - last_ok:.0f} s"
                    continue
                if tag is None:
                    self._lost = "another run took the writer lease over"
                    log.error("%s: %s; this run stops writing", self.describe, self._lost)
                    return
                self._tag, last_ok = tag, time.time()

    def check(self) -> None:
        """Raise `LeaseLostError` when this run no longer holds the lease (call before every commit).

        The lease object itself is read: a takeover between two heartbeats (another host judged this
        run dead while it was paused or cut off) stops the next commit, not only the next heartbeat.
        """
        if self._lost is None and self._tag is not None:
            current = self.store.read()
            if current is None or _parse(current[0]).get("token") != self.token:
                holder = _parse(current[0]) if current is not None else {}
                self._lost = (f"run {holder.get('run_id', '?')} (host {holder.get('host', '?')}) took the writer lease "
                              "over" if holder else "the writer lease was removed")
        if self._lost is not None:
            raise LeaseLostError(f"{self.describe}: {self._lost}; committed rows are kept, re-run with output.mode=resume")
        if self._tag is None:
            raise LeaseLostError(f"{self.describe}: this run does not hold the writer lease")


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) and holder.get("token") else {}
