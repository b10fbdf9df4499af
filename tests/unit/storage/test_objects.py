"""Object store retries: transient errors are retried with backoff, others fail at once (a hand-written fake)."""

from __future__ import annotations

import pytest
import urllib3
from minio.error import S3Error

from pipeline.config import S3Settings
from pipeline.storage.objects import ObjectStore, ObjectStoreError


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} happened", "/adapters/x", "req", "host")


class Flaky:
    """Fails with the given errors, then returns ``value``."""

    def __init__(self, errors, value="ok"):
        self.errors = list(errors)
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


@pytest.fixture
def store():
    return ObjectStore(S3Settings(endpoint="127.0.0.1:1"), attempts=4, backoff_s=0.001)


@pytest.mark.parametrize("code", ["SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout"])
def test_transient_s3_errors_are_retried(store, code):
    fn = Flaky([s3_error(code), s3_error(code)])
    assert store._call("x", fn) == "ok" and fn.calls == 3


@pytest.mark.parametrize("code", ["AccessDenied", "NoSuchBucket", "NoSuchKey", "InvalidAccessKeyId"])
def test_other_s3_errors_fail_at_once(store, code):
    fn = Flaky([s3_error(code)])
    with pytest.raises(S3Error):
        store._call("x", fn)
    assert fn.calls == 1


def test_connection_errors_are_retried_then_reported(store):
    fn = Flaky([urllib3.exceptions.MaxRetryError(None, "/", "refused")] * 4)
    with pytest.raises(ObjectStoreError, match=r"127\.0\.0\.1:1"):
        store._call("put x", fn)
    assert fn.calls == 4
