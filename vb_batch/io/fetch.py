"""Reading the image a URI column names, safely: only configured places, never internal addresses, bounded.

What this module guarantees, for any cell of a URI column (any string, null or
not a string at all):

- `check_uri` and `read_uri` raise nothing but `RowError`: a broken or hostile
  URI fails its row, never the job.
- One parse (`vb_batch.io.uri.parse_uri`) decides what a URI opens (scheme,
  normalised location); the allow check and the reader both use its result, so
  they cannot disagree. Schemes are case-insensitive (`S3://` is `s3://`,
  `s3a://` is `s3://`, `local:` is `file:`).
- A URI is read only when it lies under one of `input.allowed_prefixes`
  (default: the scheme of `input.path`, e.g. only local files for a local job):
  local paths after `..` and symlinks are resolved; `http(s)` paths after
  dot-segments are removed, both as sent and percent-decoded; object-store keys
  literally (a key with `.` or `..` segments is refused: stores keep them as
  part of the name). `http(s)` hosts must resolve only to public addresses
  (not loopback, private, link-local, shared, reserved or multicast, IPv4
  mapped or NAT64 forms included) unless `input.allow_private_addresses`.
- http(s) redirects are followed here, hop by hop (at most `MAX_REDIRECTS`),
  only to http(s), and each hop is checked against the same rules before it is
  requested. The request (`vb_batch.io.http`, `connect_to`) goes to the very
  address that was checked (no second DNS lookup), while the Host header, TLS
  SNI and the certificate check use the host name. Proxies (`*_proxy` environment variables) are NOT used:
  through a proxy the address reached is the proxy's choice, which would undo
  the address check. Credentials in a URL (`user:pw@`) go only to its origin.
- At most `input.max_bytes` bytes are ever held per fetch: a declared size
  (Content-Length, fstat, store metadata) above it is refused before reading,
  and reading stops at `max_bytes + 1` bytes (`too_large`).
- Local files: only regular files are read; devices, FIFOs and sockets are
  `not_a_file` and are never opened for reading in a way that can block
  (stat first, open with O_NONBLOCK | O_NOFOLLOW, fstat the opened file).
  Directories are `is_a_directory`.
- Time: http(s) connect and every read wait at most `input.storage.timeout_s`,
  and a whole fetch (all hops) at most `DEADLINE_FACTOR` x timeout_s (240 s at
  the default 60 s: 200 MB at ~1 MB/s), so a server dripping bytes cannot hold
  a row. Object stores get connect/read timeouts and retries from their
  client (`fsspec_options`) and the same total deadline when their
  filesystem is asynchronous (s3fs, gcsfs, ...). Local reads and DNS look-ups
  have no timeout of their own (a hung network mount holds its thread).
- Error messages name the URI as scheme://host/path only: query strings
  (signed-URL secrets) and user info are never shown.

Known limits: a local path's directories could be swapped for symlinks between
the check and the open (only the last component is protected, by O_NOFOLLOW);
http(s) connections are not reused between rows (one TCP + TLS handshake per
image: each request says `Connection: close`, so no row ever meets a pooled
connection the server has dropped, or one cut at another row's deadline).
"""

from __future__ import annotations

import base64
import errno
import functools
import ipaddress
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import unquote, urljoin

import fsspec.exceptions

from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.io.http import (
    Answer,
    BodyTooLarge,
    CertificateRejected,
    ConnectFailed,
    ConnectTimedOut,
    DeadlinePassed,
    ReadTimedOut,
    TransportError,
    read_at_most,
    shared_transport,
)
from vb_batch.io.uri import HTTP_SCHEMES, Target, parse_prefix, parse_uri, remove_dot_segments, shown_text
from vb_batch.io.uri import MAX_URI_CHARS as MAX_URI_CHARS
from vb_batch.io.uri import SCHEME_ALIASES as SCHEME_ALIASES
from vb_batch.io.uri import scheme_of as _input_scheme  # the old name (vb_batch.planning)
from vb_batch.masking import scrub, url_secrets

__all__ = [
    "DEADLINE_FACTOR", "HTTP_SCHEMES", "MAX_REDIRECTS", "MAX_URI_CHARS", "SCHEME_ALIASES", "Address", "Target",
    "check_uri", "is_internal", "parse_uri", "read_uri", "resolve", "shown_text",
]

