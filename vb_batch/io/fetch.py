"""Reading the image a URI column names, safely: only configured places, never internal addresses, bounded.

What this module guarantees, for any cell of a URI column (any string, null or
not a string at all):

- `check_uri` and `read_uri` raise nothing but `RowError`: a broken or hostile
  URI fails its row, never the job.
- One parse (`parse_uri`) decides what a URI opens (scheme, normalised
  location); the allow check and the reader both use its result, so they
  cannot disagree. Schemes are case-insensitive (`S3://` is `s3://`, `s3a://`
  is `s3://`, `local:` is `file:`).
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
  requested. The connection goes to the very address that was checked (no
  second DNS lookup), while the Host header, TLS SNI and the certificate check
  use the host name. Proxies (`*_proxy` environment variables) are NOT used:
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
image).
"""

from __future__ import annotations

import base64
import errno
import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import quote as _quote
from urllib.parse import unquote, urljoin, urlsplit

import fsspec.exceptions

from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.filesystems import fsspec_filesystem
from vb_batch.masking import scrub, url_secrets

MAX_REDIRECTS = 5
# Total time for one fetch, as a multiple of input.storage.timeout_s (which bounds each wait).
DEADLINE_FACTOR = 4
# Longer cells are not URIs (servers refuse URLs past ~8-64 KiB; paths stop at PATH_MAX).
MAX_URI_CHARS = 65_536
READ_CHUNK = 1 << 20
HTTP_SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
SCHEME_ALIASES = {"local": "file", "s3a": "s3"}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)", re.DOTALL)  # 2+ letters: "c:/x" is no scheme
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# ---------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class Target:
    """What a URI opens: the one parse that both the allow check and the reader use.

    file:  `path` is the real absolute path (symlinks resolved).
    http(s): `host` (lower-case ASCII), `port`, `path` (dot-segments removed,
             percent-encoded as sent), `query` (sent, never shown).
    other schemes (object stores): `host` is the bucket, `path` the key, literally; `query`
             what follows "?" (s3fs reads ?versionId= there), never shown.
    """

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    query: str = field(default="", repr=False)
    userinfo: str = field(default="", repr=False)
    given: str = field(default="", repr=False, compare=False)  # a local path as written, for messages

    @property
    def uri(self) -> str:
        """The full canonical URI (with its query: not for messages)."""
        return self.origin + self.path + (f"?{self.query}" if self.query else "")

    @property
    def origin(self) -> str:
        if self.scheme == "file":
            return "file://"
        if self.scheme in HTTP_SCHEMES:
            host = f"[{self.host}]" if ":" in self.host else self.host
            default = 443 if self.scheme == "https" else 80
            return f"{self.scheme}://{host}" + (f":{self.port}" if self.port and self.port != default else "")
        return f"{self.scheme}://{self.host}/"

    @property
    def shown(self) -> str:
        """The URI for messages: scheme://host/path, never a query string or user info."""
        if self.scheme == "file":
            return self.path if self.given in ("", self.path) else f"{self.given} (-> {self.path})"
        return (self.origin + self.path)[:300]


def shown_text(text: object) -> str:
    """Any cell, as an error message may show it: no query string or user info, not too long."""
    if not isinstance(text, str):
        return f"a {type(text).__name__} cell"
    match = _SCHEME.match(text)
    if match and match.group(1).lower() not in ("file", "local"):
        text = re.split(r"[?#]", text, maxsplit=1)[0]
        text = re.sub(r"^([^/]*//)[^/]*@", r"\1", text)
    return repr(text[:200] + ("..." if len(text) > 200 else ""))


def _invalid(what: str, why: str) -> RowError:
    return RowError("uri_invalid", f"{what}: {why}")


def parse_uri(uri: object) -> Target:
    """The `Target` a URI cell names; `null_uri` / `uri_invalid` RowErrors for cells that name nothing."""
    if uri is None:
        raise RowError("null_uri", "the URI cell is null")
    if not isinstance(uri, str):
        raise _invalid(shown_text(uri), "input.uri_column must hold text (a path or URL)")
    return _parse(uri, prefix=False)


