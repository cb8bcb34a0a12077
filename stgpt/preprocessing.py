"""Preprocessing: a folder of videos plus VATEX-format annotations in, Parquet shards out, with Ray Data.

Each video is decoded on a Ray worker by `stgpt.video.sample_video` (the exact reader, as every model-input
path), centre-cropped as the VideoMAE processor does, and stored as one row of `stgpt.shards.SCHEMA` (uint8
frames JPEG-encoded; RESULTS.md compares the encodings). The work plan is a pure function of the annotations
and settings: sorted video IDs are cut into parts (one shard file each, `<split>-part-P-of-N.parquet`) and
parts into pieces (the unit of Ray work, staged in `_work/`, merged by a Ray task when a part's pieces are in).

Nothing lost, nothing twice: every video ends as a row or an error record carried in the shard's metadata, so
shards alone account for every video (`<split>-errors.jsonl` gathers them). Files appear whole or not at all,
a re-run skips what exists when it was made from the same inputs (a digest of captions and files), other
settings are refused unless asked to overwrite, and one run at a time holds the folder (`_lock.json`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pyarrow import fs as pafs

from stgpt.annotations import MISSING_VIDEO, VideoFile, find_video_files, load_annotations
from stgpt import storage, synthetic
from stgpt.config import Config, ConfigError, PreprocessConfig, VideoConfig
from stgpt.resources import beat
from stgpt.isolation import sample_video_isolated
from stgpt.shards import ENCODINGS, SCHEMA, SHARD_NAME, encode_frames, shard_file_name
from stgpt.video import VideoDecodeError, sample_video

FORMAT_VERSION = 1
METADATA_KEY = b"stgpt"
WORK_DIR = "_work"
ATTEMPTS_DIR = f"{WORK_DIR}/attempts"
LOCK_FILE = "_lock.json"  # the run using the folder (readers skip "_" names)
# JPEG/PNG bytes do not compress further; everything else is small and compresses well.
_COMPRESSION = {name: ("none" if name == "frames" else "zstd") for name in SCHEMA.names}


class PreprocessError(RuntimeError):
    """A run that cannot start: no videos, a split named twice, or an output made with other settings."""


# --------------------------------------------------------------------------------------------------------
# The plan: which videos go into which part and piece. Deterministic, so that a re-run finds the same work.


@dataclass(frozen=True)
class SplitInput:
    """One annotation file to preprocess, the folder holding its videos, and the split name for its shards."""

    split: str
    annotations: str
    videos: str


def split_inputs(cfg: Config, annotations: Sequence[str] | None = None, videos: str | None = None,
                 split: str | None = None) -> list[SplitInput]:
    """The splits a preprocessing job reads: the annotation files given, else `data.annotations`, else every
    split of the synthetic dataset (made if missing); each named by `split` or its file name."""
    data = cfg.data
    annotations = annotations or ([data.annotations] if data.annotations else None)
    if annotations is None:
        dataset = synthetic.from_config(data)
        return [SplitInput(name, str(path), videos or str(dataset.video_dir))
                for name, path in dataset.annotation_paths.items()]
    videos = videos or data.videos
    if not videos:
        raise ConfigError("--videos (or data.videos) is required with --annotations")
    if split and len(annotations) > 1:
        raise ConfigError("--split names one annotation file's split; with several files, names come from them")
    return [SplitInput(split or split_name(a), os.fspath(a), videos) for a in annotations]


def split_name(annotation_path: str | os.PathLike) -> str:
    """train / validation / test from an annotation file's name (`vatex_training_v1.0.json` -> train)."""
    stem = posixpath.basename(os.fspath(annotation_path)).split(".")[0].lower()
    for word, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        if word in stem:
            return name
    return re.sub(r"[^a-z0-9_-]+", "_", stem).strip("_") or "data"


@dataclass(frozen=True)
class Piece:
    """A few videos of one part: the unit of work of one Ray task."""

    split: str
    part: int
    num_parts: int
    piece: int
    num_pieces: int
    video_ids: tuple[str, ...]
    paths: tuple[str | None, ...]  # None: no file for this video
    captions: tuple[tuple[str, ...], ...]
    videos: str = ""  # the folder searched, to name a missing video's expected path in its error record
    reasons: tuple[str, ...] = ()  # per video: why it has no path (not found, a link leading outside, ...), or ""
    inputs: str = ""  # digest of what the piece is made from (`SplitPlan.inputs_digest`)
    part_inputs: str = ""  # the same for its whole part, stored in the shard

    @property
    def file_name(self) -> str:
        """Where the piece's rows go: straight into the shard when the part has one piece, else into _work/."""
        if self.num_pieces == 1:
            return shard_file_name(self.split, self.part, self.num_parts)
        return piece_file_name(self.split, self.part, self.piece, self.num_pieces)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Piece:
        raw = json.loads(text)
        raw["video_ids"] = tuple(raw["video_ids"])
        raw["paths"] = tuple(raw["paths"])
        raw["captions"] = tuple(tuple(c) for c in raw["captions"])
        raw["reasons"] = tuple(raw.get("reasons", ()))
        return cls(**raw)


