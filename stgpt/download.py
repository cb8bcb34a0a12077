"""Fetching VATEX clips from YouTube with yt-dlp, one Ray task per video, into a local or pyarrow folder.

A VATEX video ID is `<11-character YouTube ID>_<start>_<end>`; only IDs of exactly that form are asked for, and
file names and yt-dlp's template are built from them alone (no path from an annotation file reaches the disk).
Clips already there are skipped; videos YouTube reports gone go to `unavailable.jsonl` and are not asked for
again; transient failures are retried with backoff and what still fails is listed in `failed.jsonl`. Records
are written as results come, and clips land whole (a local temporary folder, then a move). yt-dlp is an
executable, not a Python dependency; tests use a stand-in, since test machines cannot reach YouTube.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import ray

from stgpt import storage
from stgpt.resources import beat
from stgpt.annotations import VIDEO_EXTENSIONS, find_videos, load_annotations

# Lowest-quality format that is at least 224 px high; else the best there is.
FORMAT = "wv*[height>=224]/bv*"
# yt-dlp's words for a video that will not come back, however often we ask (matched lower-case).
PERMANENT_ERRORS = (
    "video unavailable", "this video is unavailable", "private video", "has been removed", "been terminated",
    "account associated with this video", "copyright", "video is not available", "not available in your country",
    "sign in to confirm your age", "members-only", "join this channel", "http error 404", "does not exist",
    "no video formats found", "requested format is not available", "is not a valid url", "incomplete youtube id",
)
UNAVAILABLE_FILE = "unavailable.jsonl"
FAILED_FILE = "failed.jsonl"


class DownloaderNotFound(RuntimeError):
    """The yt-dlp executable is missing: a set-up problem, not a property of any video."""


@dataclass(frozen=True)
class Clip:
    """Where a VATEX video ID points: a YouTube video and the seconds of it that make the clip."""

    video_id: str
    youtube_id: str
    start: int
    end: int

    @property
    def url(self) -> str:
        return f"https://www.youtube.com/watch?v={self.youtube_id}"


# A YouTube video ID, and a VATEX clip ID: `<YouTube ID>_<start:06d>_<end:06d>` (ASCII only: no path separator,
# `%`, NUL, dot or non-ASCII character can reach a file name or a yt-dlp output template).
YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")
CLIP_ID = re.compile(r"(?P<youtube_id>[A-Za-z0-9_-]{11})_(?P<start>[0-9]{6})_(?P<end>[0-9]{6})")


def parse_video_id(video_id: str) -> Clip:
    """`Ptf_2VRj-V0_000122_000132` -> Clip(youtube_id="Ptf_2VRj-V0", start=122, end=132); ValueError otherwise.

    Only IDs of exactly this form pass, so file names built from them are safe; the message shows the ID
    escaped (`ascii`), so any text can be printed and recorded.
    """
    match = CLIP_ID.fullmatch(video_id) if isinstance(video_id, str) else None
    if match is None or int(match["end"]) <= int(match["start"]):
        shown = ascii(video_id)
        shown = shown if len(shown) <= 80 else f"{shown[:60]}... ({len(video_id)} characters)"
        raise ValueError(f"{shown} is not a VATEX video ID (<11-character YouTube ID>_<start:06d>_<end:06d>, "
                         f"end after start)")
    return Clip(video_id, match["youtube_id"], int(match["start"]), int(match["end"]))


def yt_dlp_command(executable: str, clip: Clip, folder: str, exact_cuts: bool = False) -> list[str]:
    """The yt-dlp command line that saves `clip` as `<folder>/<videoID>.<ext>`.

    The clip comes from `parse_video_id`, so its ID holds no `%` to expand; the folder's own `%` are escaped.
    """
    template = os.path.join(folder.replace("%", "%%"), f"{parse_video_id(clip.video_id).video_id}.%(ext)s")
    command = [
        executable, "--no-playlist", "--no-progress", "--no-overwrites",
        "-f", FORMAT,
        "--download-sections", f"*{clip.start}-{clip.end}",
        "-o", template,
    ]
    if exact_cuts:  # re-encodes around the cuts: frame-exact clips, at a CPU cost
        command.append("--force-keyframes-at-cuts")
    return [*command, clip.url]


@dataclass
class DownloadResult:
    """What became of one video: downloaded, unavailable, invalid (not a VATEX ID: never asked for), or failed
    (retry later)."""

    video_id: str
    status: str
    attempts: int = 0
    reason: str = ""
    path: str = ""


def download_clip(
    video_id: str,
    folder: str,
    executable: str = "yt-dlp",
    max_attempts: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 600.0,
    exact_cuts: bool = False,
) -> DownloadResult:
    """Fetch one clip into `folder` (local or URI), retrying transient failures; never raises for a bad video."""
    try:
        clip = parse_video_id(video_id)
    except ValueError as exc:
        return DownloadResult(video_id, "invalid", reason=str(exc))
    destination = _Folder(folder)
    reason = ""
    for attempt in range(1, max_attempts + 1):
        staging = tempfile.mkdtemp(prefix="stgpt-download-")
        try:
            try:
                done = subprocess.run(yt_dlp_command(executable, clip, staging, exact_cuts), capture_output=True,
                                      text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise DownloaderNotFound(f"yt-dlp executable {executable!r} not found: install it (pip install "
                                         f"yt-dlp, plus ffmpeg) or pass --yt-dlp PATH") from None
            except subprocess.TimeoutExpired:
                reason = f"timed out after {timeout_s:.0f} s"
            else:
                output = _produced_file(staging, video_id)
                if done.returncode == 0 and output:
                    try:
                        path = destination.put(output, f"{clip.video_id}{os.path.splitext(output)[1].lower()}")
                    except OSError as exc:  # disk full, permissions: this clip fails, the others go on
                        reason = f"cannot store the clip ({exc})"[:500]
                    else:
                        return DownloadResult(video_id, "downloaded", attempt, path=path)
                else:
                    reason = _error_text(done.stderr, done.stdout) or f"yt-dlp exited {done.returncode} with no file"
                if any(words in reason.lower() for words in PERMANENT_ERRORS):
                    return DownloadResult(video_id, "unavailable", attempt, reason=reason)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if attempt < max_attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return DownloadResult(video_id, "failed", max_attempts, reason=reason)


def _produced_file(staging: str, video_id: str) -> str | None:
    """The finished clip yt-dlp left in `staging` (not a .part or fragment), if any."""
    for name in sorted(os.listdir(staging)):
        stem, extension = os.path.splitext(name)
        if stem == video_id and extension.lower() in VIDEO_EXTENSIONS:
            return os.path.join(staging, name)
    return None


def _error_text(stderr: str, stdout: str) -> str:
    lines = [line.strip() for line in (stderr or stdout or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return ((errors or lines or [""])[-1])[:500]


class _Folder:
    """The videos folder through pyarrow.fs: whole files moved in, small JSON-lines records read and written."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = storage.filesystem(uri)
        self.root = self.root.rstrip("/") or "/"
        self.local = storage.local_path(uri) is not None

    def put(self, local_file: str, name: str) -> str:
        """Move a finished local file into the folder under `name`, appearing whole or not at all."""
        target = storage.child(self.uri, name)
        if self.local:
            with storage.replacing(f"{self.root}/{name}") as temporary:
                shutil.copyfile(local_file, temporary)  # the staging folder may be on another device
            return f"{self.root}/{name}"
        with open(local_file, "rb") as source, self.fs.open_output_stream(f"{self.root}/{name}") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)  # object stores publish an object only once it is closed
        return target

    def read_records(self, name: str) -> list[dict]:
        """The records of a JSON-lines file, one per video (a later line for a video replaces an earlier one:
        records are appended as they come, then compacted at the end of a run)."""
        try:
            text = storage.read_bytes(storage.child(self.uri, name)).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        records: dict[str, dict] = {}
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a killed run
                continue
            if isinstance(record, dict) and isinstance(record.get("video_id"), str):
                records.pop(record["video_id"], None)
                records[record["video_id"]] = record
        return list(records.values())

    def write_records(self, name: str, records: Iterable[dict]) -> None:
        storage.write_bytes(storage.child(self.uri, name), "".join(_record_line(r) for r in records).encode("utf-8"))


