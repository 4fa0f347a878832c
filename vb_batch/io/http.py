"""The one HTTP(S) transport of vb_batch (on urllib3): one request, to the address it is told, bounded.

Used by URI fetching (`vb_batch.io.fetch`) and the `http` model backend
(`vb_batch.models.http`); retrying is the caller's (`vb_batch.io.retry`).

What `Transport.send` promises:

- Exactly one request: redirects are NOT followed (a 3xx is an answer like any
  other; a caller that follows them checks each hop itself), nothing is retried,
  nothing is decoded (`Content-Encoding` is left as sent: a gzip bomb stays
  compressed and counts at its wire size).
- `connect_to`: the addresses to connect to, tried in order, instead of
  resolving the URL's host (no second DNS lookup after the caller checked
  them); the Host header, TLS SNI and the certificate check still use the URL's
  host name. Such requests never go through a proxy: there the address reached
  would be the proxy's choice. Without `connect_to` the OS resolves the host,
  and a transport built with `use_env_proxies=True` honours `*_proxy` /
  `no_proxy` as urllib does.
- TLS: the system's CAs (`SSL_CERT_FILE` / `SSL_CERT_DIR` honoured), the
  certificate and the host name always verified.
- Bounds: connect and every read wait at most `timeout_s`; with `deadline`
  (a `time.monotonic()` instant) the socket is shut down then, which ends a
  read that a server dripping bytes keeps alive (`DeadlinePassed`). A 2xx body
  declared or read past `max_body_bytes` raises `BodyTooLarge` having held at
  most `max_body_bytes + 1` bytes; of any other answer only the first
  `error_body_bytes` are read.
- Failures are `TransportError`s that say where the request failed
  (`ConnectFailed`, its kinds `ConnectTimedOut` and `CertificateRejected`,
  `ReadTimedOut`, `DeadlinePassed`, `ConnectionBroken`). Their `detail` is what
  the OS or library said, unscrubbed: callers mask their own secrets in it.
- Connections are pooled per (scheme, address, port; for TLS the host name) and reused
  unless a side sends `Connection: close`; a forked process gets its own
  `shared_transport()`. urllib3 logs each request line at DEBUG, query string
  included: a filter on its logger masks query strings (signed URLs, API keys).

Example (the checked address of images.example.com, at most 20 MB, 4 x 60 s in all):

    answer = shared_transport().send(
        "GET", "https://images.example.com/a.png", connect_to=["93.184.216.34"], timeout_s=60,
        max_body_bytes=20_000_000, deadline=time.monotonic() + 240,
    )
    if answer.ok: image_bytes = answer.body

Any byte source is read within a limit the same way:

    >>> read_at_most(io.BytesIO(b"abc").read, limit=3)
    b'abc'
    >>> read_at_most(io.BytesIO(b"abcd").read, limit=3)
    Traceback (most recent call last):
    ...
    vb_batch.io.http.BodyTooLarge: more than 3 bytes exceeds 3
"""

from __future__ import annotations

import functools
import io
import logging
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ProxyError,
    ReadTimeoutError,
    SSLError,
)

from vb_batch.masking import MASK

READ_CHUNK = 1 << 20
DEFAULT_PORTS = {"http": 80, "https": 443}


# ---------------------------------------------------------------------------- outcomes


class TransportError(Exception):
    """A request that got no complete answer; `detail` is what the OS or library said (unscrubbed)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ConnectFailed(TransportError):
    """No connection: refused, unreachable, no such host, TLS handshake failed, proxy refused."""


class ConnectTimedOut(ConnectFailed):
    """No connection within `timeout_s`."""


class CertificateRejected(ConnectFailed):
    """The server's TLS certificate is not trusted for the host name; `detail` says why."""


class ReadTimedOut(TransportError):
    """Connected, then no data for `timeout_s`."""


class DeadlinePassed(TransportError):
    """The whole request was not done by its `deadline`."""


class ConnectionBroken(TransportError):
    """The connection failed after it was made (reset, closed early, malformed answer)."""


class BodyTooLarge(Exception):
    """A body past the caller's byte limit; `size` is the declared size, None when it was found while reading."""

    def __init__(self, size: int | None, limit: int):
        super().__init__(f"{size if size is not None else f'more than {limit}'} bytes exceeds {limit}")
        self.size = size
        self.limit = limit


