"""Real clusters on this host for tests: a standalone Spark and a multi-process Ray, as separate processes.

    spark_standalone(root)  a Spark master and one worker, each started with `spark-class` (bound to
                            127.0.0.1, free ports); yields its `spark://` URL once the worker is alive
    ray_cluster()           `ray start --head` (dashboard and Jobs API on 127.0.0.1) plus a second node
                            with `ray start --address`, each with a temp folder of its own, token
                            authentication on; yields the GCS address, the dashboard URL, the env
    venv_env()              an environment with no venv activated: what cron or a scheduler gives a job
    run(args, ...)          a command with a deadline; its output is kept for the failure message

Cleanup is scoped to what these helpers started, never `ray stop` or a kill by name: every command
runs in a session of its own (`start_new_session`), and stopping sends SIGTERM, then SIGKILL after a
grace, in rounds, to the cluster's processes (`Processes`: those naming the cluster's own folder or
started here, those sharing their sessions, their descendants). Ray daemonises (`ray start` returns
while its processes live on in its session, some renamed), Spark's worker forks executors and
Python daemons: all are found that way, also when the test failed half way.

Ray's gRPC servers (GCS, raylet) listen on every interface and Ray replaces 127.0.0.1 by the host's
address for a node's identity (`resolve_ip_for_localhost`); Ray has no option against either. The
dashboard (the Jobs API), the Ray client server and all of Spark bind 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(os.path.normpath(os.path.abspath(sys.executable))).parent  # the venv's bin: spark-class, spark-submit, ray


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (all held open together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port_range(width: int) -> int:
    """The first of `width` consecutive ports free now, below Linux's ephemeral range (Ray's worker ports)."""
    import random

    for _ in range(200):
        first = random.randrange(20000, 32000 - width)
        try:
            for port in range(first, first + width):
                with socket.create_server(("127.0.0.1", port)):
                    pass
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {width} consecutive free ports found")


def venv_env(**extra: str) -> dict[str, str]:
    """This environment as an unactivated shell has it: no VIRTUAL_ENV, no SPARK_HOME, the venv not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in {
        "VIRTUAL_ENV", "SPARK_HOME", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYSPARK_GATEWAY_PORT",
        "PYSPARK_GATEWAY_SECRET", "RAY_ADDRESS", "PYTHONPATH"}}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
                                  if Path(p).resolve() != BIN.resolve())
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(extra)
    return env