def _record_line(record: dict) -> str:
    return json.dumps(record) + "\n"  # ASCII escapes: any ID, however odd, can be written


class _RecordLog:
    """A records file kept current while a run goes on, so a killed run keeps what it recorded.

    Locally each record is appended (and flushed) as it comes; object stores cannot append, so there the whole
    file is rewritten, at most every `every_s` seconds. `close` writes the compacted file, sorted by ID.
    """

    def __init__(self, folder: _Folder, name: str, records: dict[str, dict], every_s: float = 10.0):
        self.folder, self.name, self.records, self.every_s = folder, name, dict(records), every_s
        self.written = time.monotonic()
        self.dirty = False

    def add(self, record: dict) -> None:
        self.records[record["video_id"]] = record
        if self.folder.local:
            with open(f"{self.folder.root}/{self.name}", "a", encoding="utf-8") as stream:
                stream.write(_record_line(record))
        else:
            self.dirty = True
            if time.monotonic() - self.written >= self.every_s:
                self._rewrite()

    def discard(self, video_id: str) -> None:
        self.records.pop(video_id, None)

    def _rewrite(self) -> None:
        self.folder.write_records(self.name, [self.records[v] for v in sorted(self.records)])
        self.written, self.dirty = time.monotonic(), False

    def close(self) -> None:
        self._rewrite()