def piece_file_name(split: str, part: int, piece: int, num_pieces: int) -> str:
    return f"{WORK_DIR}/{split}-part-{part:05d}-piece-{piece:05d}-of-{num_pieces:05d}.parquet"


@dataclass
class SplitPlan:
    """A split's videos in sorted order, where their files are, and how they are cut into parts and pieces."""

    source: SplitInput
    video_ids: list[str]
    captions: dict[str, list[str]]
    paths: dict[str, str]
    missing: list[str]
    rows_per_shard: int
    videos_per_task: int
    files: dict[str, VideoFile] = field(default_factory=dict)  # the file found for each ID, with size and mtime
    rejected: dict[str, str] = field(default_factory=dict)  # ID -> why the file there is not a video

    @property
    def split(self) -> str:
        return self.source.split

    @property
    def num_parts(self) -> int:
        return math.ceil(len(self.video_ids) / self.rows_per_shard)

    def part_ids(self, part: int) -> list[str]:
        return self.video_ids[part * self.rows_per_shard:(part + 1) * self.rows_per_shard]

    def pieces(self, part: int) -> list[Piece]:
        ids = self.part_ids(part)
        size = min(self.videos_per_task, self.rows_per_shard)
        chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
        return [
            Piece(
                split=self.split, part=part, num_parts=self.num_parts, piece=index, num_pieces=len(chunks),
                video_ids=tuple(chunk), paths=tuple(self.paths.get(v) for v in chunk),
                captions=tuple(tuple(self.captions[v]) for v in chunk), videos=self.source.videos,
                reasons=tuple("" if v in self.paths else self.rejected.get(v, MISSING_VIDEO) for v in chunk),
                inputs=self.inputs_digest(chunk), part_inputs=self.inputs_digest(ids),
            )
            for index, chunk in enumerate(chunks)
        ]

    def inputs_digest(self, video_ids: Sequence[str]) -> str:
        """What rows of these videos are made from: captions, the file found (name, size, modification time)
        or why none was. A finished shard or piece whose digest differs from this run's is made again. The name,
        not the whole path: the same folder reached by another path (a copy of the working directory under
        `ray job submit`, a mount point) is the same input."""
        entries = []
        for video_id in video_ids:
            found = self.files.get(video_id)
            where = ([posixpath.basename(found.path), found.size, found.mtime_ns] if found
                     else self.rejected.get(video_id, MISSING_VIDEO))
            entries.append([video_id, self.captions[video_id], where])
        return hashlib.sha256(json.dumps(entries).encode("ascii")).hexdigest()

    def fingerprint(self, video: VideoConfig, cfg: PreprocessConfig) -> dict[str, Any]:
        """What fixes the content of the shards: a re-run must match it to reuse finished files."""
        digest = hashlib.sha256("\n".join(self.video_ids).encode("utf-8")).hexdigest()
        return {
            "format": FORMAT_VERSION,
            "split": self.split,
            "num_videos": len(self.video_ids),
            "video_ids_sha256": digest,
            "rows_per_shard": self.rows_per_shard,
            "num_parts": self.num_parts,
            "frames": {"num_frames": video.num_frames, "short_side": video.short_side, "crop_size": video.crop_size,
                       "encoding": cfg.frame_encoding,
                       "jpeg_quality": cfg.jpeg_quality if cfg.frame_encoding == "jpeg" else None},
        }


def plan_split(source: SplitInput, rows_per_shard: int, videos_per_task: int) -> SplitPlan:
    """Read and check the annotations (AnnotationError names the place of a fault) and find the videos."""
    annotations = load_annotations(source.annotations)
    if not annotations:
        raise PreprocessError(f"{source.annotations}: the annotation file lists no videos")
    captions = {a.video_id: list(a.captions) for a in annotations}
    listing = find_video_files(list(captions), source.videos)
    return SplitPlan(source=source, video_ids=sorted(captions), captions=captions,
                     paths={v: f.path for v, f in listing.found.items()}, missing=listing.missing,
                     rows_per_shard=rows_per_shard, videos_per_task=videos_per_task, files=listing.found,
                     rejected=listing.rejected)


