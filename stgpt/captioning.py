"""Caption a whole collection: every video of a folder, bucket, glob or list, one caption per video or per window.

    inputs (sorted, cut into parts) -> Ray Data: from_items -> map_batches(decode_videos): CPU tasks, each video
    decoded in an isolated child and streamed window by window -> map_batches(ModelActor): a pool that only runs
    the model -> the driver writes each part once every video of it is in

The output folder (local or any pyarrow URI) holds `part-00000.parquet`... (one row per window: `COLUMNS`) with
`part-00000.errors.jsonl` beside each, then `captions.jsonl` (for people), `errors.jsonl` and `manifest.json`.
Every input video ends as its captions or as one error record, exactly once: a part file is written whole (a
temporary name, then renamed) and only when all its videos are done, so a killed run leaves whole parts, which
a re-run keeps (when they hold the same videos) while it redoes the rest. A re-run with other settings that
change the captions (checkpoint, generation, frames, windows) is refused unless `overwrite`.
"""
from __future__ import annotations

import csv
import fnmatch
import glob
import io
import json
import os
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import ray
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from stgpt import storage, synthetic
from stgpt.annotations import VIDEO_EXTENSIONS
from stgpt.config import Config
from stgpt.pipeline import caption_stages, decode_videos, pool_size
from stgpt.resources import beat

COLUMNS = ["video_id", "path", "window_index", "window_start_s", "window_end_s", "caption", "frame_indices",
           "num_source_frames", "model", "generation"]
SCHEMA = pa.schema([("video_id", pa.string()), ("path", pa.string()), ("window_index", pa.int32()),
                    ("window_start_s", pa.float64()), ("window_end_s", pa.float64()), ("caption", pa.string()),
                    ("frame_indices", pa.list_(pa.int64())), ("num_source_frames", pa.int64()),
                    ("model", pa.string()), ("generation", pa.string())])
MANIFEST, CAPTIONS, ERRORS = "manifest.json", "captions.jsonl", "errors.jsonl"
LIST_SUFFIXES = (".txt", ".csv", ".jsonl", ".parquet")


class CaptionError(RuntimeError):
    """The job cannot run as asked (bad input source, settings that differ from a finished run's)."""


@dataclass(frozen=True)
class VideoInput:
    video_id: str
    path: str


@dataclass
class CaptionSummary:
    output: str
    videos: int
    windows: int
    captions: int
    errors: int
    kept_parts: int
    written_parts: int
    seconds: float
    per_actor: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        rate = self.videos / self.seconds if self.seconds else 0.0
        actors = ", ".join(f"{n / self.seconds:.2f}/s" for n in self.per_actor.values()) if self.seconds else ""
        return (f"{self.videos} videos: {self.captions} captions of {self.windows} windows, {self.errors} errors; "
                f"{self.written_parts} parts written, {self.kept_parts} kept from an earlier run; "
                f"{self.seconds:.1f} s ({rate:.2f} videos/s; captions per actor: {actors or '-'})\n"
                f"-> {self.output}/{CAPTIONS}, {self.output}/{ERRORS}, {self.output}/{MANIFEST}")


# --------------------------------------------------------------------------------------------------------
# Inputs: a folder or URI (recursive), a glob, or a list file.


def list_inputs(source: str) -> tuple[list[VideoInput], list[dict]]:
    """The videos `source` names, sorted by ID, and error records for what cannot be a video input.

    A folder (local or URI) is listed recursively for every extension the reader supports; IDs are paths
    relative to it without the extension. A glob matches files; a `.txt` lists paths (one a line, `#` comments);
    a `.csv`, `.jsonl` or `.parquet` has a `path` column and optionally `video_id`. Relative paths in a list
    are relative to the list's folder. Two inputs with one ID: the second is an error record.
    """
    text = os.fspath(source)
    if text.lower().endswith(LIST_SUFFIXES) and not storage.is_dir(text):
        pairs = _read_list(text)
    elif any(ch in text for ch in "*?["):
        pairs = _glob(text)
    else:
        pairs = _walk(text)
    errors = [{"video_id": vid, "path": path, "reason": reason} for vid, path, reason in _outside(text, pairs)]
    refused = {e["path"] for e in errors}
    pairs = [(vid, path) for vid, path in pairs if path not in refused]
    seen: dict[str, VideoInput] = {}
    for video_id, path in pairs:
        if video_id in seen:
            errors.append({"video_id": video_id, "path": path, "reason": f"a second input with this video ID "
                                                                         f"(first: {seen[video_id].path})"})
        else:
            seen[video_id] = VideoInput(video_id, path)
    return sorted(seen.values(), key=lambda v: v.video_id), errors


