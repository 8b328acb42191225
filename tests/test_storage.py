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
        storage.configure(storage.Options(endpoint_url="http://127.0.0.1:9"))
        storage.check_writable("s3://bucket/prefix")
    assert "s3://bucket/prefix" in str(e.value) and "AWS_ENDPOINT_URL" in str(e.value)
    assert "topsecret-value-123" not in str(e.value), "never echo credentials"


@pytest.fixture
def silent_endpoint(monkeypatch):
    """http://127.0.0.1:PORT of a TCP server that accepts connections and never answers (issue 17)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    # credentials from the environment: the SDK would otherwise also probe the EC2 metadata service
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "silent-endpoint-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    server.close()
    for conn in held:
        conn.close()


def _within(seconds: float, fn) -> BaseException | None:
    """Run ``fn`` in a thread; its exception, or a failure when it has not returned within ``seconds``."""
    import threading

    outcome: list = []

    def target() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still waiting after {seconds} s on an endpoint that never answers")
    return outcome[0]


def test_check_of_a_silent_endpoint_fails_fast_naming_it(silent_endpoint, caplog):
    caplog.set_level("INFO", logger="mpformer_ray")
    storage.configure(storage.Options(endpoint_url=silent_endpoint))
    error = _within(30, lambda: storage.check_writable("s3://bucket/runs/x"))
    assert isinstance(error, storage.StorageError)
    assert silent_endpoint in str(error) and "s3://bucket/runs/x" in str(error) and "no answer within" in str(error)
    assert "Fix: point AWS_ENDPOINT_URL / storage.endpoint_url" in str(error)
    assert "silent-endpoint-secret" not in str(error)
    assert f"S3 endpoint {silent_endpoint} answers for s3://bucket/runs/x" in caplog.text  # said before waiting


def test_training_preflight_on_a_silent_endpoint_fails_fast(silent_endpoint, tmp_path, synthetic_coco):
    from mpformer_ray.config import load_config
    from mpformer_ray.data.coco import convert_coco
    from mpformer_ray.train import PreflightError, preflight

    train = str(tmp_path / "train")
    convert_coco(str(synthetic_coco), "val", train, task="panoptic", shard_size=4, num_workers=1, progress=False)
    cfg = load_config("tiny", [f"data.train={train}", "data.val=", "storage.uri=s3://bucket/runs",
                               f"storage.endpoint_url={silent_endpoint}"])
    error = _within(30, lambda: preflight(cfg))
    assert isinstance(error, PreflightError), error
    assert str(error).startswith("storage.uri='s3://bucket/runs': s3://bucket/runs/") and silent_endpoint in str(error)
    assert "no answer within" in str(error) and "Fix:" in str(error)


def test_a_storage_option_set_once_reaches_every_reader_and_writer(moto_server, synthetic_coco, tmp_path, monkeypatch):
    """``storage.region`` in the config, set once: every S3 client the records, checkpoints and preflight
    open is made for that region (Ray workers: tests/test_job_submit.py)."""
    from mpformer_ray.config import load_config
    from mpformer_ray.data.coco import convert_coco
    from mpformer_ray.data.records import read_records
    from mpformer_ray.train import Checkpoint, CheckpointStore, load_checkpoint, preflight

    regions: list[str] = []
    make = storage._s3.__wrapped__
    monkeypatch.setattr(storage, "_s3", lambda endpoint, region, check=False: regions.append(region)
                        or make(endpoint, region, check))
    root = f"s3://{moto_server['bucket']}/region-{tmp_path.name}"
    cfg = load_config("tiny", ["storage.region=eu-west-3", f"storage.uri={root}/runs", f"data.train={root}/val",
                               "data.val=", "model.num_classes=6"])
    storage.configure(cfg.storage)
    assert storage.options().region == "eu-west-3" and storage.env_vars()  # what Ray workers inherit

    convert_coco(str(synthetic_coco), "val", f"{root}/val", task="panoptic", shard_size=2, num_workers=1,
                 progress=False)
    assert len(list(read_records(f"{root}/val"))) == 4
    store = CheckpointStore(f"{root}/runs/direct")
    saved = store.save(Checkpoint(iteration=1, model={}))
    assert load_checkpoint(saved).iteration == 1 and store.latest() == saved
    preflight(cfg)
    assert len(regions) > 10 and set(regions) == {"eu-west-3"}, regions

    storage.configure()  # back to the environment's
    storage.resolve(f"{root}/x")
    assert regions[-1] == "us-east-1"
