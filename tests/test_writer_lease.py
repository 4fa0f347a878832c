"""One writer per output: the writer lease.

A second run fails fast (naming the holder) while the first completes; leases race safely on S3 and
locally (exactly one winner); a holder that died (killed on this host, or no heartbeat from another
host) is taken over at once, a live one (another host, another container of this host) never; a run
that lost its lease stops before its next commit and leaves the new holder's lease and staged files
alone.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from deltalake import DeltaTable
from output_safety import (
    TESTS,
    assert_each_id_once,
    child_env,
    cli,
    images_table,
    job,
    output_ids,
    write_images,
)

import vb_batch
from vb_batch.cli import EXIT_LEASE_HELD
from vb_batch.config import StorageOptions
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.lease import Lease, LeaseHeldError, LeaseLostError


def wait_for(predicate, what: str, seconds: float = 60):
    """Poll `predicate` until it returns something true (or fail after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def lease_holder(out: Path) -> dict | None:
    try:
        return json.loads((out / "_vb" / "lease.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def gated_job(tmp_path: Path, out: dict, n: int = 16) -> tuple[Path, Path, list[str]]:
    """A job file whose model waits for a gate file before its first batch: (job file, gate, ids)."""
    ids = write_images(tmp_path / "in.parquet", n)
    gate = tmp_path / "gate"
    cfg = job(tmp_path / "in.parquet", out)
    cfg["model"] = {"backend": "crashing_job:GatedBackend", "batch_size": 4, "options": {"gate": str(gate)}}
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, gate, ids


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_a_second_run_fails_fast_while_the_first_completes(fmt, tmp_path, capsys):
    out = {"format": fmt, "path": str(tmp_path / "labels"), "mode": "overwrite"}
    job_path, gate, ids = gated_job(tmp_path, out)
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for(lambda: lease_holder(tmp_path / "labels"), "the first run's lease")
        assert holder["pid"] == first.pid
        second = yaml.safe_load(job_path.read_text())  # the same job, fired twice
        started = time.monotonic()
        with pytest.raises(LeaseHeldError, match=f"being written by run {holder['run_id']}.*pid {first.pid}"):
            vb_batch.annotate(second)  # an overwrite: it would have removed the first run's rows
        code, line = cli({**second, "output": {**out, "mode": "resume"}}, tmp_path, capsys)
        assert code == EXIT_LEASE_HELD and holder["run_id"] in line, line  # a scheduler may try again later
        assert time.monotonic() - started < 15  # fails fast: no waiting for the lease
        assert lease_holder(tmp_path / "labels")["token"] == holder["token"]  # the first run's lease is intact
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_each_id_once({"format": fmt, "path": out["path"]}, ids)
    assert not (tmp_path / "labels" / "_vb" / "lease.json").exists()
    if fmt == "parquet":
        assert (tmp_path / "labels" / "_SUCCESS").exists()
    else:
        assert DeltaTable(out["path"]).to_pyarrow_table().num_rows == len(ids)  # deltalake's own reader agrees


def test_a_killed_holder_is_taken_over_at_once(tmp_path, caplog):
    out = {"format": "parquet", "path": str(tmp_path / "labels")}
    job_path, gate, ids = gated_job(tmp_path, out)
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = wait_for(lambda: lease_holder(tmp_path / "labels"), "the first run's lease")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    gate.touch()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        summary = vb_batch.annotate(str(job_path))  # the same job, resumed at once
    assert summary.success and time.monotonic() - started < 15  # not after lease_seconds (120 s)
    assert f"taking over the writer lease of run {holder['run_id']} (its process {first.pid} on this host has exited)" in caplog.text
    assert_each_id_once(out, ids)


def foreign_lease(out: Path, heartbeat_age: float, host: str = "other-host.example", seconds: float = 120.0) -> dict:
    """A lease record of a run on another host whose last heartbeat is `heartbeat_age` seconds old
    (by this host's clock), for a lease of `seconds`."""
    record = {"token": uuid.uuid4().hex, "run_id": "20260101T000000Z-otherrun", "host": host, "pid": 4242,
              "boot_id": "another-boot", "process_start": "1", "acquired": time.time() - heartbeat_age - 5,
              "heartbeat": time.time() - heartbeat_age, "seconds": seconds}
    (out / "_vb").mkdir(parents=True, exist_ok=True)
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    return record


def test_stale_leases_are_taken_over_and_live_ones_never(tmp_path, caplog):
    ids = write_images(tmp_path / "in.parquet", 8)
    out = tmp_path / "labels"
    # A stale lease is taken over once this run has watched it unchanged for the longer of the two
    # leases (never by comparing clocks): 1 s each keeps the test short.
    cfg = job(tmp_path / "in.parquet", {"path": str(out), "lease_seconds": 1.0})
    live = foreign_lease(out, heartbeat_age=5)
    with pytest.raises(LeaseHeldError, match="run 20260101T000000Z-otherrun .host other-host.example, pid 4242"):
        vb_batch.annotate(cfg)
    assert lease_holder(out) == live and not list(out.glob("part-*"))

    foreign_lease(out, heartbeat_age=600, seconds=1.0)  # its host died ten minutes ago
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        assert vb_batch.annotate(cfg).success
    assert ("taking over the writer lease of run 20260101T000000Z-otherrun (its record did not change for 1 s, "
            "as watched from this host)") in caplog.text
    assert_each_id_once(str(out), ids)

    # On this host: a pid that is alive but is not the holder (its start time differs) is taken over too.
    from vb_batch.io.lease import _boot_id, _pid_namespace

    here = {"host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_namespace()}
    record = {**foreign_lease(out, heartbeat_age=5), **here, "pid": os.getpid(), "process_start": "1"}
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    assert vb_batch.annotate(cfg).success
    # A run in another container of this host (same host name and boot, its own pids): the pid it names
    # does not exist here, but that says nothing about it; a fresh heartbeat keeps its lease.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {**foreign_lease(out, heartbeat_age=5), **here, "pid": dead.pid, "pid_ns": "pid:[1]"}
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    with pytest.raises(LeaseHeldError, match="otherrun"):
        vb_batch.annotate(cfg)
    record["pid_ns"] = _pid_namespace()  # the same pid, in this namespace: dead, taken over at once
    (out / "_vb" / "lease.json").write_text(json.dumps(record))
    assert vb_batch.annotate(cfg).success


def race_for_lease(make_lease, contenders: int = 4) -> list[int]:
    """`contenders` threads acquire a lease at the same moment: the indices of those that won."""
    barrier = threading.Barrier(contenders)
    won, errors = [], []

    def contend(n: int) -> None:
        lease = make_lease(n)
        barrier.wait()
        try:
            lease.acquire()
        except LeaseHeldError:
            return
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of the test
            errors.append(exc)
            return
        won.append((n, lease))

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    for _, lease in won:
        lease.release()
    return [n for n, _ in won]


def test_leases_race_safely_on_s3_and_locally(s3, tmp_path):
    storage = StorageOptions(**s3.storage)
    url = s3.url("race/labels")
    fs, root = fsspec_filesystem(url, storage)
    for round_ in range(20):
        winners = race_for_lease(lambda n, r=round_: Lease(fs, f"{root}/_vb", url, f"run-{r}-{n}", 120))
        assert len(winners) == 1, (round_, winners)
        assert s3.keys("race/") == []  # released: the next round starts from a free lease
    local = tmp_path / "labels"
    lfs, lroot = fsspec_filesystem(str(local))
    for round_ in range(20):
        winners = race_for_lease(lambda n, r=round_: Lease(lfs, f"{lroot}/_vb", str(local), f"run-{r}-{n}", 120))
        assert len(winners) == 1, (round_, winners)


def test_s3_leases_of_other_hosts(s3, caplog):
    storage = StorageOptions(**s3.storage)
    url = s3.url("hosts/labels")
    fs, root = fsspec_filesystem(url, storage)
    record = {"token": "t0", "run_id": "run-elsewhere", "host": "other-host.example", "pid": 1, "seconds": 120.0}
    s3.put("hosts/labels/_vb/lease.json", json.dumps({**record, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseHeldError, match="run-elsewhere"):
        Lease(fs, f"{root}/_vb", url, "run-here", 120).acquire()
    stale = {**record, "heartbeat": time.time() - 600, "seconds": 1.0}  # watched for 1 s, then taken over
    s3.put("hosts/labels/_vb/lease.json", json.dumps(stale).encode())
    lease = Lease(fs, f"{root}/_vb", url, "run-here", 1.0)
    with caplog.at_level(logging.WARNING, logger="vb_batch"):
        lease.acquire()
    try:
        assert "taking over the writer lease of run run-elsewhere (its record did not change for 1 s" in caplog.text
        assert json.loads(s3.get("hosts/labels/_vb/lease.json"))["run_id"] == "run-here"
        lease.check()
    finally:
        lease.release()
    assert s3.keys("hosts/") == []

    # Taken over between two heartbeats: the next commit's check stops it, and its release leaves the new lease.
    lease = Lease(fs, f"{root}/_vb", url, "run-here", 120)
    lease.acquire()
    s3.put("hosts/labels/_vb/lease.json", json.dumps({**record, "heartbeat": time.time()}).encode())
    with pytest.raises(LeaseLostError, match="run run-elsewhere .host other-host.example. took the writer lease over"):
        lease.check()
    lease.release()
    assert json.loads(s3.get("hosts/labels/_vb/lease.json"))["run_id"] == "run-elsewhere"


def test_a_run_that_lost_its_lease_stops_and_leaves_the_new_holder_alone(tmp_path):
    """Another host judged the first run dead (paused, cut off) and took the output over: the first run,
    back to life, stops before its next commit, even if no heartbeat noticed yet (lease_seconds 120)."""
    out = tmp_path / "labels"
    job_path, gate, _ = gated_job(tmp_path, {"format": "parquet", "path": str(out)})
    first = subprocess.Popen([sys.executable, str(TESTS / "crashing_job.py"), str(job_path)], env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder = wait_for(lambda: lease_holder(out), "the first run's lease")
        wait_for(lambda: (out / "_vb" / "output.json").exists(), "the first run's recovery (it writes the marker after)")
        taken = foreign_lease(out, heartbeat_age=0)  # the new holder, which also staged a file
        staged = out / "_vb" / "staging" / taken["run_id"] / f"part-{taken['run_id']}-00000.parquet"
        staged.parent.mkdir(parents=True)
        pq.write_table(images_table(["theirs-0"]), staged)
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=60)
    assert first.returncode == 1 and holder["run_id"] != taken["run_id"]
    assert "LeaseLostError" in stderr and "run 20260101T000000Z-otherrun (host other-host.example) took the writer lease" in stderr
    assert lease_holder(out) == taken  # the new holder's lease is not released by the old run
    assert staged.exists()  # nor its staged work deleted
    assert output_ids(str(out)) == [] and not list(out.glob("part-*"))  # the old run committed nothing