def run(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to its end (or kill it at `timeout`), its output captured as text."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(args, proc.returncode, out)


def _processes() -> dict[int, tuple[int, int, int, str]]:
    """{pid: (parent pid, session id, start time, command line)} of every process this user can read."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, pgrp, session, ...
        found[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]), cmdline)
    return found


@dataclass
class Processes:
    """The processes a cluster helper started, and how to end them and everything they started.

    A process is the cluster's when its command line names the cluster's folder, when it is one this
    helper started and has not reaped, when it shares a session with one of those (Ray's daemons
    rename themselves), when it descends from one of those, or when it was found so before (by pid
    and start time: a pid another process took since is not ours). A session id alone is never
    enough: once a session's processes are gone its number may be another's.
    """

    marker: str  # a string in the command line of the cluster's main processes (its own folder)
    sessions: set[int] = field(default_factory=set)
    started: list[subprocess.Popen] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start time of every process found ours

    def start(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, cwd=log.parent)
        self.started.append(proc)
        self.sessions.add(proc.pid)
        return proc

    def ours(self) -> set[int]:
        """The live processes of the cluster (see the class); never this process or its parents."""
        table = _processes()
        me, ancestors = os.getpid(), set()
        while me in table and me not in ancestors:  # pytest, the shell or `timeout` that started it
            ancestors.add(me)
            me = table[me][0]
        alive = {proc.pid for proc in self.started if proc.poll() is None}
        anchors = {pid for pid, (_, _, _, cmd) in table.items() if self.marker in cmd} | (alive & table.keys())
        anchors -= ancestors
        sessions = {table[pid][1] for pid in anchors} & self.sessions
        mine = anchors | {pid for pid, (_, sid, started, _) in table.items()
                          if sid in sessions or self.seen.get(pid) == started} - ancestors
        grown = True
        while grown:  # and their descendants, wherever they moved
            more = {pid for pid, (ppid, *_) in table.items() if ppid in mine} - mine
            grown = bool(more)
            mine |= more
        mine = {pid for pid in mine if not _zombie(pid)}
        self.seen.update({pid: table[pid][2] for pid in mine})
        return mine

    def stop(self, grace: float = 3.0, timeout: float = 30.0) -> None:
        """SIGTERM, then after `grace` SIGKILL, in rounds until none is left (one may start another meanwhile)."""
        start = time.monotonic()
        signum = signal.SIGTERM
        while (pids := self.ours()) and time.monotonic() - start < timeout:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signum)
            deadline = time.monotonic() + (grace if signum == signal.SIGTERM else 2.0)
            while time.monotonic() < deadline and any(not _zombie(pid) for pid in pids):
                time.sleep(0.1)
            signum = signal.SIGKILL
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)


def _zombie(pid: int) -> bool:
    """True when the process is gone or a zombie (dead, waiting for its parent to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


def wait_for(what: str, check, timeout: float, logs: list[Path]) -> None:
    """Poll `check()` until it is true; on timeout fail with the tails of the cluster's logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.5)
    tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs if log.exists())
    raise TimeoutError(f"{what} not ready after {timeout} s\n{tails}")


def get_json(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------------------- Spark standalone


@dataclass
class SparkCluster:
    master_url: str  # spark://127.0.0.1:PORT
    ui_url: str  # the master's web UI (its /json/ says which workers are alive)
    root: Path
    processes: Processes = field(repr=False)  # `processes.ours()` is empty once the cluster is stopped


@contextlib.contextmanager
def spark_standalone(root: Path, cores: int = 2, memory: str = "2g", timeout: float = 90) -> Iterator[SparkCluster]:
    """A Spark standalone master and one worker, each a process started with `spark-class`, on 127.0.0.1."""
    root.mkdir(parents=True, exist_ok=True)
    master_port, master_ui, worker_port, worker_ui = free_ports(4)
    # PYSPARK_PYTHON: pip's spark-class finds SPARK_HOME by running it (docs/clusters.md).
    env = venv_env(PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1", SPARK_LOCAL_DIRS=str(root / "local"),
                   SPARK_LOG_DIR=str(root),
                   SPARK_DAEMON_JAVA_OPTS=f"-Dvb.test.cluster={root}")  # the marker in the master's command line
    spark_class = str(BIN / "spark-class")
    procs = Processes(marker=str(root))
    logs = [root / "master.log", root / "worker.log"]
    try:
        procs.start([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                     "--port", str(master_port), "--webui-port", str(master_ui)], logs[0], env)
        url = f"spark://127.0.0.1:{master_port}"
        procs.start([spark_class, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                     "--port", str(worker_port), "--webui-port", str(worker_ui), "--cores", str(cores),
                     "--memory", memory, "--work-dir", str(root / "work"), url], logs[1], env)
        ui = f"http://127.0.0.1:{master_ui}"
        wait_for("the Spark worker", lambda: any(w["state"] == "ALIVE" for w in get_json(f"{ui}/json/")["workers"]),
                 timeout, logs)
        yield SparkCluster(url, ui, root, procs)
    finally:
        procs.stop()


# ---------------------------------------------------------------------------- Ray, multi-process


@dataclass
class RayCluster:
    gcs_address: str  # 127.0.0.1:PORT, what `ray start --address` and `ray.init(address=...)` take
    dashboard_url: str  # http://127.0.0.1:PORT, the Jobs API of `ray job submit --address`
    root: Path
    env: dict[str, str] = field(repr=False)  # the cluster's environment (and `ray job submit`'s: the token)
    processes: Processes = field(repr=False)  # `processes.ours()` is empty once the cluster is stopped

    def nodes(self) -> list[dict]:
        """Every alive node of the cluster, from the dashboard's state API."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text()
        answer = get_json(f"{self.dashboard_url}/api/v0/nodes?limit=100", token)
        return [n for n in answer["data"]["result"]["result"] if n["state"] == "ALIVE"]


OBJECT_STORE = f"--object-store-memory={300 * 2**20}"  # small: the test's blocks are KBs, the box is shared


def _ray_node_ports(head: bool) -> list[str]:
    """Explicit free ports for every server of one Ray node: no default port, which another Ray may hold."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    if head:
        names += ["--ray-client-server-port"]
    first = free_port_range(48)
    args = [f"{name}={port}" for name, port in zip(names, free_ports(len(names)))]
    return args + [f"--min-worker-port={first}", f"--max-worker-port={first + 47}"]


@contextlib.contextmanager
def ray_cluster(head_cpus: int = 0, worker_cpus: int = 2, timeout: float = 90) -> Iterator[RayCluster]:
    """`ray start --head` plus `ray start --address` (a second node), separate process trees, one host.

    The head gets `head_cpus` CPUs (0: no task or actor can run there, so work that runs at all ran on
    the second node). The folder is short (Ray's Unix sockets live under it) and the processes'
    marker. The cluster's Python is this venv's; PATH starts with the venv's bin, as after activating it,
    so a job's entrypoint `python` is that Python.
    """
    root = Path(tempfile.mkdtemp(prefix="vbray-", dir="/tmp"))
    gcs_port, dashboard_port = free_ports(2)
    # Ray 2.60 turns token authentication on for a new head by default: every node and every client
    # (`ray job submit`) must then hold the token. This cluster's own, never ~/.ray/auth_token.
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = venv_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    env["PATH"] = os.pathsep.join([str(BIN), env["PATH"]])
    ray = str(BIN / "ray")
    procs = Processes(marker=str(root))
    head_log, worker_log = root / "head.log", root / "worker.log"
    try:
        started = run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                       "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                       f"--num-cpus={head_cpus}", "--num-gpus=0", f"--temp-dir={root}", "--disable-usage-stats",
                       OBJECT_STORE, *_ray_node_ports(head=True)], timeout, env=env)
        procs.sessions.update(_sessions_of_ray(root))
        head_log.write_text(started.stdout)
        if started.returncode:
            raise RuntimeError(f"ray start --head failed ({started.returncode}):\n{started.stdout[-3000:]}")
        gcs = f"127.0.0.1:{gcs_port}"
        # A folder of its own, as on another host: the nodes must not share `runtime_resources/`, where each
        # unpacks a job's working_dir and deletes it when its own workers are done with it (the driver's cwd).
        joined = run([ray, "start", f"--address={gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={worker_cpus}",
                      "--num-gpus=0", f"--temp-dir={root / 'n2'}", "--disable-usage-stats", OBJECT_STORE,
                      *_ray_node_ports(head=False)], timeout, env=env)
        worker_log.write_text(joined.stdout)
        procs.sessions.update(_sessions_of_ray(root))
        if joined.returncode:
            raise RuntimeError(f"ray start --address failed ({joined.returncode}):\n{joined.stdout[-3000:]}")
        cluster = RayCluster(gcs, f"http://127.0.0.1:{dashboard_port}", root, env, procs)
        wait_for("the second Ray node", lambda: len(cluster.nodes()) == 2, timeout, [head_log, worker_log])
        yield cluster
    finally:
        procs.sessions.update(_sessions_of_ray(root))
        procs.stop()
        shutil.rmtree(root, ignore_errors=True)


def _sessions_of_ray(root: Path) -> set[int]:
    """The sessions of the processes whose command line names the cluster's folder (the daemons of both nodes)."""
    return {sid for _, sid, _, cmd in _processes().values() if str(root) in cmd}
