"""One place that builds filesystems from a URL plus options, for fsspec (bytes) and pyarrow (datasets).

Local paths (and file:// URLs) get the native local filesystems. `s3://`
gets s3fs for fsspec and pyarrow's native `S3FileSystem` for datasets, both
built from the same `StorageOptions` (endpoint, region, anonymous, profile),
so a job never depends on pyarrow reading endpoints from the environment
(it ignores AWS_ENDPOINT_URL). Any other scheme goes through fsspec with the
options passed through, and pyarrow reaches it through `FSSpecHandler`.

Credentials: `storage.profile` is resolved through botocore; otherwise both
clients use the AWS default chain (environment, config files, instance role),
so on a cluster every worker uses its own and no secret travels with a job.
Keys in `storage.options` (`key`, `secret`, `token`) work too but are
discouraged; they are masked wherever a config is logged or stored.
"""

from __future__ import annotations

import functools
import os
import posixpath
from typing import Any

import fsspec
from fsspec.core import url_to_fs
import pyarrow.fs as pafs

from vb_batch.config import ConfigError, StorageOptions

S3_SCHEMES = ("s3", "s3a")


def split_scheme(url: str) -> tuple[str, str]:
    """("s3", "bucket/key") for "s3://bucket/key"; ("file", "/abs/path") for local paths."""
    if "://" in url:
        scheme, _, rest = url.partition("://")
        return scheme.lower(), rest
    return "file", url


def is_local(url: str) -> bool:
    return split_scheme(url)[0] in ("file", "local")


def canonical_location(url: str, storage: StorageOptions | None = None) -> str:
    """One spelling per place: local paths made absolute with symlinks resolved, `s3a://` as `s3://`,
    `.`/`..`/`//` collapsed, no trailing slash, and an object store's endpoint in front (the same
    bucket name on two endpoints is two places). For comparing locations, never for opening them.
    """
    scheme, rest = split_scheme(url)
    if scheme in ("file", "local"):
        return os.path.realpath(rest[2:] if rest.startswith("//") else rest)
    if scheme in S3_SCHEMES:
        scheme = "s3"
    endpoint = ((storage.endpoint_url if storage else None) or "").rstrip("/").lower()
    path = posixpath.normpath("/" + rest).lstrip("/")
    return f"{scheme}://{endpoint}|{path}".rstrip("/")


def check_bucket(url: str, storage: StorageOptions | None, field: str) -> None:
    """Refuse an object-store URL whose bucket does not exist: vb_batch never creates buckets (s3fs would)."""
    scheme, rest = split_scheme(url)
    if scheme not in S3_SCHEMES:
        return
    bucket = rest.split("/", 1)[0]
    fs, _ = fsspec_filesystem(url, storage)
    if not bucket or not fs.exists(bucket):
        raise ConfigError(f"{field}: bucket {bucket!r} does not exist; vb_batch never creates buckets: create it "
                          f"(or check {field} and its storage.endpoint_url)")


def fsspec_options(scheme: str, storage: StorageOptions | None) -> dict[str, Any]:
    storage = storage or StorageOptions()
    opts = dict(storage.options)
    if scheme in S3_SCHEMES:
        # pyarrow writes what s3fs then lists and moves (the sink): a listing cache would go stale.
        opts.setdefault("use_listings_cache", False)
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
        config = dict(opts.pop("config_kwargs", {}))
        config.setdefault("retries", {"max_attempts": storage.max_attempts, "mode": "standard"})
        config.setdefault("connect_timeout", storage.timeout_s)
        config.setdefault("read_timeout", storage.timeout_s)
        opts["config_kwargs"] = config
    return opts


def fsspec_filesystem(url: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL; fsspec keeps one instance per protocol and options."""
    scheme, _ = split_scheme(url)
    return url_to_fs(url, **fsspec_options(scheme, storage))


def s3_credentials(storage: StorageOptions) -> dict[str, str]:
    """Keys for pyarrow when they are not left to the AWS default chain: explicit options, or a profile."""
    opts = storage.options
    if opts.get("key") or opts.get("secret"):
        keys = {"access_key": opts.get("key"), "secret_key": opts.get("secret"), "session_token": opts.get("token")}
        return {k: v for k, v in keys.items() if v}
    if storage.profile:
        import botocore.exceptions
        import botocore.session

        try:
            found = botocore.session.Session(profile=storage.profile).get_credentials()
        except botocore.exceptions.ProfileNotFound as exc:
            raise ConfigError(f"storage.profile: {exc}") from None
        if found is None:
            raise ConfigError(f"storage.profile: profile {storage.profile!r} has no credentials")
        frozen = found.get_frozen_credentials()
        keys = {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}
        return {k: v for k, v in keys.items() if v}
    return {}


@functools.lru_cache(maxsize=32)
def _cached_s3(options_json: str) -> pafs.S3FileSystem:
    storage = StorageOptions.model_validate_json(options_json)
    kwargs: dict[str, Any] = {"anonymous": storage.anonymous}
    if storage.endpoint_url:
        kwargs["endpoint_override"] = storage.endpoint_url  # "http://host:port" sets the scheme too
    if storage.region:
        kwargs["region"] = storage.region
    if not storage.anonymous:
        kwargs.update(s3_credentials(storage))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts)
    kwargs["connect_timeout"] = kwargs["request_timeout"] = storage.timeout_s
    return pafs.S3FileSystem(**kwargs)


def arrow_filesystem(url: str, storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URL: always explicit, never guessed from the environment."""
    if is_local(url):
        return pafs.LocalFileSystem(), fsspec_filesystem(url)[1]
    scheme, path = split_scheme(url)
    if scheme in S3_SCHEMES:
        return _cached_s3((storage or StorageOptions()).model_dump_json()), path.rstrip("/")
    fs, path = fsspec_filesystem(url, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def delta_storage_options(url: str, storage: StorageOptions | None = None) -> dict[str, str]:
    """deltalake's `storage_options` for a table URL (delta-rs has its own object store client).

    Built from the same `StorageOptions` as the other two clients; without
    explicit keys or a profile, delta-rs takes credentials from the
    environment (the AWS default chain), as pyarrow and s3fs do.
    """
    if split_scheme(url)[0] not in S3_SCHEMES:
        return {}
    storage = storage or StorageOptions()
    opts: dict[str, str] = {}
    if storage.endpoint_url:
        opts["AWS_ENDPOINT_URL"] = storage.endpoint_url
        if storage.endpoint_url.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    if storage.region:
        opts["AWS_REGION"] = storage.region
    if storage.anonymous:
        opts["AWS_SKIP_SIGNATURE"] = "true"
        return opts
    names = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY", "session_token": "AWS_SESSION_TOKEN"}
    opts.update({names[k]: v for k, v in s3_credentials(storage).items()})
    return opts


def iceberg_io_properties(storage: StorageOptions | None = None) -> dict[str, str]:
    """pyiceberg FileIO properties (`s3.*`) from `StorageOptions`; a catalog's own properties override them."""
    storage = storage or StorageOptions()
    props: dict[str, str] = {}
    if storage.endpoint_url:
        props["s3.endpoint"] = storage.endpoint_url
    if storage.region:
        props["s3.region"] = storage.region
    if storage.anonymous:
        props["s3.anonymous"] = "true"
        return props
    names = {"access_key": "s3.access-key-id", "secret_key": "s3.secret-access-key", "session_token": "s3.session-token"}
    props.update({names[k]: v for k, v in s3_credentials(storage).items()})
    return props