def _outside(source: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """Links in a local folder that lead outside it (or nowhere): not videos of that folder (README, paths)."""
    local = storage.local_path(source)
    if local is None or not storage.is_dir(source):
        return []
    root = os.path.realpath(local)
    refused = []
    for video_id, path in pairs:
        if os.path.islink(path) or os.path.realpath(path) != os.path.abspath(path):
            target = os.path.realpath(path)
            if not os.path.isfile(target):
                refused.append((video_id, path, "a symbolic link that leads to no file"))
            elif os.path.commonpath([root, target]) != root:
                refused.append((video_id, path, f"a symbolic link that leads outside {source} (to {target})"))
    return refused


def _filesystem(path: str) -> tuple[Any, str, bool]:
    """(filesystem, path within it, whether it is remote storage)."""
    filesystem, inner = storage.filesystem(path)
    return filesystem, inner, storage.local_path(path) is None


def _is_video(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in VIDEO_EXTENSIONS and not name.startswith((".", "_"))


def _walk(folder: str) -> list[tuple[str, str]]:
    filesystem, inner, remote = _filesystem(folder)
    info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise CaptionError(f"--videos {folder}: no such folder, glob or list file")
    if info.type != pafs.FileType.Directory:
        return [(posixpath.splitext(posixpath.basename(inner))[0], folder)]
    root = inner.rstrip("/")
    if not remote:  # os.walk sees links as they are (pyarrow's listing drops dangling ones without a word)
        return sorted((posixpath.splitext(os.path.relpath(os.path.join(top, name), root).replace(os.sep, "/"))[0],
                       os.path.join(top, name))
                      for top, _, names in os.walk(root) for name in names if _is_video(name))
    pairs = []
    for entry in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File or not _is_video(entry.base_name):
            continue
        relative = posixpath.relpath(entry.path, root) if remote else os.path.relpath(entry.path, root)
        uri = f"{folder.rstrip('/')}/{relative}" if remote else entry.path
        pairs.append((posixpath.splitext(relative.replace(os.sep, "/"))[0], uri))
    return pairs


def _glob(pattern: str) -> list[tuple[str, str]]:
    if storage.local_path(pattern) is None:
        base = pattern[: min(pattern.find(ch) for ch in "*?[" if ch in pattern)].rsplit("/", 1)[0]
        return [(vid, path) for vid, path in _walk(base) if fnmatch.fnmatch(path, pattern)]
    return [(Path(path).stem, os.path.abspath(path)) for path in sorted(glob.glob(pattern, recursive=True))
            if os.path.isfile(path) and _is_video(os.path.basename(path))]


def _read_list(path: str) -> list[tuple[str, str]]:
    filesystem, inner, remote = _filesystem(path)
    try:
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read()
    except FileNotFoundError:
        raise CaptionError(f"--videos {path}: list file not found") from None
    base = path.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(inner))
    lower = path.lower()
    try:
        if lower.endswith(".txt"):
            rows = [{"path": line.strip()} for line in data.decode("utf-8").splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        elif lower.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
        elif lower.endswith(".jsonl"):
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
        else:
            rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, pa.ArrowInvalid, csv.Error) as exc:
        raise CaptionError(f"--videos {path}: not a readable list ({exc})") from None
    pairs = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"].strip():
            raise CaptionError(f"--videos {path}: entry {number} has no 'path' (a list needs a path column)")
        video_path = row["path"].strip()
        if not storage.is_uri(video_path) and not os.path.isabs(video_path):
            video_path = f"{base}/{video_path}" if remote else os.path.join(base, video_path)
        video_id = row.get("video_id")
        pairs.append((str(video_id) if video_id not in (None, "") else Path(video_path).stem, video_path))
    return pairs


def synthetic_test_inputs(cfg: Config) -> list[VideoInput]:
    """The embedded default: the synthetic dataset's test videos (made under `data.root` if missing)."""
    dataset = synthetic.from_config(cfg.data)
    return [VideoInput(v, str(dataset.video_path(v).resolve())) for v in dataset.video_ids("test")]


# --------------------------------------------------------------------------------------------------------
# The output folder.


class OutputFolder:
    """The job's output folder (local or a URI): whole files, each written atomically (`stgpt.storage`)."""

    def __init__(self, uri: str):
        self.uri = uri
        filesystem, root = storage.filesystem(uri)
        filesystem.create_dir(root, recursive=True)

    def path(self, name: str) -> str:
        return storage.child(self.uri, name)

    def exists(self, name: str) -> bool:
        return storage.exists(self.path(name))

    def write(self, name: str, data: bytes) -> None:
        storage.write_bytes(self.path(name), data)

    def read(self, name: str) -> bytes:
        return storage.read_bytes(self.path(name))

    def clear(self) -> None:
        filesystem, root = storage.filesystem(self.uri)
        filesystem.delete_dir_contents(root, missing_dir_ok=True)


def _jsonl(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def settings_of(checkpoint: str, cfg: Config) -> dict[str, Any]:
    """What changes the captions: a re-run with other values is refused unless --overwrite."""
    video = cfg.video
    return {"checkpoint": checkpoint, "generation": cfg.generation.generate_kwargs(),
            "num_frames": video.num_frames, "short_side": video.short_side, "crop_size": video.crop_size,
            "window_seconds": cfg.caption.window_seconds,
            "window_stride_seconds": cfg.caption.window_stride_seconds or cfg.caption.window_seconds}


# --------------------------------------------------------------------------------------------------------
# The job.


def caption_collection(videos: str | list[VideoInput], output: str, checkpoint: str, cfg: Config,
                       overwrite: bool = False, log: Callable[[str], None] = print) -> CaptionSummary:
    """Caption every video of `videos` (a source `list_inputs` reads, or the inputs themselves) into `output`."""
    start = time.perf_counter()
    ccfg = cfg.caption
    inputs, listing_errors = list_inputs(videos) if isinstance(videos, str) else (sorted(videos, key=lambda v: v.video_id), [])
    folder = OutputFolder(output)
    settings = settings_of(checkpoint, cfg)
    if overwrite:
        folder.clear()
    elif folder.exists(MANIFEST):
        previous = json.loads(folder.read(MANIFEST)).get("settings")
        if previous != settings:
            changed = sorted(k for k in settings if (previous or {}).get(k) != settings[k])
            raise CaptionError(f"{output} holds captions made with other settings ({', '.join(changed)}): "
                               "use another --output, or --overwrite to replace them")
    size = max(1, ccfg.videos_per_part)
    parts = [inputs[i:i + size] for i in range(0, len(inputs), size)]
    kept = {k for k, videos_k in enumerate(parts) if _part_is_done(folder, k, videos_k)}
    todo = [(k, v) for k, videos_k in enumerate(parts) if k not in kept for v in videos_k]
    folder.write(MANIFEST, json.dumps({"settings": settings, "status": "running", "videos": len(inputs),
                                       "parts": len(parts)}, indent=2).encode())
    log(f"{len(inputs)} videos in {len(parts)} parts: {len(kept)} already done, {len(todo)} videos to caption "
        f"with {checkpoint}")
    per_actor: Counter = Counter()
    written = 0
    if todo:
        num_actors = pool_size(ccfg.num_actors, ccfg.cpus_per_actor, log)
        items = [{"video_id": v.video_id, "path": v.path, "part": k} for k, v in todo]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * num_actors)))
        dataset = caption_stages(dataset, decode_videos, {"video": cfg.video, "window_s": ccfg.window_seconds,
                                                          "stride_s": ccfg.window_stride_seconds},
                                 checkpoint, cfg.generation, ccfg, num_actors)
        collector = _PartCollector(folder, {k: parts[k] for k in {k for k, _ in todo}}, settings)
        for row in dataset.iter_rows():
            if row["kind"] == "window" and row["actor"]:
                per_actor[row["actor"]] += 1
            written += collector.add(row)
            beat()  # a window or an error finished: progress for the job's stall watchdog
        collector.finish()
    return _finish(folder, parts, listing_errors, settings, len(kept), written, time.perf_counter() - start,
                   dict(per_actor))


