"""Uploads to presigned PUT URLs of a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from PIL import Image

from server.config import DeliveryConfig
from server.delivery import make_client, put_upload
from tests.moto_s3 import BUCKET, moto_s3, presigned_put


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[Any, str]]:
    """(boto3 S3 client, "127.0.0.1:PORT") for a moto server started for this module."""
    with moto_s3() as pair:
        yield pair


def encoded(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, fmt)
    return buf.getvalue()


def test_png_reaches_the_bucket_with_its_content_type(s3: tuple[Any, str]) -> None:
    client, host_port = s3
    data = encoded("PNG", (10, 200, 30))
    url = presigned_put(client, "jobs/1/0.png", "image/png")
    outcome = anyio.run(put_upload, url, data, "image/png", DeliveryConfig(allowed_hosts=[host_port]))
    assert outcome.ok and outcome.status == 200 and outcome.attempts == 1
    stored = client.get_object(Bucket=BUCKET, Key="jobs/1/0.png")
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "image/png"


def test_batch_of_uploads_shares_one_client(s3: tuple[Any, str]) -> None:
    client, host_port = s3
    cfg = DeliveryConfig(allowed_hosts=[host_port])
    images = {f"jobs/2/{i}.jpg": encoded("JPEG", (i * 60, 0, 0)) for i in range(3)}

    async def upload_all() -> list[bool]:
        async with make_client(cfg) as http:
            results = []
            for key, data in images.items():
                outcome = await put_upload(presigned_put(client, key, "image/jpeg"), data, "image/jpeg", cfg, client=http)
                results.append(outcome.ok)
            return results

    assert anyio.run(upload_all) == [True, True, True]
    for key, data in images.items():
        stored = client.get_object(Bucket=BUCKET, Key=key)
        assert stored["Body"].read() == data and stored["ContentType"] == "image/jpeg"


def test_presigned_url_refused_without_allow_list_entry(s3: tuple[Any, str]) -> None:
    client, _ = s3
    url = presigned_put(client, "jobs/3/0.png", "image/png")
    outcome = anyio.run(put_upload, url, b"x", "image/png", DeliveryConfig())
    assert not outcome.ok and outcome.error is not None and "loopback" in outcome.error
    assert "X-Amz-Signature" not in outcome.error
    with pytest.raises(client.exceptions.NoSuchKey):
        client.get_object(Bucket=BUCKET, Key="jobs/3/0.png")


def test_content_type_other_than_signed_is_rejected_with_a_hint(s3: tuple[Any, str]) -> None:
    client, host_port = s3
    url = presigned_put(client, "jobs/4/0.png", "image/png")
    outcome = anyio.run(put_upload, url, b"x", "image/jpeg", DeliveryConfig(allowed_hosts=[host_port]))
    assert not outcome.ok and outcome.status == 403 and outcome.attempts == 1  # a 403 is not retried
    assert outcome.error is not None
    assert "SignatureDoesNotMatch" in outcome.error and "Content-Type other than image/jpeg" in outcome.error
