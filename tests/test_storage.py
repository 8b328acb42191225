"""The one storage layer on local paths and on a real S3-compatible server (moto, 127.0.0.1)."""

import os

import pytest

from mpformer_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    server = request.getfixturevalue("moto_server")
    return f"s3://{server['bucket']}/storage-test-{os.getpid()}-{tmp_path.name}"


def test_write_read_list_delete(root):
    uri = storage.join(root, "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"payload")
    storage.write_bytes(storage.join(root, "a", "c.bin"), b"second")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"payload"
    assert storage.listdir(storage.join(root, "a")) == ["b.bin", "c.bin"]
    storage.write_bytes(uri, b"replaced")
    assert storage.read_bytes(uri) == b"replaced"
    storage.check_writable(root)
    assert storage.listdir(root) == ["a"], "the write probe must clean up after itself"
    storage.delete(storage.join(root, "a"))
    assert storage.listdir(storage.join(root, "a")) == []
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.read_bytes(uri)


def test_local_writes_leave_no_partial_files(tmp_path):
    target = tmp_path / "x.bin"
    storage.write_bytes(str(target), b"1" * 1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_bad_uris_and_unreachable_endpoint_name_the_problem(monkeypatch):
    with pytest.raises(storage.StorageError, match="gs://b/x"):
        storage.resolve("gs://b/x")
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.resolve("s3://")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecret-value-123")
    with pytest.raises(storage.StorageError) as e:
        storage.check_writable("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    assert "s3://bucket/prefix" in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    assert "topsecret-value-123" not in str(e.value), "never echo credentials"