# --------------------------------------------------------------------------------------------------------
# The output folder, through pyarrow.fs so that s3:// and gs:// work like local paths.


class OutputFolder:
    """Names inside the output folder, listing, and atomic writes (temporary file, then rename).

    Unlike `stgpt.storage`'s writes, temporaries go to the folder's own staging area (`<work dir>/tmp`): workers
    stream whole shards into them, they never appear among the outputs, and a run cleans what a killed worker
    left there (`clean_temporary`)."""

    def __init__(self, uri: str | os.PathLike, create: bool = True):
        self.uri = os.fspath(uri)
        self.fs, self.root = storage.filesystem(self.uri)
        self.root = self.root.rstrip("/") or "/"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        if create:
            for folder in (f"{WORK_DIR}/tmp", ATTEMPTS_DIR):
                self.fs.create_dir(self.path(folder), recursive=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self, folder: str = "") -> set[str]:
        """File names directly in the root (or in one of its folders, as `folder/name`)."""
        base = self.path(folder) if folder else self.root
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False))
        except FileNotFoundError:
            return set()
        prefix = f"{folder}/" if folder else ""
        return {prefix + info.base_name for info in infos if info.type == pafs.FileType.File}

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def delete(self, name: str) -> None:
        try:
            self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            pass

    def _commit(self, name: str, write: Callable[[Any], None]) -> None:
        temporary = f"{self.root}/{WORK_DIR}/tmp/{uuid.uuid4().hex}-{posixpath.basename(name)}"
        try:
            with self.fs.open_output_stream(temporary) as stream:
                write(stream)
            self.fs.move(temporary, self.path(name))
        finally:
            try:
                self.fs.delete_file(temporary)
            except (FileNotFoundError, OSError):
                pass

    def write_bytes(self, name: str, data: bytes) -> None:
        self._commit(name, lambda stream: stream.write(data))

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))

    def read_json(self, name: str) -> Any:
        try:
            with self.fs.open_input_stream(self.path(name)) as stream:
                return json.loads(stream.read().decode("utf-8"))
        except FileNotFoundError:
            return None

    def write_parquet(self, name: str, tables: Iterable[pa.Table], metadata: dict) -> int:
        """Stream tables (row groups) into one Parquet file whose `stgpt` metadata is `metadata`; returns rows."""
        schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode("utf-8")})
        rows = 0

        def write(stream) -> None:
            nonlocal rows
            with pq.ParquetWriter(stream, schema, compression=_COMPRESSION, use_dictionary=["split", "encoding"]) as w:
                for table in tables:
                    if table.num_rows:
                        w.write_table(table.cast(schema))
                        rows += table.num_rows

        self._commit(name, write)
        return rows

    def read_metadata(self, name: str) -> dict:
        """The `stgpt` metadata of a Parquet file (read from its footer only)."""
        with self.fs.open_input_file(self.path(name)) as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata[METADATA_KEY].decode("utf-8"))

    def read_table(self, name: str) -> pa.Table:
        with self.fs.open_input_file(self.path(name)) as handle:
            return pq.read_table(handle, schema=SCHEMA)

    def clean_temporary(self) -> None:
        for name in self.names(f"{WORK_DIR}/tmp") | self.names(ATTEMPTS_DIR):
            self.delete(name)


# --------------------------------------------------------------------------------------------------------
# The worker: one piece in, its rows and errors written, a short report out.


def preprocess_video(source: str, video: VideoConfig, encoding: str = "jpeg", jpeg_quality: int = 95,
                     name: str | None = None, isolated: bool = False) -> dict[str, Any]:
    """Decode, sample, resize and centre-crop one video (path or URI); its shard columns except ID and captions.
    `isolated` decodes in a child process (`stgpt.isolation`): a decoder that crashes or hangs fails this video,
    not the worker.

    Raises `VideoDecodeError` (with the reason) for any file that is not a usable video.
    """
    from stgpt.transforms import resize_and_crop  # torch: here, so the merge tasks of this module stay light

    sample = sample_video_isolated if isolated else sample_video
    sampled = sample(_read_source(source), video, name=name or source)
    frames = resize_and_crop(sampled.frames, video.short_side, video.crop_size).numpy()
    return {
        "frames": encode_frames(frames, encoding, jpeg_quality),
        "encoding": encoding,
        "height": frames.shape[1],
        "width": frames.shape[2],
        "frame_indices": sampled.indices.tolist(),
        "num_source_frames": int(sampled.num_source_frames),
    }