def _parse(text: str, prefix: bool) -> Target:
    what = shown_text(text)
    if not text:
        raise _invalid("''", "the URI is empty")
    if len(text) > MAX_URI_CHARS:
        raise _invalid(what, f"{len(text)} characters; a URI may have at most {MAX_URI_CHARS}")
    if "\x00" in text:
        raise _invalid(what, "contains a NUL character")
    match = _SCHEME.match(text)
    if match is None:
        return _local(text, given=text, what=what)
    scheme = match.group(1).lower()
    scheme = SCHEME_ALIASES.get(scheme, scheme)
    rest = match.group(2)
    try:
        if scheme == "file":
            return _parse_file(rest, text, what)
        if _CONTROL.search(rest):
            raise _invalid(what, "contains control characters")
        if not rest.startswith("//"):
            raise _invalid(what, f"a {scheme}: URI must be {scheme}://...")
        if scheme in HTTP_SCHEMES:
            return _parse_http(scheme, rest, prefix, what)
        return _parse_store(scheme, rest[2:], prefix, what)
    except UnicodeError as exc:  # lone surrogates, IDNA labels too long: not a name anything can open
        raise _invalid(what, f"cannot be encoded ({exc.reason})") from None


def _parse_file(rest: str, text: str, what: str) -> Target:
    """file:/x, file:///x, file://localhost/x, file:////x (all /x); percent-escapes decoded as RFC 8089 says."""
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        if authority.lower() not in ("", "localhost"):
            raise _invalid(
                what, f"file URIs on another host ({authority!r}) are not supported; write file:///absolute/path"
            )
        rest = slash + path
    if not rest.startswith("/"):
        raise _invalid(what, "a file: URI needs an absolute path (file:///absolute/path)")
    path = unquote(rest, errors="strict")
    if "\x00" in path:
        raise _invalid(what, "contains an encoded NUL character")
    return _local(path, given=text, what=what)


def _local(path: str, given: str, what: str) -> Target:
    try:
        encoded = os.fsencode(path)
    except UnicodeError:
        raise _invalid(what, "is not a valid file name on this system") from None
    if len(encoded) >= 4096:
        raise _invalid(what, "a path may have at most 4095 bytes (PATH_MAX)")
    # POSIX gives a leading "//" an implementation-defined meaning; Linux reads it as "/".
    real = os.path.realpath(re.sub(r"^/+", "/", path))
    return Target("file", path=real, given=given)


def _parse_http(scheme: str, rest: str, prefix: bool, what: str) -> Target:
    try:
        parts = urlsplit(f"{scheme}:{rest}")
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", a port that is not a number or out of range
        raise _invalid(what, str(exc)) from None
    netloc_host = parts.netloc.rpartition("@")[2]
    host = parts.hostname or ""
    if netloc_host.startswith("["):
        try:
            if "%" in host:
                raise ValueError("zone id")
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _invalid(what, f"[{host}] is not an IPv6 address (zone ids are not supported)") from None
    elif host:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
        if not _HOST_NAME.fullmatch(host) or ".." in host or len(host) > 253:
            raise _invalid(what, f"{host!r} is not a host name")
    elif not prefix:
        raise _invalid(what, "names no host")
    if port == 0:
        raise _invalid(what, "port 0")
    path = _http_path(parts.path)
    query = _quote(parts.query, safe="/?%!$&'()*+,;=:@")
    userinfo = unquote(parts.netloc.rpartition("@")[0]) if "@" in parts.netloc else ""
    return Target(scheme, host, port or (443 if scheme == "https" else 80), path, query, userinfo)


def _http_path(raw: str) -> str:
    """The path as sent: invalid characters escaped, escapes normalised (RFC 3986 6.2.2), dot-segments removed."""
    path = _quote(raw or "/", safe="/%!$&'()*+,;=:@")
    path = _ESCAPE.sub(_normal_escape, path)
    return _remove_dot_segments(path if path.startswith("/") else "/" + path)


def _normal_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: "." and ".." go, everything else (empty segments too) stays."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            if i == len(segments) - 1:
                kept.append("")  # "/a/.." is the folder "/", not the file "/a"
        else:
            kept.append(segment)
    return "/" + "/".join(kept)


