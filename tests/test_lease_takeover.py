"""The writer lease without cross-host clocks (issue 31): what a contender takes over, and when.

1. no lease, or one released cleanly: a run starts at once, whatever `lease_seconds` is;
2. a live holder whose clock runs far behind (or ahead) is never taken over: its record changes
   while the contender watches it (every trial);
3. a dead holder on another host is taken over only after the contender watched its record
   unchanged for the lease, on its own monotonic clock; a hung holder on this host (alive,
   stopped) is taken over by the same rule;
4. crafted `lease.json` records: each is taken over safely or refused with a message that says how
   to clear it; none crashes, none wedges the output;
5. S3: failed conditions (412, and 409 on races, as real servers answer them) are the lease's
   own outcomes, not errors; the same rule holds on SeaweedFS and on moto.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from vb_batch.io.lease import Lease, LeaseHeldError, _boot_id, _pid_namespace, _precondition_failed, _process_start

LEASE_S = 0.6  # short leases keep the watching short; the rule is the same at 120 s


def local_lease(out: Path, seconds: float = LEASE_S, run_id: str = "contender") -> Lease:
    return Lease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id=run_id, seconds=seconds)


def write_record(out: Path, record) -> Path:
    path = out / "_vb" / "lease.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
    return path


def other_host_record(heartbeat_age: float, seconds: float = LEASE_S, **fields) -> dict:
    return {"token": uuid.uuid4().hex, "run_id": "20260101T000000Z-otherrun", "host": "other-host.example",
            "pid": 4242, "boot_id": "another-boot", "pid_ns": "", "process_start": "1",
            "acquired": time.time() - heartbeat_age - 5, "heartbeat": time.time() - heartbeat_age, "seconds": seconds,
            **fields}


class SkewedLease(Lease):
    """A live holder on another host whose wall clock is `skew` seconds off this one's."""

    def __init__(self, *args, skew: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.skew = skew

    def _record(self, acquired=None):
        record = json.loads(super()._record(acquired))
        record.update(host="other-host.example", boot_id="another-boot", heartbeat=record["heartbeat"] + self.skew)
        return json.dumps(record).encode()


# ---------------------------------------------------------------------------- 1. no waiting without a reason


def test_a_free_or_cleanly_released_lease_is_taken_at_once(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):  # the second run finds the first one's lease released
        lease = local_lease(out, seconds=120)
        started = time.monotonic()
        with lease:
            assert time.monotonic() - started < 1
            assert json.loads((out / "_vb" / "lease.json").read_bytes())["token"] == lease.token
        assert not (out / "_vb" / "lease.json").exists()


def test_every_heartbeat_changes_the_record(tmp_path):
    out = tmp_path / "out"
    with local_lease(out, seconds=0.3):
        first = (out / "_vb" / "lease.json").read_bytes()
        time.sleep(0.25)
        second = (out / "_vb" / "lease.json").read_bytes()
    assert first != second and json.loads(second)["beat"] > json.loads(first)["beat"]


# ---------------------------------------------------------------------------- 2. clock skew


@pytest.mark.parametrize("skew", [-203.0, -86400.0, 3600.0])
def test_a_live_holder_with_a_skewed_clock_is_never_taken_over(skew, tmp_path, caplog):
    out = tmp_path / "out"
    holder = SkewedLease(fsspec.filesystem("file"), str(out / "_vb"), str(out), run_id="the-holder", seconds=LEASE_S,
                         skew=skew)
    with holder:
        for _ in range(5):  # the 5 of 5 trials, now all refused
            started = time.monotonic()
            with pytest.raises(LeaseHeldError, match="the-holder.*changed while watched"):
                local_lease(out).acquire()
            assert time.monotonic() - started < LEASE_S  # refused within one heartbeat, not after the lease
        holder.check()  # still its own
    assert "taking over" not in caplog.text


# ---------------------------------------------------------------------------- 3. dead and hung holders


def test_a_dead_holder_elsewhere_is_taken_over_after_watching_not_by_its_timestamp(tmp_path, caplog):
    out = tmp_path / "out"
    write_record(out, other_host_record(heartbeat_age=3600))  # an hour old by this host's clock
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vb_batch"), local_lease(out) as lease:
        waited = time.monotonic() - started
        lease.check()
    assert LEASE_S <= waited < LEASE_S + 2
    assert f"did not change for {LEASE_S:.0f} s, as watched from this host" in caplog.text
    assert "taking over the writer lease of run 20260101T000000Z-otherrun" in caplog.text


@pytest.mark.slow  # ~1.5 s: watches the lease out
def test_the_longer_of_the_two_leases_is_watched(tmp_path):
    out = tmp_path / "out"
    write_record(out, other_host_record(heartbeat_age=3600, seconds=1.5))  # the holder renews every 0.5 s
    started = time.monotonic()
    with local_lease(out, seconds=0.2):
        assert time.monotonic() - started >= 1.5


HUNG_HOLDER = textwrap.dedent("""
    import fsspec, os, signal, sys, time
    from vb_batch.io.lease import Lease
    out = sys.argv[1]
    Lease(fsspec.filesystem("file"), out + "/_vb", out, run_id="the-hung-run", seconds=float(sys.argv[2])).acquire()
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # hung: alive, its heartbeat thread stopped with it
    time.sleep(60)
""")


@pytest.mark.slow  # ~2 s: watches the lease out
def test_a_hung_holder_on_this_host_is_taken_over_by_the_same_rule(tmp_path, caplog):
    out = tmp_path / "out"
    hung = subprocess.Popen([sys.executable, "-c", HUNG_HOLDER, str(out), str(LEASE_S)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert hung.stdout.readline().strip() == "held"
        time.sleep(LEASE_S * 1.5)  # its heartbeat is now older than its lease, by the same clock
        os.kill(hung.pid, 0)  # alive
        with caplog.at_level(logging.WARNING, logger="vb_batch"), local_lease(out) as lease:
            lease.check()
        assert "taking over the writer lease of run the-hung-run" in caplog.text
    finally:
        hung.kill()
        hung.wait(timeout=30)


def test_a_holder_whose_process_exited_here_is_taken_over_at_once(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(out, other_host_record(heartbeat_age=1, seconds=120, host=socket.gethostname(), boot_id=_boot_id(),
                                        pid_ns=_pid_namespace(), pid=dead.pid))
    started = time.monotonic()
    with local_lease(out, seconds=120):
        assert time.monotonic() - started < 1


# ---------------------------------------------------------------------------- 4. crafted records


def here(**fields) -> dict:
    return other_host_record(heartbeat_age=1, host=socket.gethostname(), boot_id=_boot_id(), pid_ns=_pid_namespace(),
                             **fields)


CRAFTED = {
    "empty": b"",
    "not json": b"\x00\xffroot:x:0:0",
    "a json list": b"[1, 2]",
    "no token": {"run_id": "x", "heartbeat": 1.0},
    "heartbeat as text": other_host_record(0, heartbeat="yesterday"),
    "pid as text": other_host_record(0, pid="4242"),
    "nan heartbeat": other_host_record(0, heartbeat=float("nan")),
    "future heartbeat": other_host_record(-86400 * 365),
    "infinite seconds": other_host_record(0, seconds=float("inf")),
    "same-host pid 1, not renewed": here(pid=1, process_start=_process_start(1)),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_record_is_taken_over_after_the_watch_and_says_how_to_clear_it(case, tmp_path, caplog):
    out = tmp_path / "out"
    path = write_record(out, CRAFTED[case])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vb_batch"), local_lease(out) as lease:
        lease.check()
    assert time.monotonic() - started >= LEASE_S * 0.9  # watched, never taken at once
    assert "taking over the writer lease" in caplog.text
    assert f"delete {path} to clear it now" in caplog.text
    assert "root:x" not in caplog.text and "yesterday" not in caplog.text  # found, described, never echoed
    assert not path.exists()  # released


def test_a_lease_folder_is_refused_with_the_command_that_clears_it(tmp_path):
    out = tmp_path / "out"
    (out / "_vb" / "lease.json").mkdir(parents=True)
    with pytest.raises(LeaseHeldError, match=r"is a folder, not a lease record.*rm -r .*lease.json"):
        local_lease(out).acquire()
    (out / "_vb" / "lease.json").rmdir()  # what the message says
    with local_lease(out):
        pass


# ---------------------------------------------------------------------------- 5. S3


def client_error(code: str, status: int) -> OSError:
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(ClientError({"Error": {"Code": code, "Message": "m"},
                                             "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"))


def test_failed_conditions_as_real_servers_answer_them_are_outcomes():
    precondition = client_error("PreconditionFailed", 412)  # no Condition field: SeaweedFS, AWS on If-Match
    assert type(precondition) is OSError and precondition.errno == errno.EINVAL
    assert _precondition_failed(precondition)
    assert _precondition_failed(client_error("ConditionalRequestConflict", 409))
    assert not _precondition_failed(client_error("AccessDenied", 403))
    assert not _precondition_failed(OSError(errno.EIO, "connection reset"))


@pytest.fixture(params=["seaweedfs", "moto"])
def any_s3(request):
    """A real S3 server (SeaweedFS, conftest's `s3`) and moto: the lease's conditions behave alike on both."""
    return request.getfixturevalue("s3" if request.param == "seaweedfs" else "moto_s3")


def s3_lease(s3, seconds: float = LEASE_S, run_id: str = "contender") -> Lease:
    from vb_batch.config import StorageOptions
    from vb_batch.io.filesystems import fsspec_filesystem

    url = s3.url("out")
    fs, path = fsspec_filesystem(url, StorageOptions(**s3.storage))
    return Lease(fs, f"{path}/_vb", url, run_id=run_id, seconds=seconds)


def test_on_s3_a_live_holder_is_refused_and_a_dead_one_taken_over_after_the_watch(any_s3, caplog):
    s3 = any_s3
    with s3_lease(s3, run_id="the-holder") as holder:
        with pytest.raises(LeaseHeldError, match="the-holder"):
            s3_lease(s3).acquire()
        assert not holder.store.replace(b"{}", '"not-the-etag"')  # a wrong If-Match: an answer, not a crash
        holder.check()
    s3.put("out/_vb/lease.json", json.dumps(other_host_record(heartbeat_age=3600)).encode())
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vb_batch"), s3_lease(s3) as lease:
        assert time.monotonic() - started >= LEASE_S
        lease.check()
    assert "as watched from this host" in caplog.text
    assert s3.keys("out/_vb/") == []


@pytest.mark.slow  # 1-2 s each: contenders race on S3
def test_on_s3_racing_contenders_get_one_winner(any_s3):
    s3 = any_s3
    won, refused, errors = [], [], []
    barrier = threading.Barrier(4)

    def contend(n):
        lease = s3_lease(s3, seconds=30, run_id=f"run-{n}")
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeldError:
            refused.append(n)
        except Exception as exc:  # noqa: BLE001 - anything else fails the test
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(won) == 1 and len(refused) == 3
    won[0].release()