def _part_is_done(folder: OutputFolder, part: int, videos: list[VideoInput]) -> bool:
    name = _part_name(part)
    if not (folder.exists(name) and folder.exists(_errors_name(part))):
        return False
    metadata = pq.read_schema(pa.BufferReader(folder.read(name))).metadata or {}
    return json.loads(metadata.get(b"stgpt", b"{}")).get("videos") == [v.video_id for v in videos]


def _part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def _errors_name(part: int) -> str:
    return f"part-{part:05d}.errors.jsonl"


class _PartCollector:
    """Gathers the stream's rows by part; writes a part (captions, then its errors) once all its videos are in."""

    def __init__(self, folder: OutputFolder, parts: dict[int, list[VideoInput]], settings: dict):
        self.folder, self.parts, self.settings = folder, parts, settings
        self.windows: dict[str, list[dict]] = defaultdict(list)
        self.expected: dict[str, int] = {}
        self.errors: dict[str, dict] = {}
        self.model = posixpath.basename(settings["checkpoint"].rstrip("/")) or settings["checkpoint"]

    def add(self, row: dict) -> int:
        video_id = row["video_id"]
        if row["kind"] == "window":
            self.windows[video_id].append(row)
        elif row["kind"] == "end":
            self.expected[video_id] = int(row["window_index"])
        elif video_id not in self.errors:
            self.errors[video_id] = {"video_id": video_id, "path": row["path"], "reason": row["error"]}
        part = int(row["part"])
        if part in self.parts and all(self._done(v.video_id) for v in self.parts[part]):
            self._write(part)
            return 1
        return 0

    def _done(self, video_id: str) -> bool:
        if video_id in self.errors:
            return True
        return video_id in self.expected and len(self.windows[video_id]) == self.expected[video_id]

    def _write(self, part: int) -> None:
        videos = self.parts.pop(part)
        generation = json.dumps(self.settings["generation"], sort_keys=True)
        rows, errors = [], []
        for video in videos:
            if video.video_id in self.errors:  # a video with an error is that error, not some of its windows
                errors.append(self.errors.pop(video.video_id))
            elif not self.windows.get(video.video_id):
                errors.append({"video_id": video.video_id, "path": video.path, "reason": "no frames in any window"})
            for window in sorted(self.windows.pop(video.video_id, []), key=lambda w: w["window_index"]):
                if errors and errors[-1]["video_id"] == video.video_id:
                    continue
                rows.append({"video_id": video.video_id, "path": video.path,
                             "window_index": int(window["window_index"]),
                             "window_start_s": float(window["window_start_s"]),
                             "window_end_s": float(window["window_end_s"]), "caption": window["caption"],
                             "frame_indices": [int(i) for i in window["frame_indices"]],
                             "num_source_frames": int(window["num_source_frames"]), "model": self.model,
                             "generation": generation})
            self.expected.pop(video.video_id, None)
        metadata = {"stgpt": json.dumps({"videos": [v.video_id for v in videos], "rows": len(rows),
                                         "errors": len(errors)})}
        table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(metadata))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.folder.write(_errors_name(part), _jsonl(errors))  # first: a part file means both are there
        self.folder.write(_part_name(part), sink.getvalue().to_pybytes())

    def finish(self) -> None:
        if self.parts:
            missing = sorted(v.video_id for videos in self.parts.values() for v in videos if not self._done(v.video_id))
            raise RuntimeError(f"the pipeline ended with {len(missing)} videos unaccounted for: {missing[:5]}")


