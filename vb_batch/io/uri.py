"""What a URI cell names: the one parse that both the allow check and the reader of `vb_batch.io.fetch` use.

- `parse_uri` takes any cell (any string, null or not a string at all) and
  gives a `Target` or raises a `RowError` (`null_uri`, `uri_invalid`, and
  `uri_not_allowed` for an object key that cannot be checked); nothing else.
- Schemes are case-insensitive (`S3://` is `s3://`, `s3a://` is `s3://`,
  `local:` is `file:`).
- Local paths are made absolute with `..` and symlinks resolved; `file:` URIs
  are percent-decoded (RFC 8089). http(s) paths are percent-encoded as they
  will be sent, escapes normalised and dot-segments removed (RFC 3986); hosts
  lower-case ASCII (IDNA), IPv6 without zone ids. Object-store keys are taken
  literally, and a key with `.` or `..` segments is refused (stores keep them
  as part of the name).
- `Target.shown` and `shown_text` are what messages may show: scheme://host/path,
  never a query string (signed-URL secrets) or user info.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from urllib.parse import quote as _quote
from urllib.parse import unquote, urlsplit

from vb_batch.errors import RowError

# Longer cells are not URIs (servers refuse URLs past ~8-64 KiB; paths stop at PATH_MAX).
MAX_URI_CHARS = 65_536
HTTP_SCHEMES = ("http", "https")
SCHEME_ALIASES = {"local": "file", "s3a": "s3"}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(.*)", re.DOTALL)  # 2+ letters: "c:/x" is no scheme
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?\.?")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


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
    return remove_dot_segments(path if path.startswith("/") else "/" + path)


def _normal_escape(match: re.Match) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def remove_dot_segments(path: str) -> str:
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



def scheme_of(path: str) -> str:
    """The scheme a path or URI names, aliases resolved (`S3a://b/k` is s3; a plain path is file)."""
    match = _SCHEME.match(path or "")
    if match is None:
        return "file"
    scheme = match.group(1).lower()
    return SCHEME_ALIASES.get(scheme, scheme)



def parse_prefix(text: str) -> Target | None:
    """An allowed prefix (`input.allowed_prefixes`), parsed as URIs are; None for one that cannot match anything."""
    try:
        return _parse(text, prefix=True)
    except RowError:
        return None
