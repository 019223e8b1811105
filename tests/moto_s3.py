"""A real S3-compatible server (moto) on loopback, and presigned PUT URLs for it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

BUCKET = "easel-results"


@contextmanager
def moto_s3() -> Iterator[tuple[Any, str]]:
    """(boto3 S3 client, "127.0.0.1:PORT") with ``BUCKET`` created."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    client = boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client, f"{host}:{port}"
    finally:
        server.stop()


def presigned_put(client: Any, key: str, content_type: str) -> str:
    url: str = client.generate_presigned_url(
        "put_object", Params={"Bucket": BUCKET, "Key": key, "ContentType": content_type}, ExpiresIn=300
    )
    return url