def _read_source(source: str) -> str | bytes:
    """Local paths go to the decoder as they are; other filesystems are read into memory (VideoDecodeError if
    they cannot be)."""
    try:
        return storage.video_source(source)
    except FileNotFoundError:
        raise VideoDecodeError(source, "file not found") from None
    except OSError as exc:
        raise VideoDecodeError(source, f"cannot read file ({exc})") from None


class PiecePreprocessor:
    """Ray Data callable class: preprocesses the videos of one piece per call and writes them to the output.

    One instance lives in each actor of the pool, so the output filesystem is opened once per worker. A video
    that fails becomes an error record, never an exception: a bad file must not stop the job.
    """

    def __init__(self, output: str, video: dict, encoding: str, jpeg_quality: int, num_threads: int = 1):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.folder = OutputFolder(output)
        self.video = VideoConfig(**video)
        self.encoding = encoding
        self.jpeg_quality = jpeg_quality
        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        reports = [self.process(Piece.from_json(str(text))) for text in batch["piece"]]
        return {key: [report[key] for report in reports] for key in reports[0]}

    def process(self, piece: Piece) -> dict[str, Any]:
        start = time.perf_counter()
        # Ray runs a piece again when its worker died. If a video crashed the decoder (segfault), it would again:
        # from the second attempt on, each video is decoded in a child process, whose death is that video's error.
        isolated = self._begin_attempt(piece) > 0
        rows, errors = [], []
        reasons = piece.reasons or (MISSING_VIDEO,) * len(piece.video_ids)
        for video_id, path, captions, why in zip(piece.video_ids, piece.paths, piece.captions, reasons):
            if path is None:
                errors.append(_error(piece, video_id, f"{piece.videos.rstrip('/')}/{video_id}.mp4",
                                     why or MISSING_VIDEO))
                continue
            try:
                row = preprocess_video(path, self.video, self.encoding, self.jpeg_quality, name=path, isolated=isolated)
            except VideoDecodeError as exc:
                errors.append(_error(piece, video_id, path, exc.reason))
                continue
            except Exception as exc:  # a decoder crash on one odd file must not lose the others
                errors.append(_error(piece, video_id, path, f"unexpected {type(exc).__name__}: {exc}"[:500]))
                continue
            rows.append({"video_id": video_id, "split": piece.split, "captions": list(captions), **row})
        report = {
            "piece": piece.piece, "num_pieces": piece.num_pieces, "rows": len(rows), "errors": errors,
            "node_id": self.node_id, "host": self.host, "seconds": round(time.perf_counter() - start, 3),
            "isolated": isolated, "inputs": piece.inputs,
        }
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        if piece.num_pieces == 1:
            self.folder.write_parquet(piece.file_name, [table], part_metadata(piece.split, piece.part,
                                                                             piece.num_parts, [report],
                                                                             piece.part_inputs))
        else:
            self.folder.write_parquet(piece.file_name, [table], {"format": FORMAT_VERSION, "split": piece.split,
                                                                 "part": piece.part, **report})
        for name in self.folder.names(ATTEMPTS_DIR):
            if posixpath.basename(name).startswith(_attempt_prefix(piece)):
                self.folder.delete(name)
        _release_freed_memory()
        return {"split": piece.split, "part": piece.part, "piece": piece.piece, "rows": len(rows),
                "errors": len(errors), "node_id": self.node_id, "seconds": report["seconds"],
                "bytes": int(table.nbytes)}


    def _begin_attempt(self, piece: Piece) -> int:
        """Record that this piece is being worked on; returns how many earlier attempts of this run did not finish."""
        prefix = _attempt_prefix(piece)
        earlier = sum(1 for name in self.folder.names(ATTEMPTS_DIR) if posixpath.basename(name).startswith(prefix))
        self.folder.write_bytes(f"{ATTEMPTS_DIR}/{prefix}{uuid.uuid4().hex}", self.host.encode())
        return earlier


