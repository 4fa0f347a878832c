"""The run's one rate limiter, shared by every model worker of a Ray or Spark run.

    ray_rate_limiter(plan)           [driver, the Ray session]    a named actor `vb-rate-<run_id>` holds the book
    driver_rate_limiter(plan, conf)  [driver, the Spark session]  a token server on the driver holds it
    remote_book(address)             [workers]                    the book at `plan.rate_limiter`, as a worker sees it

A hosted model's `model.requests_per_minute` and `model.max_concurrent_requests`
hold for the whole run, not per worker process: the run's `SlotBook`
(`vb_batch.models.quota`) lives once, for the run's lifetime, and every worker's
`RateLimiter` asks it for slots. A worker asks once for all its threads that wait
at that moment (one actor call or HTTP request for a batch of slots) and hands a
slot back when its request ends (only with a concurrency limit: a Ray call it does
not wait for, or one small HTTP request). When the service says the day's quota is
gone, the book is told, and every worker's next request stops the run.

Contract:

- Only started when the model has a limit (`requests_per_minute` or
  `max_concurrent_requests`); `plan.rate_limiter` then names it (the engine's
  session sets it before the plan is shipped, and clears it when the run ends). The
  plan, not the config, carries it: the config is the output's metadata, and the
  address changes with every run.
- Ray: the actor is named for the run, in the driver's namespace, owned by the
  driver (not detached: it dies with the driver, and is killed when the run ends),
  takes no CPU, and answers calls on threads (`max_concurrency`).
- Spark: an HTTP server on the driver, bound to the address executors reach it at
  (`spark.driver.bindAddress`, else `spark.driver.host`; 127.0.0.1 in local mode),
  on a free port. A random token, sent in a header, is its only credential: the
  address with the token travels in the plan only, never in a log, config or record.
- A worker that cannot reach the book (the driver is gone) raises: its run is over.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from vb_batch.models.slot_book import SlotBook

log = logging.getLogger(__name__)

TOKEN_HEADER = "X-VB-Rate-Token"
CALL_TIMEOUT_S = 60.0  # a grant waits at most GRANT_WAIT_S on the book's side
ACTOR_THREADS = 64  # grants waiting for a request in flight to end, one per worker process at most


def _limits(plan) -> tuple[float | None, int | None]:
    model = plan.cfg.model
    return model.requests_per_minute, model.max_concurrent_requests


# ---------------------------------------------------------------------------- Ray: a named actor


@contextlib.contextmanager
def ray_rate_limiter(plan) -> Iterator[str | None]:
    """The run's book in a named Ray actor for the run's lifetime; `plan.rate_limiter` names it meanwhile."""
    rpm, concurrent = _limits(plan)
    if not (rpm or concurrent):
        yield None
        return
    import ray

    namespace = ray.get_runtime_context().namespace
    name = f"vb-rate-{plan.run_id}"
    actor = ray.remote(SlotBook).options(
        name=name, namespace=namespace, num_cpus=0, max_concurrency=ACTOR_THREADS,
    ).remote(rpm, concurrent)
    plan.rate_limiter = f"ray:{namespace}/{name}"
    log.info("rate limit shared by every model worker: %s requests a minute, %s in flight (Ray actor %s)",
             rpm or "any", concurrent or "any", name)
    try:
        yield plan.rate_limiter
    finally:
        plan.rate_limiter = None
        ray.kill(actor)


class RayBook:
    """A worker's proxy of the run's book in its Ray actor."""

    def __init__(self, namespace: str, name: str):
        import ray

        self.actor = ray.get_actor(name, namespace=namespace)

    def grant(self, wanted: int) -> tuple[list[float], str | None]:
        import ray

        delays, stopped = ray.get(self.actor.grant.remote(wanted), timeout=CALL_TIMEOUT_S)
        return list(delays), stopped

    def release(self, count: int) -> None:
        self.actor.release.remote(count)  # not waited for: the request has ended

    def stop(self, why: str) -> None:
        self.actor.stop.remote(why)


# ---------------------------------------------------------------------------- Spark: a token server on the driver


class _Handler(BaseHTTPRequestHandler):
    server: _BookServer

    def do_POST(self):
        given = self.headers.get(TOKEN_HEADER) or ""
        if not hmac.compare_digest(given.encode(), self.server.token.encode()):
            self._answer(403, {"error": "bad token"})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        book = self.server.book
        if self.path == "/grant":
            delays, stopped = book.grant(int(body.get("wanted", 1)))
            self._answer(200, {"delays": delays, "stopped": stopped})
        elif self.path == "/release":
            book.release(int(body.get("count", 1)))
            self._answer(200, {})
        elif self.path == "/stop":
            book.stop(str(body.get("why", "")))
            self._answer(200, {})
        else:
            self._answer(404, {"error": f"no route {self.path}"})

    def _answer(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _BookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, book: SlotBook):
        super().__init__((host, 0), _Handler)
        self.book = book
        self.token = secrets.token_urlsafe(24)


def driver_addresses(conf) -> tuple[str, str]:
    """(bind, advertised) addresses of the token server, from the Spark conf: where the driver listens, where executors reach it."""
    host = conf.get("spark.driver.host") or "127.0.0.1"
    return conf.get("spark.driver.bindAddress") or host, host


@contextlib.contextmanager
def driver_rate_limiter(plan, conf) -> Iterator[str | None]:
    """The run's book behind an HTTP server on the driver; `plan.rate_limiter` names it meanwhile.

    `conf`: the SparkConf (or a dict) saying the driver's addresses (`driver_addresses`).
    """
    rpm, concurrent = _limits(plan)
    if not (rpm or concurrent):
        yield None
        return
    bind, host = driver_addresses(conf)
    server = _BookServer(bind, SlotBook(rpm, concurrent))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                              name="vb-rate-server")
    thread.start()
    where = f"{host}:{server.server_address[1]}" if ":" not in host else f"[{host}]:{server.server_address[1]}"
    plan.rate_limiter = f"http://{where}#{server.token}"
    log.info("rate limit shared by every model worker: %s requests a minute, %s in flight (driver at http://%s)",
             rpm or "any", concurrent or "any", where)
    try:
        yield plan.rate_limiter
    finally:
        plan.rate_limiter = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class HttpBook:
    """A worker's proxy of the run's book on the driver's token server."""

    def __init__(self, address: str):
        self.url, _, self.token = address.partition("#")

    def _post(self, route: str, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(), method="POST",
                                         headers={TOKEN_HEADER: self.token, "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S) as answer:
            return json.loads(answer.read() or b"{}")

    def grant(self, wanted: int) -> tuple[list[float], str | None]:
        answer = self._post("/grant", {"wanted": wanted})
        return list(answer["delays"]), answer.get("stopped")

    def release(self, count: int) -> None:
        self._post("/release", {"count": count})

    def stop(self, why: str) -> None:
        self._post("/stop", {"why": why})


def remote_book(address: str):
    """The proxy of the run's book at `address` (`ray:<namespace>/<name>` or `http://host:port#token`)."""
    if address.startswith("ray:"):
        namespace, _, name = address.removeprefix("ray:").rpartition("/")
        return RayBook(namespace, name)
    if address.startswith("http://"):
        return HttpBook(address)
    raise ValueError(f"not a rate limiter address: {address.split('#')[0]!r}")
