"""One storage layer for records, checkpoints and Tune: local paths and ``s3://`` URIs.

Everything goes through ``pyarrow.fs`` so Ray Data (``read_parquet(filesystem=...)``)
and Ray Train (``RunConfig(storage_filesystem=...)``) share the exact same client.

Callers pass only URIs. How to reach S3 (``Options``: endpoint, region) is set once per process with
``configure`` from the config's ``storage`` section, and kept in the environment variable ``ENV_VAR`` so
that processes started from this one (local Ray, Ray workers through ``env_vars()`` in the job's runtime
environment, conversion workers) read the same. Unset options fall back to the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), else AWS's defaults. Credentials come only
from the standard AWS environment variables / config files; nothing here logs or stores them.

Transfers wait up to a minute per request, with the SDK's retries. The checks a job runs before it
starts (``check_reachable``, ``check_writable``) make one attempt that waits ``CHECK_TIMEOUT_S``: an
endpoint that accepts connections and never answers fails them in seconds with a message naming it,
where a transfer's timeout times the retries would hang the job for minutes without a word.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import posixpath
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from mpformer_ray.errors import UserError

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 10


class StorageError(UserError, RuntimeError):
    """A URI cannot be reached or read; the message names the URI and the fix."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri).expanduser().joinpath(*parts))


@dataclasses.dataclass(frozen=True)
class Options:
    """How this process reaches S3; a field left None falls back to the standard AWS variable."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL, else AWS's default endpoint
    region: str | None = None  # else AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1

    def endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None

    def s3_region(self) -> str:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"

    def endpoint_name(self) -> str:
        return self.endpoint() or "AWS's default endpoint"


ENV_VAR = "MPFORMER_STORAGE"


def configure(settings: object | None = None) -> Options:
    """Set this process's storage options from ``settings``: the config's ``storage`` section, or any object
    with ``Options``' fields as attributes; None: the AWS variables alone. Kept in ``ENV_VAR``, which
    processes started later inherit (``env_vars`` carries it to Ray workers)."""
    opts = Options(**{f.name: getattr(settings, f.name, None) for f in dataclasses.fields(Options)})
    if opts == Options():
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = json.dumps(dataclasses.asdict(opts))
    return opts


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> Options:
    try:
        return Options(**json.loads(raw))
    except (ValueError, TypeError) as e:
        raise StorageError(f"environment variable {ENV_VAR}={raw!r} is not valid storage options ({e}); unset "
                           "it, or set the storage.* fields of the config instead") from None


def options() -> Options:
    """This process's storage options (``configure``)."""
    raw = os.environ.get(ENV_VAR)
    return _parse(raw) if raw else Options()


def env_vars() -> dict[str, str]:
    """The environment variables that give a Ray worker this process's storage options."""
    return {ENV_VAR: os.environ[ENV_VAR]} if ENV_VAR in os.environ else {}


@functools.lru_cache(maxsize=8)
def _s3(endpoint_url: str | None, region: str, check: bool = False) -> pafs.S3FileSystem:
    """The S3 client for transfers, or with ``check`` the one for pre-start checks (see the module docstring)."""
    kwargs = {"region": region}
    if endpoint_url:
        scheme, _, host = endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if check:
        return pafs.S3FileSystem(**kwargs, connect_timeout=CHECK_TIMEOUT_S, request_timeout=CHECK_TIMEOUT_S,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    return pafs.S3FileSystem(**kwargs, connect_timeout=10, request_timeout=60)


def absolute(uri: str | None) -> str | None:
    """A local path made absolute against this process's working directory; ``s3://`` URIs,
    ``""`` and None unchanged. The driver applies it to every URI it hands to Ray workers,
    because Ray Train runs them in a directory of its own (``/tmp/ray/session_*/artifacts/...``)
    where a relative path would silently name somewhere else."""
    if not uri or "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def resolve(uri: str, check: bool = False) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it); ``check``: the S3 client of the pre-start checks."""
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri!r} names no bucket; use s3://BUCKET/prefix")
        opts = options()
        return _s3(opts.endpoint(), opts.s3_region(), check), path
    if "://" in uri:
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), absolute(uri)