def _release_freed_memory() -> None:
    """Hand memory freed by decoding back to the OS; glibc keeps it otherwise, and a worker grew by about a
    third over 80 videos. With it, a long-lived worker stays near the size of one piece's work."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _attempt_prefix(piece: Piece) -> str:
    return f"{piece.split}-part-{piece.part:05d}-piece-{piece.piece:05d}."


def _error(piece: Piece, video_id: str, path: str, reason: str) -> dict[str, Any]:
    return {"video_id": video_id, "path": path, "reason": reason, "split": piece.split, "part": piece.part}


def part_metadata(split: str, part: int, num_parts: int, pieces: Sequence[dict], inputs: str = "") -> dict[str, Any]:
    """A shard's `stgpt` metadata: its part's counts and error records, what each piece's worker reported, and
    the digest of its inputs (`SplitPlan.inputs_digest`)."""
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "part": part,
        "num_parts": num_parts,
        "inputs": inputs,
        "rows": sum(p["rows"] for p in pieces),
        "errors": [error for p in pieces for error in p["errors"]],
        "pieces": [{k: p[k] for k in ("piece", "rows", "node_id", "host", "seconds")} | {"errors": len(p["errors"])}
                   for p in pieces],
    }


def merge_part(output: str, split: str, part: int, num_parts: int, num_pieces: int,
               inputs: str = "") -> dict[str, Any]:
    """Concatenate a part's piece files into its shard (one row group per piece), then delete the pieces."""
    folder = OutputFolder(output)
    names = [piece_file_name(split, part, piece, num_pieces) for piece in range(num_pieces)]
    shard = shard_file_name(split, part, num_parts)
    if folder.exists(shard) and not all(folder.exists(name) for name in names):
        metadata = folder.read_metadata(shard)  # merged already (by a run that was stopped before it ended)
        return {"split": split, "part": part, "rows": metadata["rows"], "errors": len(metadata["errors"])}
    reports = [folder.read_metadata(name) for name in names]
    metadata = part_metadata(split, part, num_parts, reports, inputs)
    folder.write_parquet(shard, (folder.read_table(n) for n in names), metadata)
    for name in names:
        folder.delete(name)
    return {"split": split, "part": part, "rows": metadata["rows"], "errors": len(metadata["errors"])}


# --------------------------------------------------------------------------------------------------------
# The summary.


@dataclass
class SplitSummary:
    """Counts of one split over the whole output folder (this run and earlier ones)."""

    split: str
    videos: int
    rows: int
    errors: int
    parts: int
    parts_resumed: int  # shards already there when the run started
    videos_processed: int  # videos decoded by this run
    nodes: dict[str, int] = field(default_factory=dict)  # node ID -> videos it handled (all runs)
    errors_file: str = ""