@dataclass(frozen=True)
class Answer:
    """A server's answer: status, reason phrase, headers (case-insensitive) and the body that was read."""

    status: int
    reason: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def read_at_most(read: Callable[[int], bytes], limit: int, size_hint: int | None = None) -> bytes:
    """Everything `read(n)` gives until it returns b"", holding at most `limit` + 1 bytes (`BodyTooLarge` past it).

    For any byte source (a socket, a local file, an object store's stream); `size_hint`
    is the size the source declared, read in one call when it is right.
    """
    first = read(min(size_hint + 1, limit + 1) if size_hint is not None else min(READ_CHUNK, limit + 1))
    if len(first) > limit:
        raise BodyTooLarge(None, limit)
    if not first:
        return first
    more = read(min(READ_CHUNK, limit + 1 - len(first)))
    if not more:
        return first  # the usual case: the declared size was right, nothing copied
    buffer = io.BytesIO()  # grows in place; getvalue() hands its bytes over without a copy
    buffer.write(first)
    del first
    while more:
        buffer.write(more)
        if buffer.tell() > limit:
            raise BodyTooLarge(None, limit)
        more = read(min(READ_CHUNK, limit + 1 - buffer.tell()))
    return buffer.getvalue()


# ---------------------------------------------------------------------------- deadline