@dataclass
class DownloadSummary:
    """Counts of a run; `failed` lists the videos to retry (a re-run does)."""

    requested: int
    present: int
    downloaded: int
    unavailable: int  # this run's and those recorded by earlier runs
    failed: list[DownloadResult]
    seconds: float
    invalid: int = 0  # annotation rows whose ID is not a VATEX clip ID (recorded in unavailable.jsonl)

    def format(self) -> str:
        return (f"videos: {self.requested}; already there: {self.present}; downloaded: {self.downloaded}; "
                f"unavailable: {self.unavailable} (of which not a valid video ID: {self.invalid}); "
                f"failed after retries: {len(self.failed)} ({self.seconds:.1f} s)")


def download_vatex(
    annotation_files: Sequence[str],
    folder: str,
    *,
    executable: str = "yt-dlp",
    max_attempts: int = 3,
    backoff_s: float = 2.0,
    timeout_s: float = 600.0,
    exact_cuts: bool = False,
    concurrency: int = 16,
    num_cpus_per_task: float = 0.25,
    retry_unavailable: bool = False,
    log: Callable[[str], None] = print,
) -> DownloadSummary:
    """Download every clip the annotation files name into `folder`, in parallel Ray tasks (one per video).

    At most `concurrency` downloads run at once (a polite bound for one client IP, not a CPU bound: a download
    waits on the network, hence the small `num_cpus_per_task`). An ID that is not a VATEX clip ID is never asked
    for: it is recorded as unavailable (with why) and the others go on. Records are written as results come.
    """
    start = time.perf_counter()
    video_ids = list(dict.fromkeys(a.video_id for path in annotation_files for a in load_annotations(path)))
    destination = _Folder(folder)
    destination.fs.create_dir(destination.root, recursive=True)
    invalid = {}
    for video_id in video_ids:
        try:
            parse_video_id(video_id)
        except ValueError as exc:
            invalid[video_id] = {"video_id": video_id, "reason": str(exc)}
    present, missing = find_videos([v for v in video_ids if v not in invalid], folder)
    known_gone = {r["video_id"]: r for r in destination.read_records(UNAVAILABLE_FILE) if r["video_id"] not in present}
    gone = _RecordLog(destination, UNAVAILABLE_FILE, known_gone)
    failed_log = _RecordLog(destination, FAILED_FILE, {})
    for record in invalid.values():
        log(f"skipped: {record['reason']}")
        if known_gone.get(record["video_id"]) != record:
            gone.add(record)
    todo = [v for v in missing if retry_unavailable or v not in known_gone]
    log(f"{len(video_ids)} videos: {len(present)} already there, {len(missing) - len(todo)} known unavailable, "
        f"{len(invalid)} not valid VATEX IDs (recorded, skipped), {len(todo)} to download")

    task = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(download_clip)
    counts: Counter = Counter()
    failed: list[DownloadResult] = []
    in_flight: list = []
    queue = list(reversed(todo))
    try:
        while queue or in_flight:
            while queue and len(in_flight) < concurrency:
                in_flight.append(task.remote(queue.pop(), folder, executable, max_attempts, backoff_s, timeout_s,
                                             exact_cuts))
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            result = ray.get(ready[0])
            beat()  # a clip finished (or failed): progress for the job's stall watchdog
            counts[result.status] += 1
            if result.status == "downloaded":
                gone.discard(result.video_id)
                continue
            log(f"{result.video_id}: {result.status} after {result.attempts} attempt(s): {result.reason}")
            if result.status == "failed":
                failed.append(result)
                failed_log.add(asdict(result))
            else:  # unavailable (or invalid, should a caller pass one)
                gone.add({"video_id": result.video_id, "reason": result.reason})
    finally:  # also on an error or Ctrl-C: what was learnt is kept, compacted
        gone.close()
        failed_log.close()
    failed.sort(key=lambda r: r.video_id)
    unavailable = sum(1 for v in video_ids if v in gone.records)
    return DownloadSummary(requested=len(video_ids), present=len(present), downloaded=counts["downloaded"],
                           unavailable=unavailable, failed=failed, seconds=time.perf_counter() - start,
                           invalid=len(invalid))


def read_records(folder: str, name: str = UNAVAILABLE_FILE) -> list[dict[str, Any]]:
    """The records a run left in the videos folder (`unavailable.jsonl` or `failed.jsonl`)."""
    return _Folder(folder).read_records(name)

