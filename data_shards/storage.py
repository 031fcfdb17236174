"""One place that opens local paths, object-storage URLs and WebDataset ``pipe:`` commands.

Everything that reads or writes shards, manifests, checkpoints or exports goes through here, so
the rest of the code never calls fsspec directly. Three kinds of location:

* a local path (``data/demo/train``, ``/mnt/shared/run``): plain file I/O, no extra packages;
* a URL with a scheme (``s3://bucket/train``, ``gs://bucket/train``, ``file:///x``, any fsspec
  protocol): read and written through fsspec with range reads (``pip install align-pro[cloud]``
  brings fsspec + s3fs; ``gcsfs`` for ``gs://``). Endpoint and credentials come from the usual
  environment of the backend (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ... for S3 and S3-compatible servers) or from fsspec's
  own ``FSSPEC_<PROTOCOL>_<OPTION>`` variables;
* a ``pipe:`` command template (read only), WebDataset style: ``pipe:curl -sf https://host/train/{name}``.
  ``{name}`` is replaced with the file asked for (``manifest.json``, ``shard-000003.tar``); the
  command's stdout is the file. A pipe cannot seek, so one shard is read into memory at a time.

Transient failures (connection resets, timeouts, 5xx) are retried with exponential back-off;
permanent ones (missing bucket or key, refused credentials) raise :class:`StorageError` at once,
with the URL and a hint in the message.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIES = 4  # attempts of one operation on transient errors
BACKOFF_S = 0.5  # first wait; doubles each attempt
_SHELL_CANNOT_RUN = (126, 127)  # not executable, command not found
READ_BLOCK = 8 << 20  # fsspec read-ahead block of a remote shard handle
COPY_BLOCK = 8 << 20  # buffer of a streamed local file copy
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")


class StorageError(OSError):
    """A location could not be read or written; ``url`` names it and the message says why."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


def is_pipe(location: str | Path) -> bool:
    """True for a WebDataset-style ``pipe:`` command template."""
    return str(location).startswith("pipe:")


def is_url(location: str | Path) -> bool:
    """True for anything that is not a plain local path (a ``scheme://`` URL or a ``pipe:``)."""
    text = str(location)
    return is_pipe(text) or (_SCHEME_RE.match(text) is not None and not text.startswith("file://"))


def join(base: str | Path, *names: str) -> str | Path:
    """``base/name`` for a path or URL; for a ``pipe:`` template, ``{name}`` is filled in instead.

    Local paths stay :class:`~pathlib.Path` objects; URLs stay strings (``Path`` would fold ``//``).
    """
    if is_pipe(base):
        if len(names) != 1 or "{name}" not in str(base):
            raise StorageError(str(base), "a pipe: location must be a template with one {name} placeholder")
        name = names[0]
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", name):  # quoting cannot be right inside a quoted template
            raise StorageError(str(base), f"unsafe file name for a pipe: command: {name!r}")
        return str(base).replace("{name}", name)
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])
    return Path(_local(base), *names)


def _local(location: str | Path) -> str:
    text = str(location)
    return text[len("file://") :] if text.startswith("file://") else text


# --------------------------------------------------------------------------- fsspec access


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError:
        raise StorageError(url, "object storage needs fsspec (pip install 'align-pro[cloud]')") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise StorageError(url, f"no fsspec backend installed for this protocol ({e})") from None
    except ValueError as e:
        raise StorageError(url, f"not a usable URL ({e})") from None
    return fs, path


def _hint(url: str, exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionError):
        return (
            f"access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
            "AWS_PROFILE for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://) and the endpoint (AWS_ENDPOINT_URL)"
        )
    if isinstance(exc, FileNotFoundError):
        if "bucket" in str(exc).lower():
            return f"bucket not found ({text}); check the bucket name and the endpoint (AWS_ENDPOINT_URL)"
        return f"not found ({text})"
    return text


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError))


