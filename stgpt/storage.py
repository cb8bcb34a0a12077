"""Local paths and URIs in one place: which a path is, the filesystem behind it, listing, reading, atomic writes.

Every input and output of the suite may be a local path or a URI that `pyarrow.fs.FileSystem.from_uri`
understands (`s3://`, `gs://`, `file://`). Local paths are made absolute before they are handed to Ray workers,
which may run in another working directory. Writes are atomic: a reader sees the old file or the new one, never
half of one (a hidden temporary beside the target, then a rename; on object stores a single put is atomic).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from pyarrow import fs as pafs


def is_uri(path: str | os.PathLike) -> bool:
    """A URI (`scheme://...`, `file://` included) rather than a plain local path."""
    return "://" in os.fspath(path)


def local_path(path: str | os.PathLike) -> Optional[str]:
    """The local filesystem path of a plain path or a `file://` URI; None for remote storage."""
    text = os.fspath(path)
    if not is_uri(text):
        return text
    if text.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlsplit(text).path)
    return None


def absolute(path: str | os.PathLike) -> str:
    """A path every worker reads the same: URIs as they are, local paths absolute."""
    text = os.fspath(path)
    return text if is_uri(text) else os.path.abspath(text)


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path within it) for a local path or a URI."""
    return pafs.FileSystem.from_uri(absolute(path))


def child(folder: str | os.PathLike, name: str) -> str:
    """The path of file `name` in `folder`; for a URI its percent-encoded form, keeping the query
    (`?region=...`), as `FileSystem.from_uri` expects."""
    text = os.fspath(folder)
    if not is_uri(text):
        return os.path.join(text, name)
    parts = urllib.parse.urlsplit(text)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{urllib.parse.quote(name)}"))


def exists(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def list_dir(folder: str | os.PathLike, recursive: bool = False) -> list[pafs.FileInfo]:
    """The entries under `folder` (FileNotFoundError naming it if it is not there)."""
    fs, inner = filesystem(folder)
    try:
        return fs.get_file_info(pafs.FileSelector(inner, recursive=recursive))
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(folder)} does not exist") from None


@contextlib.contextmanager
def open_input(path: str | os.PathLike) -> Iterator[Any]:
    """A random-access file (what Parquet readers take)."""
    fs, inner = filesystem(path)
    with fs.open_input_file(inner) as handle:
        yield handle


def read_bytes(path: str | os.PathLike) -> bytes:
    local = local_path(path)
    if local is not None:
        return Path(local).read_bytes()
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def video_source(path: str | os.PathLike) -> str | bytes:
    """What a video reader takes: a local path as it is (the reader opens it), remote storage as its bytes."""
    local = local_path(path)
    return local if local is not None else read_bytes(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` atomically, creating parent folders: a reader sees the old file or the new one."""
    local = local_path(path)
    if local is None:
        fs, inner = filesystem(path)
        with fs.open_output_stream(inner) as stream:  # an object-store put is atomic
            stream.write(data)
        return
    with replacing(local) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_text(path, json.dumps(value, indent=1, default=str) + "\n")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside local `path` (file or folder) that replaces it once the block succeeds;
    on failure it is removed and `path` is untouched. The temporary gets umask permissions, not mkstemp's 0600."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield temporary
        if temporary.is_dir() and target.is_dir():  # a folder cannot be renamed over another: swap them
            old = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.old"
            target.rename(old)
            temporary.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
