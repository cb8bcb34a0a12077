"""Fetching VATEX clips from YouTube with yt-dlp, one Ray task per video.

A VATEX video ID is `<YouTube ID>_<start>_<end>`, start and end in whole seconds (`Ptf_2VRj-V0_000122_000132`;
YouTube IDs may hold `_` and `-`, so the ID is split from the right). Each task runs the `yt-dlp` executable
for that clip: the `start`-`end` section only, the lowest resolution of at least 224 pixels high (the model
sees 224x224 crops, so more is wasted bandwidth; a video with nothing that tall gives its best), saved as
`<videoID>.<ext>` (mp4 or webm) in the videos folder, which may be local or any pyarrow filesystem (s3://, gs://;
on a cluster it must be storage every node sees).

- A clip already in the folder is skipped without starting a task.
- A video YouTube reports as gone (unavailable, private, removed, ...) is recorded in `unavailable.jsonl` in the
  folder and not asked for again by later runs (unless `retry_unavailable`).
- Anything else (timeouts, HTTP 429/5xx, a dropped connection) is retried up to `max_attempts` times with
  exponential backoff; what still fails is listed in `failed.jsonl` (rewritten each run) and retried next run.
- Downloads land in a local temporary folder and are moved into place whole, so the folder never holds a
  partial clip.

yt-dlp is an executable here, not a Python dependency (`pip install yt-dlp`; it needs `ffmpeg` on PATH to cut
sections). Tests use a stand-in executable, since the test machines cannot reach YouTube.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

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


def parse_video_id(video_id: str) -> Clip:
    """`Ptf_2VRj-V0_000122_000132` -> Clip(youtube_id="Ptf_2VRj-V0", start=122, end=132); ValueError otherwise."""
    youtube_id, _, times = video_id.rpartition("_")
    youtube_id, _, start = youtube_id.rpartition("_")
    if not youtube_id or not start.isdigit() or not times.isdigit() or int(times) <= int(start):
        raise ValueError(f"{video_id!r} is not a VATEX video ID (<YouTube ID>_<start>_<end>, end after start)")
    return Clip(video_id, youtube_id, int(start), int(times))


def yt_dlp_command(executable: str, clip: Clip, folder: str, exact_cuts: bool = False) -> list[str]:
    """The yt-dlp command line that saves `clip` as `<folder>/<videoID>.<ext>`."""
    command = [
        executable, "--no-playlist", "--no-progress", "--no-overwrites",
        "-f", FORMAT,
        "--download-sections", f"*{clip.start}-{clip.end}",
        "-o", os.path.join(folder, f"{clip.video_id}.%(ext)s"),
    ]
    if exact_cuts:  # re-encodes around the cuts: frame-exact clips, at a CPU cost
        command.append("--force-keyframes-at-cuts")
    return [*command, clip.url]


@dataclass
class DownloadResult:
    """What became of one video: downloaded, present (already there), unavailable, or failed (retry later)."""

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
        return DownloadResult(video_id, "unavailable", reason=str(exc))
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
                    path = destination.put(output, f"{video_id}{os.path.splitext(output)[1]}")
                    return DownloadResult(video_id, "downloaded", attempt, path=path)
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
        from pyarrow import fs as pafs

        self.uri = uri
        self.fs, self.root = pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))
        self.root = self.root.rstrip("/") or "/"
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def put(self, local_file: str, name: str) -> str:
        """Move a finished local file into the folder under `name`, appearing whole or not at all."""
        target = f"{self.root}/{name}"
        if self.local:
            self.fs.create_dir(self.root, recursive=True)
            temporary = f"{self.root}/.{name}.{os.getpid()}.tmp"
            shutil.copyfile(local_file, temporary)  # the staging folder may be on another device
            os.replace(temporary, target)
            return target
        with open(local_file, "rb") as source, self.fs.open_output_stream(target) as sink:
            shutil.copyfileobj(source, sink, 1 << 20)  # object stores publish an object only once it is closed
        return f"{self.uri.rstrip('/')}/{name}"

    def read_records(self, name: str) -> list[dict]:
        try:
            with self.fs.open_input_stream(f"{self.root}/{name}") as stream:
                text = stream.read().decode("utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_records(self, name: str, records: Iterable[dict]) -> None:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/.{name}.tmp") as stream:
            stream.write(data)
        self.fs.move(f"{self.root}/.{name}.tmp", f"{self.root}/{name}")


@dataclass
class DownloadSummary:
    """Counts of a run; `failed` lists the videos to retry (a re-run does)."""

    requested: int
    present: int
    downloaded: int
    unavailable: int  # this run's and those recorded by earlier runs
    failed: list[DownloadResult]
    seconds: float

    def format(self) -> str:
        return (f"videos: {self.requested}; already there: {self.present}; downloaded: {self.downloaded}; "
                f"unavailable: {self.unavailable}; failed after retries: {len(self.failed)} "
                f"({self.seconds:.1f} s)")


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
    waits on the network, hence the small `num_cpus_per_task`).
    """
    import ray

    start = time.perf_counter()
    video_ids = list(dict.fromkeys(a.video_id for path in annotation_files for a in load_annotations(path)))
    destination = _Folder(folder)
    destination.fs.create_dir(destination.root, recursive=True)
    present, missing = find_videos(video_ids, folder)
    known_gone = {r["video_id"]: r for r in destination.read_records(UNAVAILABLE_FILE) if r["video_id"] not in present}
    todo = [v for v in missing if retry_unavailable or v not in known_gone]
    log(f"{len(video_ids)} videos: {len(present)} already there, {len(missing) - len(todo)} known unavailable, "
        f"{len(todo)} to download")

    task = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(download_clip)
    results: list[DownloadResult] = []
    in_flight: list = []
    queue = list(reversed(todo))
    while queue or in_flight:
        while queue and len(in_flight) < concurrency:
            in_flight.append(task.remote(queue.pop(), folder, executable, max_attempts, backoff_s, timeout_s,
                                         exact_cuts))
        ready, in_flight = ray.wait(in_flight, num_returns=1)
        result = ray.get(ready[0])
        results.append(result)
        if result.status != "downloaded":
            log(f"{result.video_id}: {result.status} after {result.attempts} attempt(s): {result.reason}")

    counts = Counter(r.status for r in results)
    for result in results:
        if result.status == "unavailable":
            known_gone[result.video_id] = {"video_id": result.video_id, "reason": result.reason}
        elif result.status == "downloaded":
            known_gone.pop(result.video_id, None)
    destination.write_records(UNAVAILABLE_FILE, [known_gone[v] for v in sorted(known_gone)])
    failed = sorted((r for r in results if r.status == "failed"), key=lambda r: r.video_id)
    destination.write_records(FAILED_FILE, [asdict(r) for r in failed])
    unavailable = sum(1 for v in video_ids if v in known_gone)
    return DownloadSummary(requested=len(video_ids), present=len(present), downloaded=counts["downloaded"],
                           unavailable=unavailable, failed=failed, seconds=time.perf_counter() - start)


def read_records(folder: str, name: str = UNAVAILABLE_FILE) -> list[dict[str, Any]]:
    """The records a run left in the videos folder (`unavailable.jsonl` or `failed.jsonl`)."""
    return _Folder(folder).read_records(name)

