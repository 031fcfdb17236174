"""A real S3 API on 127.0.0.1 for tests: moto's threaded server with IAM authentication switched on.

Use the ``s3`` fixture (import it into a test module): it yields an :class:`S3Server` with a bucket,
an IAM user whose key may do anything in S3, and the environment a process needs to reach it
(``AWS_ENDPOINT_URL`` + the key). Requests signed with any other key are refused, so wrong
credentials are really wrong. Tests skip when moto / s3fs / fsspec are not installed
(``pip install -e '.[cloud]'``). No traffic leaves loopback.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass

import pytest

BUCKET = "align-pro-test"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    key: str
    secret: str

    def env(self, **extra: str) -> dict[str, str]:
        """Environment variables that point boto/s3fs at this server with valid credentials."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            **extra,
        }

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (sorted)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset_fsspec_cache() -> None:
    """Forget cached S3 filesystems (they hold the credentials they were created with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 + IAM server on 127.0.0.1 with auth on; sets the AWS environment of this process."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    pytest.importorskip("fsspec")
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its auth switch and its accounts per process: an earlier test module's server
    # left them behind, so start from a clean state.
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    requests.post(f"{endpoint}/moto-api/reset", timeout=10).raise_for_status()
    try:
        # Set-up requests run before authentication is switched on (moto counts them).
        boot = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="boot", aws_secret_access_key="x")
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="trainer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="trainer", PolicyName="s3-all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        boto3.client("s3", **boot).create_bucket(Bucket=BUCKET)
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        srv = S3Server(endpoint, BUCKET, key["AccessKeyId"], key["SecretAccessKey"])
        saved = {k: os.environ.get(k) for k in srv.env()}
        os.environ.update(srv.env())
        reset_fsspec_cache()
        yield srv
    finally:
        for k, v in locals().get("saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        server.stop()