def _retry(url: str, what: str, op: Callable[[], T]) -> T:
    """Run ``op``, retrying transient errors; map every failure to one StorageError naming ``url``."""
    delay = BACKOFF_S
    for attempt in range(1, RETRIES + 1):
        try:
            return op()
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - backends raise anything from OSError to botocore errors
            if _permanent(e) or attempt == RETRIES:
                suffix = "" if _permanent(e) else f" (after {RETRIES} attempts)"
                raise StorageError(url, f"{what} failed: {_hint(url, e)}{suffix}") from None
            log.warning(
                "%s: %s failed (%s: %s); retry %d/%d in %.1fs",
                url,
                what,
                type(e).__name__,
                e,
                attempt,
                RETRIES - 1,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _run_pipe(command: str) -> bytes:
    cmd = command[len("pipe:") :]

    def run() -> bytes:
        proc = subprocess.run(cmd, shell=True, capture_output=True, timeout=3600)
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[-500:]
            if proc.returncode in _SHELL_CANNOT_RUN:  # retrying cannot help
                raise StorageError(command, f"the shell cannot run the command (status {proc.returncode}): {err}")
            raise ConnectionError(f"command exited with status {proc.returncode}: {err}")
        return proc.stdout

    return _retry(command, "pipe command", run)


# --------------------------------------------------------------------------- reading


def open_read(location: str | Path) -> IO[bytes]:
    """A seekable binary handle on ``location`` (remote: fsspec range reads; pipe: the output in memory).

    Raises:
        FileNotFoundError: a local path does not exist.
        StorageError: a URL or pipe could not be opened (message names it and says why).
    """
    if is_pipe(location):
        return io.BytesIO(_run_pipe(str(location)))
    if not is_url(location):
        return open(_local(location), "rb")
    url = str(location)
    fs, path = _filesystem(url)
    return _retry(url, "open", lambda: fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead"))


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a file, a URL or a pipe's output."""
    if is_pipe(location):
        return _run_pipe(str(location))
    if not is_url(location):
        return Path(_local(location)).read_bytes()
    url = str(location)
    fs, path = _filesystem(url)
    return _retry(url, "read", lambda: fs.cat_file(path))


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def exists(location: str | Path) -> bool:
    """Whether a file (or, remotely, any object under the prefix) exists; errors other than absence raise."""
    if is_pipe(location):
        raise StorageError(str(location), "cannot test a pipe: location for existence")
    if not is_url(location):
        return Path(_local(location)).exists()
    url = str(location)
    fs, path = _filesystem(url)
    fs.invalidate_cache()  # another node may have written it since our last listing
    return _retry(url, "exists", lambda: fs.exists(path))


def listdir(location: str | Path) -> list[str]:
    """Names (not paths) of the entries directly under a directory or prefix; [] when there is none."""
    if is_pipe(location):
        raise StorageError(str(location), "cannot list a pipe: location")
    if not is_url(location):
        local = Path(_local(location))
        return sorted(p.name for p in local.iterdir()) if local.is_dir() else []
    url = str(location)
    fs, path = _filesystem(url)
    fs.invalidate_cache()

    def ls() -> list[str]:
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError as e:
            if "bucket" in str(e).lower():
                raise
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)

    return _retry(url, "list", ls)


# --------------------------------------------------------------------------- writing


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write a whole file atomically: locally temp + fsync + rename; remotely one PUT (objects appear whole)."""
    if is_pipe(location):
        raise StorageError(str(location), "pipe: locations are read-only")
    if not is_url(location):
        _write_local_atomically(Path(_local(location)), lambda f: f.write(data))
        return
    url = str(location)
    fs, path = _filesystem(url)
    _retry(url, "write", lambda: fs.pipe_file(path, data))


def _write_local_atomically(path: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """``fill(handle)`` writes the content; a temp file beside ``path`` is fsynced and renamed over it,
    so a reader (or a crash) never sees half a file. The temp name is unique per process and thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_beside(path: Path) -> Path:
    """A hidden temporary name next to ``path``, unique per process and thread (renamed over it)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}.{threading.get_ident()}")


def _copy_local(src: str | Path, dst: Path) -> None:
    """Stream one local file to another atomically, COPY_BLOCK bytes at a time (checkpoint shards and
    exports are gigabytes: never the whole file in memory)."""
    import shutil

    with open(src, "rb") as source:
        _write_local_atomically(dst, lambda f: shutil.copyfileobj(source, f, COPY_BLOCK))


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def upload_file(local: str | Path, location: str | Path) -> None:
    """Copy one local file to ``location`` (a URL or another local path, e.g. a shared file system),
    streamed: locally through a temp file renamed into place, remotely by fsspec's ``put_file``."""
    if not is_url(location):
        _copy_local(local, Path(_local(location)))
        return
    url = str(location)
    fs, path = _filesystem(url)
    _retry(url, "upload", lambda: fs.put_file(str(local), path))


def upload_dir(local: str | Path, location: str | Path, last: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under ``local`` to ``location``, files named in ``last`` after all the others.

    ``last`` is how readers are kept from seeing half a directory: a manifest or marker that is
    uploaded after everything it points to. Returns the relative paths uploaded, in order.
    """
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)  # stable: everything else first, markers at the end
    done = []
    for file in files:
        rel = file.relative_to(local).as_posix()
        upload_file(file, join(location, *rel.split("/")))
        done.append(rel)
    return done


def download_file(location: str | Path, local: str | Path) -> None:
    """Copy one file from ``location`` (a URL or a local path) to the local path ``local``, streamed
    and atomic: a partly fetched file never appears under ``local``'s name."""
    local = Path(local)
    if is_pipe(location):
        write_bytes(local, _run_pipe(str(location)))
        return
    if not is_url(location):
        _copy_local(_local(location), local)
        return
    url = str(location)
    fs, path = _filesystem(url)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(local)
    try:
        _retry(url, "download", lambda: fs.get_file(path, str(tmp)))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)


def download_dir(location: str | Path, local: str | Path) -> list[str]:
    """Copy every file directly under ``location`` into the local directory ``local`` (created)."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    names = listdir(location)
    for name in names:
        src = join(location, name)
        if is_url(location):
            url = str(src)
            fs, path = _filesystem(url)
            if _retry(url, "stat", lambda path=path, fs=fs: fs.isdir(path)):
                download_dir(src, local / name)
                continue
            download_file(src, local / name)
        elif Path(src).is_dir():
            download_dir(src, local / name)
        else:
            download_file(src, local / name)
    return names


def _remove_remote(url: str, remove) -> None:
    """``remove(fs, path)`` on the URL's filesystem, retried; an already missing object is fine."""
    fs, path = _filesystem(url)

    def rm() -> None:
        try:
            remove(fs, path)
        except FileNotFoundError:
            pass

    _retry(url, "delete", rm)


def remove_file(location: str | Path) -> None:
    """Delete one file or object (missing: nothing to do)."""
    if not is_url(location):
        Path(_local(location)).unlink(missing_ok=True)
        return
    _remove_remote(str(location), lambda fs, path: fs.rm_file(path))


def remove_tree(location: str | Path) -> None:
    """Delete a directory or prefix and everything under it (missing: nothing to do)."""
    if not is_url(location):
        import shutil

        shutil.rmtree(_local(location), ignore_errors=True)
        return
    _remove_remote(str(location), lambda fs, path: fs.rm(path, recursive=True))