def _finish(folder: OutputFolder, parts: list[list[VideoInput]], listing_errors: list[dict], settings: dict,
            kept: int, written: int, seconds: float, per_actor: dict[str, int]) -> CaptionSummary:
    """captions.jsonl and errors.jsonl from every part, the accounting checked, the manifest marked done."""
    captions, errors = [], list(listing_errors)
    for k in range(len(parts)):
        table = pq.read_table(pa.BufferReader(folder.read(_part_name(k))))
        captions += table.to_pylist()
        errors += [json.loads(line) for line in folder.read(_errors_name(k)).decode().splitlines() if line]
    captioned = {row["video_id"] for row in captions}
    failed = Counter(e["video_id"] for e in errors if e not in listing_errors)
    expected = {v.video_id for videos in parts for v in videos}
    if captioned & set(failed) or any(n > 1 for n in failed.values()) or captioned | set(failed) != expected:
        raise RuntimeError("accounting failed: every video must be captions or one error")  # pragma: no cover
    folder.write(CAPTIONS, _jsonl([{k: row[k] for k in ("video_id", "window_start_s", "window_end_s", "caption")}
                                   for row in captions]))
    folder.write(ERRORS, _jsonl(errors))
    summary = CaptionSummary(folder.uri, len(expected), len(captions), len(captions), len(errors), kept, written,
                             seconds, per_actor)
    folder.write(MANIFEST, json.dumps({"settings": settings, "status": "done", **{
        k: v for k, v in asdict(summary).items() if k not in ("output", "per_actor")}}, indent=2).encode())
    return summary

