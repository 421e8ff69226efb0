"""An S3-compatible server on 127.0.0.1 for tests: moto's server in its own process, with IAM authentication on,
so that a request without valid credentials is refused as a real bucket would refuse it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REGION = "us-east-1"
# moto lets this many requests through unauthenticated: the IAM set-up below, then every request must be signed
# with the key it creates.
SETUP_REQUESTS = 3


@dataclass(frozen=True)
class S3:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def uri(self, prefix: str) -> str:
        """`s3://bucket/prefix?endpoint_override=...`, the form Ray's and pyarrow's storage docs use."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that may use the bucket."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(log_dir: Path, bucket: str = "raygan") -> Iterator[S3]:
    """Starts `moto.server` on a free port, creates an IAM user with full S3 access and `bucket`, and stops the
    server afterwards."""
    import boto3

    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=open(log_dir / "moto.log", "wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {(log_dir / 'moto.log').read_text()[-2000:]}"
                                       ) from err
                time.sleep(0.3)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="raygan")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="raygan", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="raygan")["AccessKey"]
        server = S3(endpoint=endpoint, bucket=bucket, access_key=key["AccessKeyId"],
                    secret_key=key["SecretAccessKey"])
        server.client().create_bucket(Bucket=bucket)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=30)
