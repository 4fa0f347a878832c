"""Reading the image a URI column names, safely: only configured places, never internal addresses.

A URI is fetched only when, after normalisation (`..` resolved, symlinks
followed for local files), it lies under one of `input.allowed_prefixes`
(default: the input's own location scheme, e.g. only local files for a local
job). `http(s)` URIs must also not resolve to a loopback, link-local, private
or otherwise internal address (cloud metadata services live there) unless
`input.allow_private_addresses` is set. Anything else is a per-row
`uri_not_allowed` error, and nothing is requested.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
from urllib.parse import urlsplit

from vb_batch.config import InputConfig
from vb_batch.errors import RowError
from vb_batch.io.filesystems import fsspec_filesystem, split_scheme


def canonical(uri: str) -> str:
    """`scheme://normalised/path`; local paths become `file:///real/path` (symlinks resolved)."""
    scheme, rest = split_scheme(uri)
    if scheme in ("file", "local"):
        return "file://" + os.path.realpath(rest if not rest.startswith("//") else rest[2:])
    if scheme in ("http", "https"):
        parts = urlsplit(uri)
        path = posixpath.normpath(parts.path or "/")
        return f"{scheme}://{parts.netloc.lower()}{path}{'?' + parts.query if parts.query else ''}"
    bucket, _, key = rest.partition("/")
    return f"{scheme}://{bucket}/{posixpath.normpath(key) if key else ''}".rstrip("/")


def _under(uri: str, prefix: str) -> bool:
    base = canonical(prefix)
    return uri == base or uri.startswith(base.rstrip("/") + "/") or (prefix.endswith("://") and uri.startswith(prefix))


def internal_address(host: str) -> str | None:
    """The internal address `host` resolves to, or None when every address is public."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return None  # unresolvable: the fetch fails on its own, and nothing internal is reached
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
            return str(ip)
    return None


def check_uri(uri: str, cfg: InputConfig) -> str:
    """The canonical URI when it may be fetched; otherwise a `uri_not_allowed` RowError."""
    target = canonical(uri)
    allowed = cfg.allowed_prefixes
    if allowed is None:
        scheme = split_scheme(cfg.path or "")[0]
        if split_scheme(uri)[0] != scheme:
            raise RowError("uri_not_allowed", f"{uri!r}: another scheme than input.path's; see input.allowed_prefixes")
    elif not any(_under(target, prefix) for prefix in allowed):
        raise RowError("uri_not_allowed", f"{uri!r} is outside input.allowed_prefixes {allowed}")
    scheme = split_scheme(uri)[0]
    if scheme in ("http", "https") and not cfg.allow_private_addresses:
        host = urlsplit(uri).hostname or ""
        address = internal_address(host)
        if address is not None:
            raise RowError(
                "uri_not_allowed",
                f"{uri!r} resolves to internal address {address}; set input.allow_private_addresses to fetch it",
            )
    return target


def read_uri(uri: str | None, cfg: InputConfig) -> bytes:
    """The bytes `uri` names, after `check_uri`; faults are per-row errors with a code."""
    if uri is None:
        raise RowError("null_uri", "the URI cell is null")
    check_uri(uri, cfg)
    fs, path = fsspec_filesystem(uri, cfg.storage)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RowError("not_found", f"{uri!r} does not exist") from None
    except IsADirectoryError:
        raise RowError("is_a_directory", f"{uri!r} is a directory") from None
    except PermissionError:
        raise RowError("permission_denied", f"no permission to read {uri!r}") from None
    except OSError as exc:
        raise RowError("fetch_error", f"{uri!r}: {exc}") from None
