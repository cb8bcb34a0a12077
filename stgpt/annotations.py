"""Reading and writing caption annotations, and finding the videos they name.

Formats read (auto-detected):

* VATEX JSON: ``[{"videoID": ..., "enCap": [captions], "chCap": [...]?, ...}]``; keys other than ``videoID`` and
  ``enCap`` are kept in `VideoAnnotation.extra` (e.g. the synthetic dataset's ``attributes``).
* CIDEr/COCO JSON: ``[{"image_id": ..., "caption": ...}]`` with several entries per id for references and one
  per id for predictions; also the COCO ground-truth object ``{"annotations": [...]}``.
* SpaceTimeGPT CSV: ``videoID|cap1|...|cap10``, one video per line, no header and no quoting (a ``"`` is part of
  the caption, as in VATEX's own JSON). Its file is latin-1, so each line is decoded as UTF-8 where that is
  valid and as latin-1 otherwise: the two agree on ASCII, UTF-8 text stays right, and latin-1 bytes such as
  ``\\xe9`` become "é" instead of failing.

A malformed file raises `AnnotationError`, naming the file and the entry or line at fault, before anything
uses it. Paths may be local or any URI `pyarrow.fs.FileSystem.from_uri` understands (``s3://``, ``gs://``).
"""
from __future__ import annotations

import json
import os
import posixpath
import stat
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyarrow import fs as pafs

from stgpt import storage

# Every container the reader decodes (stgpt/video.py), matched in any case. When one ID has several files, the
# first extension here wins: the common web formats first (what yt-dlp writes), then the legacy ones.
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".webm", ".mkv", ".mov", ".m4v", ".avi", ".mpg", ".mpeg", ".ts",
                                     ".flv", ".gif")
MISSING_VIDEO = f"video file not found (looked for {', '.join(VIDEO_EXTENSIONS)})"


class AnnotationError(ValueError):
    """An annotation or prediction file that cannot be used; the message names the file and the place."""


@dataclass
class VideoAnnotation:
    """One video's captions, plus whatever else its entry carried (``chCap``, ``attributes``, ...)."""

    video_id: str
    captions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    """One entry as read, before grouping: where it was, for error messages."""

    video_id: str
    captions: list[str]
    extra: dict[str, Any]
    where: str  # "entry 3" or "line 7"


# --------------------------------------------------------------------------------------------------------
# Public readers.


def load_annotations(path: str | os.PathLike) -> list[VideoAnnotation]:
    """Every video's annotation in file order; COCO entries of one id are grouped (at the first one's place).

    Raises AnnotationError for a malformed file, including a video ID that appears twice in a VATEX or CSV file.
    """
    records, kind = _read_records(path)
    if kind == "coco":
        grouped: dict[str, VideoAnnotation] = {}
        for record in records:
            if record.video_id in grouped:
                grouped[record.video_id].captions.extend(record.captions)
            else:
                grouped[record.video_id] = VideoAnnotation(record.video_id, list(record.captions), record.extra)
        return list(grouped.values())
    _reject_duplicates(path, records)
    return [VideoAnnotation(r.video_id, r.captions, r.extra) for r in records]


def load_references(path: str | os.PathLike) -> dict[str, list[str]]:
    """videoID -> reference captions, from any supported format."""
    return {annotation.video_id: annotation.captions for annotation in load_annotations(path)}


def load_predictions(path: str | os.PathLike) -> dict[str, str]:
    """videoID -> the one predicted caption. Usually COCO result format (SpaceTimeGPT's generated_captions.json);
    a JSON object ``{videoID: caption}`` and one-caption VATEX or CSV files are read too.

    A video ID predicted twice, or an entry with other than one caption, raises AnnotationError naming it.
    """
    data = storage.read_bytes(path)
    if _looks_like_json(path, data):
        value = _parse_json(path, data)
        if isinstance(value, dict) and "annotations" not in value:
            return _predictions_from_mapping(path, value)
        records, _ = _json_records(path, value)
    else:
        records = _csv_records(path, data)
    _reject_duplicates(path, records, what="predicted")
    predictions = {}
    for record in records:
        if len(record.captions) != 1:
            raise AnnotationError(
                f"{path}: {record.where} (video {record.video_id!r}) has {len(record.captions)} captions;"
                " a prediction file needs exactly one per video"
            )
        predictions[record.video_id] = record.captions[0]
    return predictions