MAX_REDIRECTS = 5
# Total time for one fetch, as a multiple of input.storage.timeout_s (which bounds each wait).
DEADLINE_FACTOR = 4
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# ---------------------------------------------------------------------------- allow


class Address(NamedTuple):
    ip: str
    internal: bool


def is_internal(ip: str) -> bool:
    """True for any address that is not plainly on the public internet (IPv4 inside IPv6 unwrapped)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64:  # 64:ff9b::a9fe:a9fe reaches 169.254.169.254 through a NAT64 gateway
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return not address.is_global or address.is_multicast


def resolve(host: str, port: int) -> list[Address]:
    """Every address `host` resolves to, each marked internal or not.

    The one place names become addresses: tests swap it (module attribute) to
    make a test name count as public while the fetch itself stays real.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    ips = dict.fromkeys(str(info[4][0]) for info in infos)
    return [Address(ip, is_internal(ip)) for ip in ips]


def _path_under(path: str, base: str) -> bool:
    return not base or path == base or path.startswith(base.rstrip("/") + "/")


def _under(target: Target, prefix: Target) -> bool:
    if target.scheme != prefix.scheme:
        return False
    if target.scheme == "file":
        return _path_under(target.path, prefix.path)
    if prefix.host and target.host != prefix.host:
        return False
    if target.scheme in HTTP_SCHEMES:
        if prefix.host and target.port != prefix.port:
            return False
        # A server may read an escaped "/" or "." either way: both readings must stay inside.
        return _path_under(target.path, prefix.path) and _path_under(
            remove_dot_segments(unquote(target.path)), remove_dot_segments(unquote(prefix.path))
        )
    return _path_under(target.path, prefix.path)


def _permit(target: Target, cfg: InputConfig) -> list[Address]:
    """Raise `uri_not_allowed` unless `target` may be read; for http(s), the checked addresses to connect to."""
    if cfg.allowed_prefixes is None:
        own = _input_scheme(cfg.path)
        if target.scheme != own:
            raise RowError(
                "uri_not_allowed",
                f"{target.shown}: a {target.scheme} URI, but input.path is {own}; list it in input.allowed_prefixes",
            )
    elif not any(p is not None and _under(target, p) for p in map(parse_prefix, cfg.allowed_prefixes)):
        shown = [shown_text(p) for p in cfg.allowed_prefixes]
        raise RowError("uri_not_allowed", f"{target.shown} is outside input.allowed_prefixes [{', '.join(shown)}]")
    if target.scheme not in HTTP_SCHEMES:
        return []
    try:
        addresses = resolve(target.host, target.port)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise RowError("fetch_error", f"{target.shown}: cannot resolve {target.host!r}: {reason}") from None
    if not addresses:
        raise RowError("fetch_error", f"{target.shown}: host {target.host!r} resolves to no address")
    internal = [a.ip for a in addresses if a.internal]
    if internal and not cfg.allow_private_addresses:
        raise RowError(
            "uri_not_allowed",
            f"{target.shown} resolves to internal address {internal[0]}; set input.allow_private_addresses to fetch it",
        )
    return addresses


@contextmanager
def _row_faults(what: Callable[[], str], secrets: Callable[[], set[str]]) -> Iterator[None]:
    """Whatever a fetch raises becomes this row's error; `what` names the URI for the message."""
    try:
        yield
    except RowError:
        raise
    except BodyTooLarge as exc:
        raise _too_large(what(), exc) from None
    except Exception as exc:  # noqa: BLE001 - any client library's fault is this row's, never the job's
        detail = scrub(str(exc), secrets())[:500]
        raise RowError("fetch_error", f"{what()}: {type(exc).__name__}{': ' + detail if detail else ''}") from None


def _secrets(target: Target) -> set[str]:
    """What a library's or server's message must not show of `target`: its query (and each value), user info."""
    user, _, password = target.userinfo.partition(":")
    return (url_secrets(target.uri) | {target.userinfo, user, password}) - {""}


