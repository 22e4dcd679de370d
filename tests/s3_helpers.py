"""A real S3 server for the tests: SeaweedFS, started once per session (warmboot/devservices/seaweedfs.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from warmboot.devservices import seaweedfs
from warmboot.worker.snapshot_remote import S3Settings


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Settings]:
    with seaweedfs.s3_server() as settings:
        yield settings