# --------------------------------------------------------------------------------------------------------
# Writers.


def save_annotations(
    annotations: Iterable[VideoAnnotation] | Mapping[str, Sequence[str]], path: str | os.PathLike
) -> None:
    """Write VATEX JSON: ``[{"videoID", "enCap", **extra}]``. Takes annotations or a videoID -> captions map.

    Checked as a reader would check it (so what is written can be read back), and written atomically.
    """
    if isinstance(annotations, Mapping):
        annotations = [VideoAnnotation(video_id, list(captions)) for video_id, captions in annotations.items()]
    entries = []
    for annotation in annotations:
        clash = {"videoID", "enCap"} & set(annotation.extra)
        if clash:
            raise ValueError(f"video {annotation.video_id!r}: extra must not hold {sorted(clash)}")
        entries.append({"videoID": annotation.video_id, "enCap": list(annotation.captions), **annotation.extra})
    records = [_vatex_record(path, index, entry) for index, entry in enumerate(entries)]
    _reject_duplicates(path, records)
    storage.write_text(path, json.dumps(entries, ensure_ascii=False) + "\n")


def save_predictions(predictions: Mapping[str, str], path: str | os.PathLike) -> None:
    """Write COCO result format, ``[{"image_id": videoID, "caption": ...}]``, as SpaceTimeGPT's
    generated_captions.json (indented by 4), in the mapping's order."""
    entries = []
    for video_id, caption in predictions.items():
        if not isinstance(video_id, str) or not isinstance(caption, str):
            raise ValueError(f"predictions must map str to str, got {video_id!r}: {caption!r}")
        entries.append({"image_id": video_id, "caption": caption})
    storage.write_text(path, json.dumps(entries, indent=4, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------------
# Finding videos.


@dataclass(frozen=True)
class VideoFile:
    """A video found for an ID: where it is (reopenable, see `find_videos`), its size and modification time."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class VideoListing:
    """What `find_video_files` found: files by ID, IDs with none (input order), and why some files were refused."""

    found: dict[str, VideoFile]
    missing: list[str]
    rejected: dict[str, str] = field(default_factory=dict)  # ID -> why its file is not a video (links, non-files)

    def reason(self, video_id: str) -> str:
        """The error-record reason for a missing ID: "not found", or why the file there was refused."""
        return self.rejected.get(video_id, MISSING_VIDEO)


def find_videos(
    video_ids: Iterable[str], folder: str | os.PathLike, filesystem: Any = None
) -> tuple[dict[str, str], list[str]]:
    """Map video IDs to ``<id><extension>`` files in `folder`: (found paths, missing IDs).

    See `find_video_files` for the rules; a refused file (a link leading outside the folder, ...) is missing here.
    """
    listing = find_video_files(video_ids, folder, filesystem)
    return {video_id: video.path for video_id, video in listing.found.items()}, listing.missing


def find_video_files(video_ids: Iterable[str], folder: str | os.PathLike, filesystem: Any = None) -> VideoListing:
    """Find the ``<id><extension>`` file of each video ID in `folder`, with its size and modification time.

    IDs match file names exactly; the extension is any of `VIDEO_EXTENSIONS`, in any case (``.MP4``); when an ID
    has several files, the one whose extension comes first there wins (``.mp4`` over ``.webm`` over ``.mkv``).

    A video is a regular file directly in the folder. A symbolic link counts only where it resolves to a regular
    file inside the folder (its path is then the resolved one, so what is checked is what is read); a link that
    leads outside, dangles or loops, and anything that is not a regular file (a folder, a FIFO, a device), is not
    a video: its ID is missing, with the reason in `rejected`. Nothing is opened or read here.

    The folder is listed once (no per-file request on object stores, which have no links). `folder` is a local
    path or a URI (``s3://bucket/videos``, ``gs://...``, ``file:///...``) opened with
    `pyarrow.fs.FileSystem.from_uri`, or a path within `filesystem` when one is given.

    Paths found can be opened again: local files as plain absolute paths (what decord and PyAV take), other
    filesystems as full URIs; `pyarrow.fs.FileSystem.from_uri(path)` accepts both. With `filesystem` given, they
    are paths within it. A folder that does not exist raises FileNotFoundError (a wrong folder is not "all videos
    missing").
    """
    folder_text = os.fspath(folder)
    if filesystem is not None:
        base, make_path = folder_text.rstrip("/") or "/", None
    else:
        filesystem, base, make_path = _resolve_folder(folder_text)
    try:  # the one listing; raises for a folder that is missing or a file
        if isinstance(filesystem, pafs.LocalFileSystem):
            by_name, refused = _list_local(base)
        else:
            by_name, refused = {}, {}
            for entry in filesystem.get_file_info(pafs.FileSelector(base, recursive=False)):
                stem, extension = posixpath.splitext(entry.base_name)
                if entry.type == pafs.FileType.File and extension.lower() in VIDEO_EXTENSIONS:
                    path = make_path(entry.path) if make_path else entry.path
                    by_name.setdefault(stem + extension.lower(), VideoFile(path, entry.size, entry.mtime_ns or 0))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"video folder {folder_text} does not exist") from error
    except NotADirectoryError as error:
        raise NotADirectoryError(f"video folder {folder_text} is not a directory") from error

    listing = VideoListing({}, [])
    for video_id in dict.fromkeys(video_ids):
        for extension in VIDEO_EXTENSIONS:
            video = by_name.get(f"{video_id}{extension}")
            if video is not None:
                listing.found[video_id] = video
                break
        else:
            listing.missing.append(video_id)
            reasons = [refused[name] for extension in VIDEO_EXTENSIONS if (name := f"{video_id}{extension}") in refused]
            if reasons:
                listing.rejected[video_id] = "; ".join(reasons)
    return listing


def _list_local(base: str) -> tuple[dict[str, VideoFile], dict[str, str]]:
    """The video files of a local folder by "<stem><lower-case extension>", and the refused ones with why."""
    real_base = os.path.realpath(base)
    by_name: dict[str, VideoFile] = {}
    refused: dict[str, str] = {}
    with os.scandir(base) as entries:
        for entry in entries:
            stem, extension = posixpath.splitext(entry.name)
            if extension.lower() not in VIDEO_EXTENSIONS:
                continue
            key = stem + extension.lower()
            path, why = entry.path, None
            try:
                if entry.is_symlink():
                    path = os.path.realpath(entry.path)
                    if os.path.commonpath([real_base, path]) != real_base:
                        why = f"{entry.name} is a symbolic link to {path}, outside the videos folder"
                    info = os.stat(path)
                else:
                    info = entry.stat(follow_symlinks=False)
                if why is None and not stat.S_ISREG(info.st_mode):
                    why = f"{entry.name} is not a regular file"
            except FileNotFoundError:
                why = why or f"{entry.name} is a symbolic link to {path}, which does not exist"
            except OSError as error:  # a link loop, no permission
                why = why or f"{entry.name} cannot be examined ({error.strerror or error})"
            if why is not None:
                refused.setdefault(key, why)
            elif key not in by_name:
                by_name[key] = VideoFile(path, info.st_size, info.st_mtime_ns)
    return by_name, refused


def _resolve_folder(folder: str):
    """(filesystem, path within it, function from a listed path to one `storage.filesystem` reopens)."""
    filesystem, base = storage.filesystem(folder)
    if isinstance(filesystem, pafs.LocalFileSystem):
        return filesystem, base, lambda path: path
    return filesystem, base.rstrip("/") or "/", lambda path: storage.child(folder, posixpath.basename(path))


# --------------------------------------------------------------------------------------------------------
# Parsing.


def _read_records(path: str | os.PathLike) -> tuple[list[_Record], str]:
    """All entries of a file and its kind ("vatex", "coco" or "csv")."""
    data = storage.read_bytes(path)
    if not _looks_like_json(path, data):
        return _csv_records(path, data), "csv"
    return _json_records(path, _parse_json(path, data))


def _json_records(path, value: Any) -> tuple[list[_Record], str]:
    if isinstance(value, dict) and isinstance(value.get("annotations"), list):
        value = value["annotations"]  # COCO ground truth: {"images": [...], "annotations": [...]}
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: expected a JSON list of entries, found a {_type_name(value)}")
    if not value:
        return [], "vatex"
    first = value[0]
    if isinstance(first, dict) and "videoID" in first:
        return [_vatex_record(path, i, entry) for i, entry in enumerate(value)], "vatex"
    if isinstance(first, dict) and "image_id" in first:
        return [_coco_record(path, i, entry) for i, entry in enumerate(value)], "coco"
    if not isinstance(first, dict):
        raise AnnotationError(f"{path}: entry 0 is a {_type_name(first)}, expected an object")
    raise AnnotationError(
        f"{path}: entry 0 has neither 'videoID' (VATEX) nor 'image_id' (COCO) key; it has {sorted(first)}"
    )


def _vatex_record(path, index: int, entry: Any) -> _Record:
    where = f"entry {index}"
    _require_keys(path, where, entry, ("videoID", "enCap"))
    video_id = _video_id(path, where, entry["videoID"], "videoID")
    where = f"entry {index} (video {video_id!r})"
    captions = entry["enCap"]
    if not isinstance(captions, list):
        raise AnnotationError(f"{path}: {where}: 'enCap' is a {_type_name(captions)}, expected a list of captions")
    if not captions:
        raise AnnotationError(f"{path}: {where}: 'enCap' is empty")
    for position, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise AnnotationError(f"{path}: {where}: 'enCap'[{position}] is a {_type_name(caption)}, expected a string")
    extra = {key: value for key, value in entry.items() if key not in ("videoID", "enCap")}
    return _Record(video_id, list(captions), extra, f"entry {index}")


def _coco_record(path, index: int, entry: Any) -> _Record:
    where = f"entry {index}"
    _require_keys(path, where, entry, ("image_id", "caption"))
    video_id = _video_id(path, where, entry["image_id"], "image_id")
    caption = entry["caption"]
    if not isinstance(caption, str):
        raise AnnotationError(
            f"{path}: entry {index} (video {video_id!r}): 'caption' is a {_type_name(caption)}, expected a string"
        )
    extra = {key: value for key, value in entry.items() if key not in ("image_id", "caption", "id")}
    return _Record(video_id, [caption], extra, f"entry {index}")


def _csv_records(path, data: bytes) -> list[_Record]:
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode_line(raw.rstrip(b"\r"))
        if not line.strip():
            continue
        video_id, *captions = line.split("|")
        where = f"line {number}"
        if number == 1 and video_id.strip().lower() in ("videoid", "video_id", "id"):
            continue  # a header
        if not video_id.strip():
            raise AnnotationError(f"{path}: {where}: empty video ID (expected videoID|caption|...)")
        if not captions:
            raise AnnotationError(f"{path}: {where}: video {video_id!r} has no captions (expected videoID|caption|...)")
        for position, caption in enumerate(captions, start=1):
            if not caption.strip():
                raise AnnotationError(f"{path}: {where}: video {video_id!r}: caption {position} is empty")
        records.append(_Record(video_id, captions, {}, where))
    return records


def _decode_line(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # never fails: every byte is a latin-1 character


def _predictions_from_mapping(path, value: dict) -> dict[str, str]:
    for video_id, caption in value.items():
        if not isinstance(caption, str):
            raise AnnotationError(f"{path}: video {video_id!r}: caption is a {_type_name(caption)}, expected a string")
    return dict(value)


def _require_keys(path, where: str, entry: Any, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{path}: {where} is a {_type_name(entry)}, expected an object")
    for key in keys:
        if key not in entry:
            raise AnnotationError(f"{path}: {where} has no {key!r} key (it has {sorted(entry)})")


def _video_id(path, where: str, value: Any, key: str) -> str:
    # COCO image ids are often integers; video IDs here are strings, so accept ints as their decimal form.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise AnnotationError(f"{path}: {where}: {key!r} is a {_type_name(value)}, expected a string")
    text = str(value)
    if not text.strip():
        raise AnnotationError(f"{path}: {where}: {key!r} is empty")
    return text


def _reject_duplicates(path, records: Sequence[_Record], what: str = "listed") -> None:
    first: dict[str, str] = {}
    clashes = []
    for record in records:
        if record.video_id in first:
            clashes.append(f"{record.video_id!r} ({first[record.video_id]} and {record.where})")
        else:
            first[record.video_id] = record.where
    if clashes:
        shown = ", ".join(clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
        raise AnnotationError(f"{path}: {len(clashes)} video ID(s) {what} more than once: {shown}")


def _parse_json(path, data: bytes) -> Any:
    """The parsed file; AnnotationError for bad UTF-8, bad JSON, numbers or nesting past Python's limits, and
    text that is not valid Unicode (lone surrogates from ``\\ud800`` escapes, which no file or shard can hold)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise AnnotationError(f"{path}: JSON is not valid UTF-8 (byte {error.start})") from error
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from error
    except ValueError as error:  # e.g. an integer past Python's int-from-string limit (4300 digits)
        raise AnnotationError(f"{path}: unusable JSON value: {str(error)[:200]}") from error
    except RecursionError:
        raise AnnotationError(f"{path}: JSON nested too deeply to read") from None
    place = _invalid_text(value)
    if place is not None:
        raise AnnotationError(f"{path}: {place}: text is not valid Unicode (a lone surrogate such as \\ud800)")
    return value


def _invalid_text(value: Any) -> str | None:
    """Where the first string (key or value) that cannot be encoded as UTF-8 is, as "entry 3, 'enCap'[1]"; None
    if there is none. Iterative, so no nesting json.loads accepts can overflow the stack here."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, place = stack.pop()
        if isinstance(item, str):
            items: Iterable = ()
            texts = [item]
        elif isinstance(item, dict):
            texts = list(item)
            items = ((v, (*place, k)) for k, v in item.items())
        elif isinstance(item, list):
            texts = []
            items = ((v, (*place, i)) for i, v in enumerate(item))
        else:
            continue
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return _place_name(place, isinstance(value, list))
        stack.extend(reversed(list(items)))
    return None


def _place_name(place: tuple, top_is_list: bool) -> str:
    if not place:
        return "the top-level value"
    if top_is_list:
        head, rest = f"entry {place[0]}", place[1:]
    else:
        head, rest = "", place
    tail = "".join(f"[{key!r}]" for key in rest)
    return f"{head}, {tail}" if head and tail else head or tail


def _looks_like_json(path, data: bytes) -> bool:
    suffix = posixpath.splitext(urllib.parse.urlsplit(os.fspath(path)).path)[1].lower()
    if suffix == ".json":
        return True
    if suffix in (".csv", ".txt", ".tsv"):
        return False
    return data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] in (b"[", b"{")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", type(None): "null"}.get(type(value), type(value).__name__)