def check_uri(uri: object, cfg: InputConfig) -> str:
    """The canonical URI when it may be read; otherwise a RowError (`uri_invalid`, `uri_not_allowed`, ...)."""
    with _row_faults(lambda: shown_text(uri), lambda: url_secrets(uri) if isinstance(uri, str) else set()):
        target = parse_uri(uri)
        _permit(target, cfg)
        return target.uri


def read_uri(uri: object, cfg: InputConfig) -> bytes:
    """The bytes `uri` names, after the checks of `check_uri`; every fault is a RowError with a code."""
    with _row_faults(lambda: shown_text(uri), lambda: url_secrets(uri) if isinstance(uri, str) else set()):
        target = parse_uri(uri)
        addresses = _permit(target, cfg)
    with _row_faults(lambda: target.shown, lambda: _secrets(target)):
        if target.scheme == "file":
            return _read_local(target, cfg.max_bytes)
        deadline = time.monotonic() + DEADLINE_FACTOR * cfg.storage.timeout_s
        if target.scheme in HTTP_SCHEMES:
            return _read_http(target, addresses, cfg, deadline)
        return _read_store(target, cfg, deadline)


# ---------------------------------------------------------------------------- read


_FILE_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symbolic link",
}


def _regular_file(mode: int, shown: str) -> None:
    if stat.S_ISDIR(mode):
        raise RowError("is_a_directory", f"{shown} is a directory")
    if not stat.S_ISREG(mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise RowError("not_a_file", f"{shown} is {kind}; only regular files are read")


def _read_local(target: Target, limit: int) -> bytes:
    shown = target.shown
    try:
        # stat before open: opening a device can have effects (a tape rewinds), a FIFO could block.
        _regular_file(os.stat(target.path).st_mode, shown)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        fd = os.open(target.path, flags)
        try:
            info = os.fstat(fd)
            _regular_file(info.st_mode, shown)  # what was opened, in case the path changed since the stat
            if info.st_size > limit:
                raise BodyTooLarge(info.st_size, limit)
            return read_at_most(functools.partial(os.read, fd), limit, info.st_size)
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        raise RowError("not_found", f"{shown} does not exist") from None
    except PermissionError:
        raise RowError("permission_denied", f"no permission to read {shown}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RowError("uri_not_allowed", f"{shown} became a symbolic link while it was checked") from None
        if exc.errno == errno.ENXIO:
            raise RowError("not_a_file", f"{shown} is a socket or device; only regular files are read") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise RowError("uri_invalid", f"{shown}: a name in the path is too long") from None
        raise RowError("fetch_error", f"{shown}: {exc.strerror or exc}") from None


# -- http(s)


def _read_http(first: Target, addresses: list[Address], cfg: InputConfig, deadline: float) -> bytes:
    target = first
    for hop in range(MAX_REDIRECTS + 1):
        answer = _http_get(target, addresses, first, cfg, deadline)
        if answer.status in REDIRECT_STATUSES:
            if hop == MAX_REDIRECTS:
                break
            target, addresses = _redirect(target, answer.headers.get("Location"), cfg)
            continue
        if answer.ok:
            return answer.body
        message = f"{target.shown}: HTTP {answer.status} {scrub(answer.reason, _secrets(target))[:100]}".rstrip()
        if answer.status in (404, 410):
            raise RowError("not_found", message)
        if answer.status in (401, 403):
            raise RowError("permission_denied", message)
        raise RowError("fetch_error", message)
    raise RowError("fetch_error", f"{first.shown}: more than {MAX_REDIRECTS} redirects (last to {target.shown})")


def _redirect(current: Target, location: str | None, cfg: InputConfig) -> tuple[Target, list[Address]]:
    if not location:
        raise RowError("fetch_error", f"{current.shown}: a redirect without a Location header")
    hop = f"redirect from {current.shown} to {shown_text(location)}"
    try:
        target = parse_uri(urljoin(current.uri, location.strip()))
        if target.scheme not in HTTP_SCHEMES:
            raise RowError("uri_not_allowed", f"redirects are followed only to http(s), not to {target.scheme}")
        return target, _permit(target, cfg)
    except RowError as err:
        raise RowError(err.code, f"{hop}: {err.message}") from None


def _http_get(target: Target, addresses: list[Address], first: Target, cfg: InputConfig, deadline: float) -> Answer:
    """One GET to the checked addresses; a 2xx body read within the limits, every fault a RowError."""
    timeout_s = cfg.storage.timeout_s
    headers = {"User-Agent": "vb_batch", "Accept": "image/*, */*;q=0.5", "Connection": "close"}
    same_origin = (target.scheme, target.host, target.port) == (first.scheme, first.host, first.port)
    if first.userinfo and same_origin:
        headers["Authorization"] = "Basic " + base64.b64encode(first.userinfo.encode()).decode()
    try:
        return shared_transport().send(
            "GET", target.uri, headers=headers, connect_to=[address.ip for address in addresses],
            timeout_s=timeout_s, max_body_bytes=cfg.max_bytes, deadline=deadline,
        )
    except DeadlinePassed:
        raise _deadline_passed(target, timeout_s) from None
    except ConnectTimedOut:
        raise RowError(
            "fetch_timeout", f"{target.shown}: no connection within {timeout_s:g} s (input.storage.timeout_s)"
        ) from None
    except CertificateRejected as exc:
        raise RowError("fetch_error", f"{target.shown}: TLS certificate not trusted ({exc.detail})") from None
    except BodyTooLarge as exc:  # named here: after a redirect, the hop is what was too large
        raise _too_large(target.shown, exc) from None
    except ReadTimedOut:
        raise RowError(
            "fetch_timeout", f"{target.shown}: no data for {timeout_s:g} s (input.storage.timeout_s)"
        ) from None
    except TransportError as exc:
        detail = scrub(exc.detail, _secrets(target))[:500] or "connection lost"
        cannot = "cannot connect: " if isinstance(exc, ConnectFailed) else ""
        raise RowError("fetch_error", f"{target.shown}: {cannot}{detail}") from None


def _too_large(shown: str, exc: BodyTooLarge) -> RowError:
    size = exc.size if exc.size is not None else f"more than {exc.limit}"
    return RowError("too_large", f"{shown}: {size} bytes exceeds input.max_bytes={exc.limit}")


def _deadline_passed(target: Target, timeout_s: float) -> RowError:
    return RowError(
        "fetch_timeout",
        f"{target.shown}: not complete within {DEADLINE_FACTOR * timeout_s:g} s "
        f"({DEADLINE_FACTOR} x input.storage.timeout_s={timeout_s:g}); raise it for slow servers",
    )


# -- object stores and any other fsspec filesystem


def _read_store(target: Target, cfg: InputConfig, deadline: float) -> bytes:
    fs, path = fsspec_filesystem(target.uri, cfg.storage)
    limit, shown = cfg.max_bytes, target.shown

    def timed() -> dict[str, Any]:
        # Asynchronous filesystems take a total timeout per call (fsspec cancels the request at it).
        return {"timeout": max(deadline - time.monotonic(), 0.001)} if getattr(fs, "async_impl", False) else {}

    try:
        info = fs.info(path, **timed())
        if info.get("type") == "directory":
            raise RowError("is_a_directory", f"{shown} is a directory (a prefix), not an object")
        size = info.get("size")
        if size is not None and size > limit:
            raise BodyTooLarge(size, limit)
        if getattr(fs, "async_impl", False):
            # A ranged read: an object replaced by a bigger one since info() still yields at most limit + 1.
            data = fs.cat_file(path, start=0, end=limit + 1, **timed()) if size != 0 else fs.cat_file(path, **timed())
            if len(data) > limit:
                raise BodyTooLarge(None, limit)
            return data
        with fs.open(path, "rb") as f:
            return read_at_most(f.read, limit, size)
    except fsspec.exceptions.FSTimeoutError:
        raise _deadline_passed(target, cfg.storage.timeout_s) from None
    except FileNotFoundError:
        raise RowError("not_found", f"{shown} does not exist") from None
    except IsADirectoryError:
        raise RowError("is_a_directory", f"{shown} is a directory") from None
    except PermissionError:
        raise RowError("permission_denied", f"no permission to read {shown}") from None
    except OSError as exc:
        detail = scrub(str(exc), _secrets(target))[:500] or type(exc).__name__
        raise RowError("fetch_error", f"{shown}: {detail}") from None