@dataclass
class PreprocessSummary:
    """What a run did: per split, and in total; throughput counts only the videos this run processed."""

    output: str
    splits: list[SplitSummary]
    seconds: float
    max_error_rate: float

    @property
    def videos(self) -> int:
        return sum(s.videos for s in self.splits)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.splits)

    @property
    def errors(self) -> int:
        return sum(s.errors for s in self.splits)

    @property
    def videos_processed(self) -> int:
        return sum(s.videos_processed for s in self.splits)

    @property
    def error_rate(self) -> float:
        return self.errors / self.videos if self.videos else 0.0

    @property
    def nodes(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.splits:
            total.update(s.nodes)
        return dict(total)

    @property
    def too_many_errors(self) -> bool:
        return self.error_rate > self.max_error_rate

    def error_rate_message(self) -> str:
        files = ", ".join(s.errors_file for s in self.splits if s.errors)
        return (f"{self.errors} of {self.videos} videos ({self.error_rate:.1%}) could not be used, more than the "
                f"allowed {self.max_error_rate:.1%} (preprocess.max_error_rate / --max-error-rate). The shards "
                f"hold the other {self.rows}; the reasons are in {files}.")

    def format(self) -> str:
        lines = [f"{'split':<12} {'videos':>7} {'rows':>7} {'errors':>7} {'parts':>6} {'resumed':>8}"]
        for s in self.splits:
            lines.append(f"{s.split:<12} {s.videos:>7} {s.rows:>7} {s.errors:>7} {s.parts:>6} {s.parts_resumed:>8}")
        rate = self.videos_processed / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"videos in: {self.videos}, rows written: {self.rows}, errors: {self.errors} ({self.error_rate:.1%}); "
            f"this run processed {self.videos_processed} videos in {self.seconds:.1f} s ({rate:.2f} videos/s) "
            f"on {len(self.nodes)} node(s); output: {self.output}"
        )
        for s in self.splits:
            if s.errors:
                lines.append(f"errors of {s.split}: {s.errors_file}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# The driver.


def preprocess(
    sources: Sequence[SplitInput],
    output: str | os.PathLike,
    cfg: Config,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> PreprocessSummary:
    """Preprocess every split into `output`, resuming what an earlier run with the same settings left.

    Annotation files are all read and checked before any work starts (AnnotationError names the file and the
    place). An output made with other settings raises PreprocessError unless `overwrite`, which deletes that
    split's files first. `progress` switches Ray Data's progress bars (None leaves the current setting).
    Returns the summary; deciding what too many errors mean is the caller's (see `too_many_errors`).
    Finished shards whose inputs changed (captions, the file found for a video) are made again; a second run on
    the same output while one works raises PreprocessError (see `RunLock`).
    """
    pcfg = cfg.preprocess
    _check_settings(pcfg)
    names = [s.split for s in sources]
    if len(set(names)) != len(names):
        raise PreprocessError(f"split names must differ, got {names} (pass --split to name them)")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise PreprocessError(f"split name {name!r} must be letters, digits, '_' or '-' (it names files)")
    plans = [plan_split(source, pcfg.rows_per_shard, pcfg.videos_per_task) for source in sources]
    for plan in plans:
        if plan.missing:
            log(f"{plan.split}: {len(plan.missing)} of {len(plan.video_ids)} videos have no file in "
                f"{plan.source.videos}; they go to the errors file")

    folder = OutputFolder(output)
    with RunLock(folder, log):
        return _preprocess_locked(folder, plans, cfg, overwrite, progress, log)


def _preprocess_locked(folder: OutputFolder, plans: list[SplitPlan], cfg: Config, overwrite: bool,
                       progress: bool | None, log: Callable[[str], None]) -> PreprocessSummary:
    pcfg = cfg.preprocess
    folder.clean_temporary()  # a new run: temporary files and attempt counts of earlier runs are void
    start = time.perf_counter()
    todo: list[Piece] = []
    pending: dict[tuple[str, int], set[int]] = {}  # parts to assemble from pieces: pieces still missing
    resumed: dict[str, int] = {}
    for plan in plans:
        done_parts, done_pieces = _prepare_split(folder, plan, cfg, overwrite, log)
        resumed[plan.split] = len(done_parts)
        for part in range(plan.num_parts):
            if part in done_parts:
                continue
            pieces = plan.pieces(part)
            waiting = [p for p in pieces if p.file_name not in done_pieces]
            todo.extend(waiting)
            if len(pieces) > 1:
                pending[(plan.split, part)] = {p.piece for p in waiting}

    if progress is not None:
        ray.data.DataContext.get_current().enable_progress_bars = progress
    merges = [_submit_merge(folder.uri, key, plans) for key, left in pending.items() if not left]
    processed: Counter = Counter()
    if todo:
        log(f"preprocessing {sum(len(p.video_ids) for p in todo)} videos in {len(todo)} tasks "
            f"({sum(resumed.values())} shards already done)")
        for report in _run_pieces(todo, folder.uri, cfg):
            processed[report["split"]] += report["rows"] + report["errors"]
            key = (report["split"], int(report["part"]))
            if key in pending:
                pending[key].discard(int(report["piece"]))
                if not pending[key]:
                    merges.append(_submit_merge(folder.uri, key, plans))
    ray.get(merges)
    seconds = time.perf_counter() - start

    summaries = [_finish_split(folder, plan, cfg, resumed[plan.split], processed[plan.split]) for plan in plans]
    return PreprocessSummary(output=folder.uri, splits=summaries, seconds=seconds, max_error_rate=pcfg.max_error_rate)


def _check_settings(pcfg: PreprocessConfig) -> None:
    if pcfg.rows_per_shard < 1 or pcfg.videos_per_task < 1:
        raise PreprocessError("preprocess.rows_per_shard and preprocess.videos_per_task must be at least 1")
    if pcfg.frame_encoding not in ENCODINGS:
        raise PreprocessError(f"preprocess.frame_encoding must be one of {ENCODINGS}, got {pcfg.frame_encoding!r}")
    if not 0 <= pcfg.max_error_rate <= 1:
        raise PreprocessError(f"preprocess.max_error_rate must be within [0, 1], got {pcfg.max_error_rate}")
    if pcfg.concurrency is not None and pcfg.concurrency < 1:
        raise PreprocessError(f"preprocess.concurrency must be at least 1 (or null), got {pcfg.concurrency}")


def _split_files(folder: OutputFolder, split: str) -> tuple[set[str], set[str]]:
    """(shard names, piece names) of a split that are in the folder."""
    shards = {n for n in folder.names() if (m := SHARD_NAME.match(n)) and m["split"] == split}
    pieces = {n for n in folder.names(WORK_DIR) if posixpath.basename(n).startswith(f"{split}-part-")}
    return shards, pieces


def _prepare_split(folder: OutputFolder, plan: SplitPlan, cfg: Config, overwrite: bool,
                   log: Callable[[str], None]) -> tuple[set[int], set[str]]:
    """Check the output against this run's settings, record them, and find the work already done.

    Returns the finished parts and the piece files of unfinished ones. Files of another plan are refused
    (or deleted with `overwrite`); stray pieces (of finished parts, or of another videos_per_task) are deleted.
    """
    split = plan.split
    fingerprint = plan.fingerprint(cfg.video, cfg.preprocess)
    manifest_name = f"{split}-manifest.json"
    manifest = folder.read_json(manifest_name)
    shards, pieces = _split_files(folder, split)
    old = None if manifest is None else manifest.get("fingerprint")
    if (shards or pieces or manifest is not None) and old != fingerprint:
        if not overwrite:
            what = _differences(old, fingerprint) if old else "files without a manifest"
            raise PreprocessError(
                f"{folder.uri} already holds split {split!r} made with other settings ({what}). Re-running "
                f"resumes only with the same annotations and settings: pass --overwrite to replace that split, "
                f"or choose another --output.")
        log(f"{split}: deleting {len(shards)} shards and {len(pieces)} pieces made with other settings (--overwrite)")
        for name in [*shards, *pieces, manifest_name, f"{split}-errors.jsonl"]:
            folder.delete(name)
        shards, pieces = set(), set()
    folder.write_json(manifest_name, {
        "fingerprint": fingerprint, "status": "running", "annotations": plan.source.annotations,
        "videos": plan.source.videos, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    # A finished shard or piece is kept only if it was made from this run's inputs (captions, files found).
    done_parts, changed = set(), []
    for name in sorted(shards):
        part = int(SHARD_NAME.match(name)["part"])
        if _made_from(folder, name, plan.inputs_digest(plan.part_ids(part))):
            done_parts.add(part)
        else:
            changed.append(name)
    wanted = {p.file_name: p for part in range(plan.num_parts) if part not in done_parts for p in plan.pieces(part)}
    changed += [name for name in sorted(pieces & set(wanted)) if not _made_from(folder, name, wanted[name].inputs)]
    if changed:
        log(f"{split}: making {len(changed)} finished shards or pieces again: their captions or video files "
            f"changed since they were made")
    for name in (pieces - set(wanted)) | set(changed):
        folder.delete(name)
    return done_parts, (pieces & set(wanted)) - set(changed)


def _made_from(folder: OutputFolder, name: str, inputs: str) -> bool:
    try:
        return folder.read_metadata(name).get("inputs") == inputs
    except (OSError, ValueError, KeyError):  # unreadable: make it again
        return False


class RunLock:
    """One preprocessing run per output folder: `_lock.json` names the run (pid, host, start) while it works.

    Created atomically on local disks (a hard link of a complete file, which fails if the lock exists); object
    stores have no create-if-absent in pyarrow, so there the lock is written and read back, which catches all
    but a near-simultaneous start. The holder rewrites its `heartbeat` every `HEARTBEAT_S`. A lock is stale,
    and taken over, when its process is gone (same host, pid not running) or, from another host, when its
    heartbeat is older than `STALE_AFTER_S` (a driver killed on a node or pod that is gone; clocks are assumed
    to agree within minutes). Otherwise the run is refused, naming the holder and the file.
    """

    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 600.0

    def __init__(self, folder: OutputFolder, log: Callable[[str], None] = print):
        self.folder, self.log = folder, log
        self.record = {"token": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "heartbeat": time.time()}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        if not self._create():
            holder = self.folder.read_json(LOCK_FILE) or {}
            if not self._gone(holder):
                raise PreprocessError(
                    f"{self.folder.uri} is in use by another preprocessing run (pid {holder.get('pid')} on host "
                    f"{holder.get('host')!r}, started {holder.get('started')}): wait for it to end or choose "
                    f"another --output; if no run uses it any more, delete {self.folder.path(LOCK_FILE)}")
            self.log(f"taking over the lock of an earlier run that is gone (pid {holder.get('pid')} on "
                     f"{holder.get('host')})")
            self.folder.write_json(LOCK_FILE, self.record)
        if not self._mine():
            raise PreprocessError(f"{self.folder.uri}: another preprocessing run took the lock at the same time")
        self._beat = threading.Thread(target=self._heartbeat, name="preprocess-lock", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._mine():
            self.folder.delete(LOCK_FILE)

    def _mine(self) -> bool:
        return (self.folder.read_json(LOCK_FILE) or {}).get("token") == self.record["token"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                if self._mine():
                    self.folder.write_json(LOCK_FILE, {**self.record, "heartbeat": time.time()})
            except OSError:  # a storage hiccup: the next beat tries again
                pass

    def _create(self) -> bool:
        data = json.dumps(self.record).encode()
        if self.folder.local:
            temporary = self.folder.path(f"{WORK_DIR}/tmp/lock-{self.record['token']}")
            with open(temporary, "wb") as stream:
                stream.write(data)
            try:
                os.link(temporary, self.folder.path(LOCK_FILE))
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(temporary)
        if self.folder.exists(LOCK_FILE):
            return False
        self.folder.write_bytes(LOCK_FILE, data)
        return True

    def _gone(self, holder: dict) -> bool:
        if not holder:  # vanished or unreadable
            return True
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            beat = holder.get("heartbeat")
            return isinstance(beat, (int, float)) and time.time() - beat > self.STALE_AFTER_S
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


def _run_pieces(pieces: list[Piece], output: str, cfg: Config) -> Iterator[dict[str, Any]]:
    """Ray Data: one input row per piece, a pool of `PiecePreprocessor` actors over the cluster, reports out."""
    pcfg = cfg.preprocess
    size = pcfg.concurrency
    if size is None:  # as many workers as the cluster's CPUs hold
        size = int(ray.cluster_resources().get("CPU", 1.0) // max(pcfg.num_cpus_per_task, 1e-3))
    # One piece at a time per actor: a free actor takes the next piece, so no piece waits behind a slow one.
    compute = ray.data.ActorPoolStrategy(size=max(1, min(size, len(pieces))), max_tasks_in_flight_per_actor=1)
    remote_args: dict[str, Any] = {"num_cpus": pcfg.num_cpus_per_task}
    if pcfg.memory_per_task_mb > 0:
        remote_args["memory"] = pcfg.memory_per_task_mb * 1024**2
    dataset = ray.data.from_items([{"piece": p.to_json()} for p in pieces], override_num_blocks=len(pieces))
    dataset = dataset.map_batches(
        PiecePreprocessor,
        fn_constructor_kwargs={"output": output, "video": dataclasses.asdict(cfg.video),
                               "encoding": pcfg.frame_encoding, "jpeg_quality": pcfg.jpeg_quality,
                               "num_threads": max(1, int(pcfg.num_cpus_per_task))},
        batch_size=1,
        compute=compute,
        **remote_args,
    )
    for row in dataset.iter_rows():
        beat()  # a piece finished: progress for the job's stall watchdog (stgpt.resources)
        yield row


@functools.cache
def _remote_merge():
    # I/O only, so it takes no CPU slot (the actor pool may hold them all); SPREAD keeps it off a busy driver.
    return ray.remote(num_cpus=0, scheduling_strategy="SPREAD", max_retries=3)(merge_part)


def _submit_merge(output: str, key: tuple[str, int], plans: Sequence[SplitPlan]):
    split, part = key
    plan = next(p for p in plans if p.split == split)
    return _remote_merge().remote(output, split, part, plan.num_parts, len(plan.pieces(part)),
                                  plan.inputs_digest(plan.part_ids(part)))


def _finish_split(folder: OutputFolder, plan: SplitPlan, cfg: Config, resumed: int,
                  processed: int) -> SplitSummary:
    """Read every shard's footer, check the accounting, write the errors file and the finished manifest."""
    split = plan.split
    rows, errors, nodes = 0, [], Counter()
    for part in range(plan.num_parts):
        metadata = folder.read_metadata(shard_file_name(split, part, plan.num_parts))
        rows += metadata["rows"]
        errors.extend(metadata["errors"])
        for piece in metadata["pieces"]:
            nodes[piece["node_id"]] += piece["rows"] + piece["errors"]
    if rows + len(errors) != len(plan.video_ids):  # would be a bug: every video is a row or an error
        raise PreprocessError(f"{split}: {rows} rows + {len(errors)} errors != {len(plan.video_ids)} videos")
    errors_name = f"{split}-errors.jsonl"
    folder.write_bytes(errors_name, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode())
    manifest = folder.read_json(f"{split}-manifest.json") or {}
    manifest.update(status="complete", rows=rows, errors=len(errors), updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    folder.write_json(f"{split}-manifest.json", manifest)
    return SplitSummary(split=split, videos=len(plan.video_ids), rows=rows, errors=len(errors),
                        parts=plan.num_parts, parts_resumed=resumed, videos_processed=processed,
                        nodes=dict(nodes), errors_file=folder.path(errors_name) if folder.local
                        else storage.child(folder.uri, errors_name))


def read_errors(output: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The error records of a split, as `<split>-errors.jsonl` in the output folder holds them."""
    folder = OutputFolder(output, create=False)
    with folder.fs.open_input_stream(folder.path(f"{split}-errors.jsonl")) as stream:
        return [json.loads(line) for line in stream.read().decode("utf-8").splitlines() if line.strip()]


def read_shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The `stgpt` metadata preprocessing stored in one shard file (path or URI)."""
    text = os.fspath(path)
    folder_uri, name = text.rsplit("/", 1)
    return OutputFolder(folder_uri, create=False).read_metadata(name)