def _parse_store(scheme: str, rest: str, prefix: bool, what: str) -> Target:
    rest, _, query = rest.partition("?")  # s3fs / gcsfs read ?versionId= / ?generation= there: never shown
    bucket, _, key = rest.partition("/")
    if not prefix and not bucket:
        raise _invalid(what, f"names no bucket ({scheme}://bucket/key)")
    if not prefix and not key:
        raise _invalid(what, f"names a bucket, not an object ({scheme}://bucket/key)")
    if any(segment in (".", "..") for segment in key.split("/")):
        raise RowError(
            "uri_not_allowed",
            f"{what}: '.' and '..' are part of an object's name in object storage, so this key cannot be "
            "checked against input.allowed_prefixes; name the object without them",
        )
    return Target(scheme, host=bucket, path=key, query=query)


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


def _input_scheme(path: str) -> str:
    match = _SCHEME.match(path or "")
    if match is None:
        return "file"
    scheme = match.group(1).lower()
    return SCHEME_ALIASES.get(scheme, scheme)


def _prefix(text: str) -> Target | None:
    """An allowed prefix, parsed as URIs are; None for one that cannot match anything."""
    try:
        return _parse(text, prefix=True)
    except RowError:
        return None


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
            _remove_dot_segments(unquote(target.path)), _remove_dot_segments(unquote(prefix.path))
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
    elif not any(p is not None and _under(target, p) for p in map(_prefix, cfg.allowed_prefixes)):
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


def _too_large(shown: str, size: int | str, limit: int) -> RowError:
    return RowError("too_large", f"{shown}: {size} bytes exceeds input.max_bytes={limit}")


def _read_at_most(read: Callable[[int], bytes], limit: int, shown: str, size_hint: int | None = None) -> bytes:
    """Everything `read` gives until it ends, holding at most `limit` bytes (`too_large` past it)."""
    first = read(min(size_hint + 1, limit + 1) if size_hint is not None else min(READ_CHUNK, limit + 1))
    if len(first) > limit:
        raise _too_large(shown, f"more than {limit}", limit)
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
            raise _too_large(shown, f"more than {limit}", limit)
        more = read(min(READ_CHUNK, limit + 1 - buffer.tell()))
    return buffer.getvalue()


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
                raise _too_large(shown, info.st_size, limit)
            return _read_at_most(functools.partial(os.read, fd), limit, shown, info.st_size)
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


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()  # system CAs; SSL_CERT_FILE / SSL_CERT_DIR are honoured


