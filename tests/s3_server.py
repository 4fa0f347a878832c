"""A real S3 protocol server on loopback (moto's server mode) for tests of object storage.

    with s3_server() as s3:                   # starts on 127.0.0.1, a free port; stops on exit
        s3.put("in/images.parquet", data)     # bucket s3.bucket exists, empty
        cfg = {"input": {"path": s3.url("in/images.parquet"), "storage": s3.storage}, ...}

Clients reach it with the fake credentials in `CREDENTIALS`, which tests put
in the environment (`use_fake_credentials(monkeypatch)`) the way a real job
gets its own: the secret is a distinctive string, so a test can scan logs and
outputs for it. Nothing reaches the network: the AWS config files are pointed
away and the instance metadata service is switched off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SECRET = "vbTestSecretKey-9f3c1e7a-do-not-leak"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vbtestaccesskey",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
REGION = "us-east-1"


def use_fake_credentials(monkeypatch) -> None:
    """Put the fake credentials in the environment (undone by monkeypatch); drop any real ones."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    client: Any = field(repr=False)

    @property
    def storage(self) -> dict[str, Any]:
        """`input.storage` / `output.storage` for a job that uses this server (no credentials: the environment's)."""
        return {"endpoint_url": self.endpoint_url, "region": REGION}

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key.lstrip('/')}"

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", []))


@contextlib.contextmanager
def s3_server(bucket: str = "vb-test") -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (a free port) with one empty bucket; stopped on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=SECRET,
        )
        client.create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, client)
    finally:
        server.stop()
