"""One place that builds filesystems from a URL plus options, for fsspec (bytes) and pyarrow (datasets).

Local paths (and file:// URLs) get the native local filesystems; any other
scheme goes through fsspec with the options passed through, and pyarrow
reaches it through `FSSpecHandler`, so a job never depends on pyarrow reading
endpoints from the environment.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import fsspec
import pyarrow.fs as pafs

from vb_batch.config import StorageOptions


def split_scheme(url: str) -> tuple[str, str]:
    """("s3", "bucket/key") for "s3://bucket/key"; ("file", "/abs/path") for local paths."""
    if "://" in url:
        scheme, _, rest = url.partition("://")
        return scheme.lower(), rest
    return "file", url


def is_local(url: str) -> bool:
    return split_scheme(url)[0] in ("file", "local")


def fsspec_options(scheme: str, storage: StorageOptions | None) -> dict[str, Any]:
    storage = storage or StorageOptions()
    opts = dict(storage.options)
    if scheme in ("s3", "s3a"):
        client = dict(opts.pop("client_kwargs", {}))
        if storage.endpoint_url:
            client["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client["region_name"] = storage.region
        if client:
            opts["client_kwargs"] = client
        if storage.anonymous:
            opts["anon"] = True
        if storage.profile:
            opts["profile"] = storage.profile
    return opts


@functools.lru_cache(maxsize=32)
def _cached_fs(scheme: str, options_json: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file" if scheme == "local" else scheme, **json.loads(options_json))


def fsspec_filesystem(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; one cached instance per scheme and options."""
    scheme, _ = split_scheme(url)
    fs = _cached_fs(scheme, json.dumps(fsspec_options(scheme, storage), sort_keys=True, default=str))
    return fs, fs._strip_protocol(url)


def arrow_filesystem(url: str, storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URL: always explicit, never guessed from the environment."""
    if is_local(url):
        return pafs.LocalFileSystem(), fsspec_filesystem(url)[1]
    fs, path = fsspec_filesystem(url, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
