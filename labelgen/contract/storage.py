"""Storage primitives under any fsspec URL: atomic writes, one-PUT publishing, bounded retries.

Object stores have no atomic rename. A file is therefore published with one PUT of
the finished local file (a multipart upload is also invisible until it completes),
and :func:`retry` repeats transient failures with bounded exponential backoff, each
retry logged. On a local filesystem files are written next to their final name,
fsynced and renamed into place. Either way a reader sees a whole file or none.

Both sides use these: the labeling job to publish shards and records, the student
reader to list and read records that another process is writing. Imports only the
standard library.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "MIB",
    "RETRY_ATTEMPTS",
    "is_local",
    "retry",
    "put_file",
    "put_bytes",
    "publish_file",
    "write_text_atomic",
    "write_json_atomic",
    "read_json",
    "list_fresh",
]

T = TypeVar("T")
log = logging.getLogger(__name__)
_sleep = time.sleep  # tests replace it to retry without waiting

MIB = 1 << 20
"""Bytes in a MiB (sizes in specs and configs are given in MiB)."""
RETRY_ATTEMPTS = 5
"""Attempts per object-store call (1 + 4 retries, backoff 0.5 s, 1 s, 2 s, 4 s, with jitter)."""
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
_TRANSIENT_MODULES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "google", "requests", "urllib3")


def is_local(fs: Any) -> bool:
    """True for the local filesystem (atomic rename available)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    return isinstance(exc, OSError | ConnectionError | TimeoutError) or type(exc).__module__.startswith(
        _TRANSIENT_MODULES
    )


def retry(
    fn: Callable[[], T],
    what: str,
    attempts: int = RETRY_ATTEMPTS,
    base_delay: float = 0.5,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying transient object-store errors with backoff.

    Errors a retry cannot fix (missing file, permission denied, bad argument) are raised
    at once; transient ones are retried ``attempts - 1`` times, each logged with the
    delay, then the last is raised with the count in its message.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not _transient(exc) or attempt == attempts:
                if attempt > 1:
                    exc.add_note(f"{what}: gave up after {attempt} attempts")
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.75 + 0.5 * random.random())
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            (sleep or _sleep)(delay)
    raise AssertionError("unreachable")


def put_file(fs: Any, local_path: str, dest: str) -> None:
    """Publish a finished local file at ``dest`` in one PUT (object stores), retried.

    The upload goes straight to the final key: S3 and GCS make an object visible only
    when its PUT (or multipart upload) completes, so a reader never sees a partial file.
    """
    retry(lambda: fs.put_file(local_path, dest), f"upload {os.path.basename(local_path)} to {dest}")


def put_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a small object in one PUT, retried."""
    retry(lambda: fs.pipe_file(path, data), f"write {path}")


def publish_file(fs: Any, local_path: str, dest: str) -> None:
    """Move a finished local file to ``dest`` atomically (copy + fsync + rename, or one
    retried PUT) and remove the local file."""
    if is_local(fs):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp_dest = f"{dest}.tmp-{os.getpid()}"
        with open(local_path, "rb") as src, open(tmp_dest, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp_dest, dest)
    else:
        put_file(fs, local_path, dest)
    os.remove(local_path)


def write_text_atomic(fs: Any, path: str, text: str) -> None:
    """Write text so that readers see either nothing or the whole file."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        put_bytes(fs, path, text.encode())  # a single PUT is atomic on object stores; retried


def write_json_atomic(fs: Any, path: str, data: Any) -> None:
    """Write JSON so that readers see either nothing or the whole file."""
    write_text_atomic(fs, path, json.dumps(data, indent=2, sort_keys=True))


def read_json(fs: Any, path: str) -> Any:
    """Parse the JSON file at ``path``, retrying transient store errors."""
    return retry(lambda: json.loads(fs.cat_file(path)), f"read {path}")


def list_fresh(fs: Any, directory: str, prefix: str = "") -> list[str]:
    """Sorted paths under ``directory`` (those starting with ``prefix`` where the store can
    filter by key prefix), bypassing fsspec's listing cache on object stores: records are
    written by other processes while a job runs. [] if the directory does not exist."""
    if not is_local(fs):
        fs.invalidate_cache(directory)
        if prefix:
            try:  # s3fs/gcsfs list by key prefix: one request for a unit, not the whole directory
                return sorted(fs.find(directory, prefix=prefix))
            except TypeError:
                pass
    try:
        return sorted(fs.ls(directory, detail=False))
    except FileNotFoundError:
        return []