class _Deadline:
    """Shuts the request's socket down at the deadline: wakes a read that a dripping server keeps alive."""

    def __init__(self, at: float):
        self.fired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(at - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock, fired = sock, self.fired
        if fired:
            _shut_down(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired, sock = True, self._sock
        if sock is not None:
            _shut_down(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut_down(sock: socket.socket) -> None:
    try:
        # The plain socket's shutdown, also under TLS: the TLS one would tear down state a reader is using.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


# The deadline of the request this thread is sending: connections report their socket to it once the
# request is out (the pool hands connections over without a way to pass it along).
_this_request = threading.local()


class _ReportsSocket:
    def getresponse(self):
        deadline: _Deadline | None = getattr(_this_request, "deadline", None)
        if deadline is not None and self.sock is not None:
            deadline.watch(self.sock)
        return super().getresponse()


class _Connection(_ReportsSocket, HTTPConnection):
    pass


class _TlsConnection(_ReportsSocket, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


_POOL_CLASSES = {"http": _Pool, "https": _TlsPool}


# ---------------------------------------------------------------------------- transport


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The system's CAs (SSL_CERT_FILE / SSL_CERT_DIR honoured when first called); host names checked."""
    return ssl.create_default_context()


class Transport:
    """HTTP(S) requests over pooled urllib3 connections; see the module docstring."""

    def __init__(self, *, pool_size: int = 8, use_env_proxies: bool = False):
        self._pool_size = pool_size
        self._use_env_proxies = use_env_proxies
        self._direct = self._manager(urllib3.PoolManager)
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def _manager(self, kind, *args, **kwargs):
        manager = kind(*args, num_pools=32, maxsize=self._pool_size, block=False, **kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager

    def send(
        self,
        method: str,
        url: str,
        *,
        timeout_s: float,
        max_body_bytes: int,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        error_body_bytes: int = 0,
        connect_to: Sequence[str] = (),
        deadline: float | None = None,
    ) -> Answer:
        """One request: its `Answer`, or a `TransportError` / `BodyTooLarge`; `url` is sent as given."""
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname or ""
        if scheme not in DEFAULT_PORTS or not host:
            raise ValueError(f"not an http(s) URL with a host: {scheme}://{host}")
        port = parts.port or DEFAULT_PORTS[scheme]
        shown_host = f"[{host}]" if ":" in host else host
        sent_headers = {"Host": shown_host + (f":{port}" if port != DEFAULT_PORTS[scheme] else ""), **(headers or {})}
        request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connect_s = timeout_s
        if deadline is not None:
            connect_s = min(timeout_s, deadline - time.monotonic())
            if connect_s <= 0:
                raise DeadlinePassed("no time left")
        options = {
            "body": body, "headers": sent_headers, "redirect": False, "retries": False, "preload_content": False,
            "decode_content": False, "timeout": urllib3.Timeout(connect=connect_s, read=timeout_s),
        }
        watch = _Deadline(deadline) if deadline is not None else None
        _this_request.deadline = watch
        try:
            proxy = None if connect_to else self._proxy_for(scheme, host)
            if proxy is not None:
                response = proxy.urlopen(method, url, **options)
            else:
                response = self._direct_open(method, scheme, host, port, connect_to or [host], request_target, options)
            answer = _read_answer(response, max_body_bytes, error_body_bytes)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise (DeadlinePassed("cut at the deadline") if watch and watch.fired else _fault(exc)) from None
        finally:
            _this_request.deadline = None
            if watch is not None:
                watch.cancel()
        if watch is not None and watch.fired:  # the body may look complete when the connection was cut
            raise DeadlinePassed("cut at the deadline")
        return answer

    def _direct_open(self, method, scheme, host, port, addresses, request_target, options):
        """The response from the first of `addresses` that takes a connection (the last one's fault otherwise)."""
        tls = {"ssl_context": tls_context(), "server_hostname": host} if scheme == "https" else None
        for i, address in enumerate(addresses):
            pool = self._direct.connection_from_host(address, port, scheme, pool_kwargs=tls)
            try:
                return pool.urlopen(method, request_target, assert_same_host=False, **options)
            except (NewConnectionError, ConnectTimeoutError):
                if i == len(addresses) - 1:
                    raise
        raise ConnectFailed("no address to connect to")

    def _proxy_for(self, scheme: str, host: str) -> urllib3.ProxyManager | None:
        """The proxy the environment names for this URL (as urllib chooses it), when this transport uses them."""
        if not self._use_env_proxies:
            return None
        proxy_url = urllib.request.getproxies().get(scheme)
        if not proxy_url or urllib.request.proxy_bypass(host):
            return None
        with self._lock:
            if proxy_url not in self._proxied:
                auth = urllib3.util.parse_url(proxy_url).auth
                proxy_headers = urllib3.util.make_headers(proxy_basic_auth=auth) if auth else None
                self._proxied[proxy_url] = self._manager(
                    urllib3.ProxyManager, proxy_url, proxy_headers=proxy_headers, ssl_context=tls_context()
                )
            return self._proxied[proxy_url]


def _read_answer(response, max_body_bytes: int, error_body_bytes: int) -> Answer:
    """The answer with its body read within the limits; the connection back to the pool only when fully read."""
    reusable = False
    try:
        if 200 <= response.status < 300:
            declared = response.length_remaining  # None when the server does not say (chunked, or until close)
            if declared is not None and declared > max_body_bytes:
                raise BodyTooLarge(declared, max_body_bytes)
            body = read_at_most(lambda n: response.read(n, decode_content=False), max_body_bytes, declared)
            reusable = True
        else:
            body = response.read(error_body_bytes, decode_content=False) if error_body_bytes else b""
        return Answer(response.status, response.reason or "", response.headers, body)
    finally:
        if not reusable:
            response.close()
        response.release_conn()


def _fault(exc: BaseException) -> TransportError:
    """What went wrong, in the transport's terms."""
    if isinstance(exc, NewConnectionError):
        return ConnectFailed(_cause_text(exc))
    if isinstance(exc, ConnectTimeoutError):
        return ConnectTimedOut(_cause_text(exc))
    if isinstance(exc, ReadTimeoutError):
        return ReadTimedOut(_cause_text(exc))
    if isinstance(exc, SSLError):
        cause = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
        if isinstance(cause, ssl.SSLCertVerificationError):
            return CertificateRejected(cause.verify_message or str(cause))
        return ConnectFailed(f"TLS: {cause}")
    if isinstance(exc, ProxyError):
        return ConnectFailed(f"proxy: {_cause_text(exc)}")
    if isinstance(exc, ProtocolError) and len(exc.args) == 2 and isinstance(exc.args[1], BaseException):
        inner = exc.args[1]
        return ConnectionBroken(f"{type(inner).__name__}: {inner}" if str(inner) else type(inner).__name__)
    return ConnectionBroken(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def _cause_text(exc: BaseException) -> str:
    """What the OS said under urllib3's wrapping, e.g. "[Errno 111] Connection refused" or "timed out"."""
    cause = exc.__cause__ or exc
    return str(cause) or type(cause).__name__


@functools.cache
def _transport_of_process(pid: int) -> Transport:
    return Transport(pool_size=32)


def shared_transport() -> Transport:
    """This process's transport without proxies (URI fetching); a forked child gets its own."""
    return _transport_of_process(os.getpid())


class _MaskQueryStrings(logging.Filter):
    """urllib3 logs request lines ("GET /path?query") at DEBUG: the query string may hold a signed URL's secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                f"{arg.partition('?')[0]}?{MASK}" if isinstance(arg, str) and "?" in arg else arg
                for arg in record.args
            )
        return True


logging.getLogger("urllib3.connectionpool").addFilter(_MaskQueryStrings())