def _wrap(uri: str, err: Exception) -> StorageError:
    hint = ""
    if is_s3(uri):
        hint = (
            f" (S3 endpoint {options().endpoint_name()}: check the bucket exists, AWS_ENDPOINT_URL /"
            " storage.endpoint_url points at a running S3 service, and AWS_ACCESS_KEY_ID /"
            " AWS_SECRET_ACCESS_KEY or an AWS profile grant access)"
        )
    return StorageError(f"storage error at {uri}: {type(err).__name__}: {err}{hint}")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _wrap(uri, e) from e


def read_bytes(uri: str) -> bytes:
    """A whole object. On S3 its size and its bytes come from two requests (pyarrow's HEAD, then a
    ranged GET), so an object overwritten between them comes back torn: the new version cut to the
    old one's length. Readers of objects that get overwritten while read (``latest.json``) check
    what they read and read again."""
    fs, path = resolve(uri)
    try:
        # a random-access file read with its size is one GET; a stream's read() pulls the
        # object in small ranged GETs (82 s instead of 0.7 s for 135 MB from a moto server)
        with fs.open_input_file(path) as f:
            return f.read(f.size())
    except FileNotFoundError as e:
        raise StorageError(f"{uri} does not exist") from e
    except OSError as e:
        raise _wrap(uri, e) from e


def write_bytes(uri: str, data: bytes, check: bool = False) -> None:
    """Write a whole object. Local files are written to a temporary name and renamed, so a
    reader never sees a partial file; an S3 PUT is atomic by itself. ``check``: the check client."""
    fs, path = resolve(uri, check)
    try:
        fs.create_dir(posixpath.dirname(path), recursive=True)
        target = path if is_s3(uri) else f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(target) as f:
            f.write(data)
        if target != path:
            fs.move(target, path)
    except OSError as e:
        raise _wrap(uri, e) from e


def listdir(uri: str) -> list[str]:
    """Names (not paths) directly under ``uri``; empty when it does not exist."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _wrap(uri, e) from e
    return sorted(posixpath.basename(i.path) for i in infos)


def delete(uri: str, check: bool = False) -> None:
    """Remove a file or a whole directory tree; missing is fine. ``check``: the check client."""
    fs, path = resolve(uri, check)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as e:
        raise _wrap(uri, e) from e


def _check_failed(uri: str, err: OSError) -> StorageError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Timeout was reached" in reason or "curlCode: 28" in reason:
        reason = f"no answer within {CHECK_TIMEOUT_S} s ({reason})"
    return StorageError(
        f"{uri}: the S3 endpoint {options().endpoint_name()} failed the storage check: {reason}. Fix: point "
        "AWS_ENDPOINT_URL / storage.endpoint_url at a running S3 service reachable from "
        "here, and check the bucket exists and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile "
        "grant access")


def check_reachable(uri: str) -> None:
    """One request about ``uri`` (does it exist) with the check client: StorageError naming the
    endpoint and the fix when the S3 service does not answer it. Local paths: nothing to check."""
    if not is_s3(uri):
        return
    log.info("checking that the S3 endpoint %s answers for %s (%d s timeout)", options().endpoint_name(), uri,
             CHECK_TIMEOUT_S)
    fs, path = resolve(uri, check=True)
    try:
        fs.get_file_info(path)
    except OSError as e:
        raise _check_failed(uri, e) from None


def check_writable(uri: str) -> None:
    """Fail fast (before any worker starts) when ``uri`` cannot be written: write and delete a probe
    object, on S3 with the check client after ``check_reachable``."""
    check_reachable(uri)
    probe = join(uri, f".write-probe-{uuid.uuid4().hex}")
    write_bytes(probe, b"ok", check=True)
    delete(probe, check=True)