class _CheckedConnection(http.client.HTTPConnection):
    """HTTP(S) to addresses already checked, speaking to the URI's host (Host header, TLS SNI, certificate)."""

    def __init__(self, target: Target, addresses: list[Address], timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self.default_port = 443 if target.scheme == "https" else 80  # the Host header omits it
        self._addresses = addresses
        self._tls = _tls_context() if target.scheme == "https" else None

    def connect(self) -> None:
        error: OSError | None = None
        for address in self._addresses:
            try:
                sock = socket.create_connection((address.ip, self.port), self.timeout)
                break
            except OSError as exc:
                error = exc
        else:
            raise error or OSError("no address to connect to")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._tls.wrap_socket(sock, server_hostname=self.host) if self._tls else sock


class _Watchdog:
    """Shuts a socket down at the fetch deadline: wakes a read that a dripping server keeps alive."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire, [sock])
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, sock: socket.socket) -> None:
        self.fired = True
        try:
            # The plain socket's shutdown, also under TLS: the TLS one would tear down state a reader is using.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def _read_http(first: Target, addresses: list[Address], cfg: InputConfig, deadline: float) -> bytes:
    target = first
    for hop in range(MAX_REDIRECTS + 1):
        status, reason, location, body = _http_get(target, addresses, first, cfg, deadline)
        if status in REDIRECT_STATUSES:
            if hop == MAX_REDIRECTS:
                break
            target, addresses = _redirect(target, location, cfg)
            continue
        if 200 <= status < 300:
            return body
        message = f"{target.shown}: HTTP {status} {scrub(reason, _secrets(target))[:100]}".rstrip()
        if status in (404, 410):
            raise RowError("not_found", message)
        if status in (401, 403):
            raise RowError("permission_denied", message)
        raise RowError("fetch_error", message)
    raise RowError("fetch_error", f"{first.shown}: more than {MAX_REDIRECTS} redirects (last to {target.shown})")


def _redirect(current: Target, location: str | None, cfg: InputConfig) -> tuple[Target, list[Address]]:
    if not location:
        raise RowError("fetch_error", f"{current.shown}: a redirect without a Location header")
    hop = f"redirect from {current.shown} to {shown_text(location)}"
    try:
        target = _parse(urljoin(current.uri, location.strip()), prefix=False)
        if target.scheme not in HTTP_SCHEMES:
            raise RowError("uri_not_allowed", f"redirects are followed only to http(s), not to {target.scheme}")
        return target, _permit(target, cfg)
    except RowError as err:
        raise RowError(err.code, f"{hop}: {err.message}") from None


def _http_get(
    target: Target, addresses: list[Address], first: Target, cfg: InputConfig, deadline: float
) -> tuple[int, str, str | None, bytes]:
    """One request: (status, reason, Location, body); the body only for a 2xx answer, read within the limits."""
    timeout_s = cfg.storage.timeout_s
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _deadline_passed(target, timeout_s)
    conn = _CheckedConnection(target, addresses, timeout=min(timeout_s, remaining))
    watchdog = None
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise RowError(
                "fetch_timeout", f"{target.shown}: no connection within {timeout_s:g} s (input.storage.timeout_s)"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise RowError(
                "fetch_error", f"{target.shown}: TLS certificate not trusted ({exc.verify_message})"
            ) from None
        except OSError as exc:
            raise RowError("fetch_error", f"{target.shown}: cannot connect: {exc.strerror or exc}") from None
        watchdog = _Watchdog(conn.sock, deadline - time.monotonic())
        headers = {"User-Agent": "vb_batch", "Accept": "image/*, */*;q=0.5", "Connection": "close"}
        same_origin = (target.scheme, target.host, target.port) == (first.scheme, first.host, first.port)
        if first.userinfo and same_origin:
            headers["Authorization"] = "Basic " + base64.b64encode(first.userinfo.encode()).decode()
        try:
            conn.request("GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers)
            response = conn.getresponse()
            if not 200 <= response.status < 300:
                return response.status, response.reason, response.getheader("Location"), b""
            declared = response.length  # None when the server does not say (chunked, or until close)
            if declared is not None and declared > cfg.max_bytes:
                raise _too_large(target.shown, declared, cfg.max_bytes)
            body = _read_at_most(response.read, cfg.max_bytes, target.shown, declared)
        except (OSError, http.client.HTTPException) as exc:
            if watchdog.fired:
                raise _deadline_passed(target, timeout_s) from None
            if isinstance(exc, TimeoutError):
                raise RowError(
                    "fetch_timeout", f"{target.shown}: no data for {timeout_s:g} s (input.storage.timeout_s)"
                ) from None
            detail = scrub(str(exc), _secrets(target))[:500] or "connection lost"
            raise RowError("fetch_error", f"{target.shown}: {type(exc).__name__}: {detail}") from None
        if watchdog.fired:  # the body may look complete when the connection was cut at the deadline
            raise _deadline_passed(target, timeout_s)
        return response.status, response.reason, None, body
    finally:
        if watchdog is not None:
            watchdog.cancel()
        conn.close()


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
            raise _too_large(shown, size, limit)
        if getattr(fs, "async_impl", False):
            # A ranged read: an object replaced by a bigger one since info() still yields at most limit + 1.
            data = fs.cat_file(path, start=0, end=limit + 1, **timed()) if size != 0 else fs.cat_file(path, **timed())
            if len(data) > limit:
                raise _too_large(shown, f"more than {limit}", limit)
            return data
        with fs.open(path, "rb") as f:
            return _read_at_most(f.read, limit, shown, size)
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
