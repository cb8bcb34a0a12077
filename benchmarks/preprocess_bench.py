"""Preprocessing benchmark: this pipeline against the original SpaceTimeGPT approach, and how its cost grows.

    python benchmarks/preprocess_bench.py [--videos 40] [--scale 160] [--workers 2] [--work-dir outputs/bench/preprocess]

Input: generated web-like clips (10 s at 30 fps, 640x360, H.264 with a keyframe every 2 s and B-frames, a
textured panning background with a moving object, so JPEG and H.264 sizes resemble real footage). Both sides
get the same clips, the same machine and the same number of worker processes:

- this pipeline: `stgpt.preprocessing.preprocess` on a fresh local Ray instance (`ray.init(num_cpus=workers)`,
  an actor pool of `workers`), writing JPEG uint8 shards at 224x224, as `jobs/preprocess.py` does;
- the original (SpaceTimeGPT's data notebook): a process pool of `workers`, each video opened with PyAV and
  decoded in full twice (once to count frames, once to pick the 8), the VideoMAE image processor, float32
  pixel values stored in Arrow (as `datasets.save_to_disk` does; written once, streaming, which is kinder to
  it than the original's cache-then-copy).

Each side runs in its own subprocess. Peak memory is the largest sum, over samples every 0.1 s, of the PSS of
the job's processes (driver and Ray workers, or the pool's parent and children); PSS counts pages shared
between processes once. Ray's own daemons (GCS, raylet, dashboard) are reported apart. Results go to
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECONDS, FPS, WIDTH, HEIGHT, GOP = 10, 30, 640, 360, 60
CORE_CLIPS = 10  # clips timed one by one for the per-video work alone
VIDEOS_PER_TASK = 4  # 40 videos make 10 pieces: work for both workers until near the end
VIDEO_PARAMS = {"seconds": SECONDS, "fps": FPS, "width": WIDTH, "height": HEIGHT, "gop": GOP, "version": 1}


# --------------------------------------------------------------------------------------------------------
# Input videos.


def make_web_video(path: str | Path, seed: int) -> None:
    """One clip: a textured background panning 2 px a frame, sensor-like grain, one moving disc; x264, GOP 60."""
    import av
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    pan = 2
    height, width = HEIGHT + 8, WIDTH + pan * SECONDS * FPS + 8

    def noise(cells: int) -> np.ndarray:
        grid = torch.from_numpy(rng.uniform(0, 255, (1, 3, height // cells + 2, width // cells + 2)).astype(np.float32))
        return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()

    background = np.clip(0.7 * noise(16) + 0.3 * noise(4), 0, 255).astype(np.float32)
    grain = rng.normal(0, 4, size=(8, HEIGHT, WIDTH, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    x, y = rng.uniform(100, 540), rng.uniform(80, 280)
    vx, vy, radius = rng.uniform(-3, 3), rng.uniform(-2, 2), rng.uniform(20, 60)
    colour = rng.integers(0, 256, 3).astype(np.float32)
    with av.open(str(path), "w", format="mp4") as output:
        stream = output.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(GOP), "keyint_min": str(GOP), "sc_threshold": "0"}
        for t in range(SECONDS * FPS):
            frame = background[4:4 + HEIGHT, pan * t + 4:pan * t + 4 + WIDTH] + grain[t % len(grain)]
            frame[(xx - x - vx * t) ** 2 + (yy - y - vy * t) ** 2 < radius**2] = colour
            image = av.VideoFrame.from_ndarray(np.clip(frame, 0, 255).astype(np.uint8), format="rgb24")
            for packet in stream.encode(image):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


def _make_one(job: tuple[str, int]) -> None:
    path, seed = job
    temporary = f"{path}.tmp.mp4"
    make_web_video(temporary, seed)
    os.replace(temporary, path)


def prepare_inputs(work: Path, distinct: int, counts: list[int], processes: int) -> dict[int, tuple[Path, Path]]:
    """Generate `distinct` clips once (kept between runs), and per count a folder + annotation file.

    Larger sets reuse the distinct clips under new IDs (hard links): decoding cost per video is the same.
    """
    from stgpt.annotations import VideoAnnotation, save_annotations

    source = work / "clips"
    source.mkdir(parents=True, exist_ok=True)
    params_file = source / "params.json"
    if not params_file.exists() or json.loads(params_file.read_text()) != VIDEO_PARAMS:
        shutil.rmtree(source)
        source.mkdir(parents=True)
    jobs = [(str(source / f"clip{i:04d}.mp4"), i) for i in range(distinct) if not (source / f"clip{i:04d}.mp4").exists()]
    if jobs:
        print(f"generating {len(jobs)} clips of {SECONDS} s, {WIDTH}x{HEIGHT} at {FPS} fps ...", flush=True)
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.map(_make_one, jobs)
    params_file.write_text(json.dumps(VIDEO_PARAMS))

    sets = {}
    for count in counts:
        folder = work / f"videos-{count}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        ids = [f"bench{i:05d}_{0:06d}_{SECONDS:06d}" for i in range(count)]
        for i, video_id in enumerate(ids):
            os.link(source / f"clip{i % distinct:04d}.mp4", folder / f"{video_id}.mp4")
        annotations = work / f"annotations-{count}.json"
        save_annotations([VideoAnnotation(v, [f"caption {k} of video {v}" for k in range(10)]) for v in ids],
                         annotations)
        sets[count] = (folder, annotations)
    return sets


# --------------------------------------------------------------------------------------------------------
# The two sides, each run as a subprocess of this script.


def run_ours(annotations: str, videos: str, output: str, workers: int) -> dict:
    """This pipeline, as jobs/preprocess.py runs it, on a fresh local Ray with `workers` CPUs."""
    import ray

    from stgpt.config import load_config
    from stgpt.preprocessing import SplitInput, preprocess

    start = time.perf_counter()
    for attempt in range(3):  # on a heavily loaded machine the raylet can miss Ray's 30 s start-up deadline
        try:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    ready = time.perf_counter()
    cfg = load_config(None, [f"preprocess.concurrency={workers}", f"preprocess.videos_per_task={VIDEOS_PER_TASK}"])
    summary = preprocess([SplitInput("train", annotations, videos)], output, cfg, progress=False, log=lambda _: None)
    done = time.perf_counter()
    ray.shutdown()
    return {"init_s": ready - start, "process_s": done - ready, "rows": summary.rows, "errors": summary.errors}


def _original_one(job: tuple[str, str, list[str]]) -> tuple[str, np.ndarray, list[str]]:
    """The original per-video work: PyAV decode all frames twice, then the VideoMAE image processor."""
    import av

    video_id, path, captions = job
    processor = _original_one.processor
    container = av.open(path)
    container.seek(0)
    frame_count = sum(1 for _ in container.decode(video=0))  # metadata is unreliable: count by decoding
    indices = set(np.linspace(0, frame_count, num=8, endpoint=False).astype(np.int64))
    frames = []
    container.seek(0)
    for i, frame in enumerate(container.decode(video=0)):
        if i in indices:
            frames.append(frame.to_ndarray(format="rgb24"))
    container.close()
    pixel_values = np.asarray(processor(frames).pixel_values[0], dtype=np.float32)  # (8, 3, 224, 224)
    return video_id, pixel_values, captions


def _original_init() -> None:
    from stgpt.config import VideoConfig
    from stgpt.transforms import image_processor

    _original_one.processor = image_processor(VideoConfig())


def run_original(annotations: str, videos: str, output: str, workers: int) -> dict:
    """The original approach with a pool of `workers` processes; float32 pixel values into an Arrow file."""
    import pyarrow as pa

    from stgpt.annotations import find_videos, load_annotations

    start = time.perf_counter()
    entries = load_annotations(annotations)
    found, _ = find_videos([a.video_id for a in entries], videos)
    jobs = [(a.video_id, found[a.video_id], a.captions) for a in entries]
    schema = pa.schema([("videoID", pa.string()), ("pixel_values", pa.list_(pa.float32())),
                        ("captions", pa.list_(pa.string()))])
    os.makedirs(output, exist_ok=True)
    rows = 0
    with multiprocessing.get_context("fork").Pool(workers, initializer=_original_init) as pool, \
            pa.OSFile(os.path.join(output, "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, schema) as writer:
        for video_id, pixel_values, captions in pool.imap(_original_one, jobs):
            writer.write_batch(pa.record_batch([[video_id], [pixel_values.reshape(-1)], [captions]], schema=schema))
            rows += 1
    return {"init_s": 0.0, "process_s": time.perf_counter() - start, "rows": rows, "errors": len(entries) - rows}


# --------------------------------------------------------------------------------------------------------
# Measuring a subprocess: wall time and the peak PSS of its process tree.


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                tree.setdefault(int(fields[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue
    return tree


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not of its children)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return -1.0


class TreeSampler(threading.Thread):
    """Samples every 0.1 s a process and its descendants: peak PSS and CPU time, job processes vs Ray's daemons.

    CPU time is each process's last sample, so it stays meaningful when other work shares the machine.
    """

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.peak_job_kb = 0
        self.peak_all_kb = 0
        self.cpu: dict[int, tuple[bool, float]] = {}  # pid -> (is a job process, CPU seconds)
        self.peak_kb: dict[int, int] = {}  # pid -> its own peak PSS
        self.names: dict[int, str] = {}
        self.stop = threading.Event()

    def top(self, count: int = 8) -> list[str]:
        """The processes with the largest peak PSS, with their CPU time: where the memory and time went."""
        ranked = sorted(self.peak_kb, key=lambda pid: -self.peak_kb[pid])[:count]
        return [f"{self.names[pid][:60]}: {self.peak_kb[pid] / 1024:.0f} MiB, {self.cpu.get(pid, (0, 0))[1]:.1f} s"
                for pid in ranked]

    def cpu_s(self, job_only: bool) -> float:
        return sum(cpu for is_job, cpu in self.cpu.values() if is_job or not job_only)

    def run(self) -> None:
        while not self.stop.is_set():
            tree = _children()
            pending, pids = [self.root_pid], []
            while pending:
                pid = pending.pop()
                pids.append(pid)
                pending.extend(tree.get(pid, []))
            job = all_ = 0
            for pid in pids:
                pss = _pss_kb(pid)
                self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), pss)
                self.names[pid] = _cmdline(pid) or self.names.get(pid, "")
                all_ += pss
                name = _cmdline(pid)
                is_job = (pid == self.root_pid or (name.startswith("ray::") and not name.startswith(RAY_DAEMONS))
                          or _is_pool_child(pid, self.root_pid, tree))
                if is_job:
                    job += pss
                cpu = _cpu_s(pid)
                if cpu >= 0:
                    self.cpu[pid] = (is_job or self.cpu.get(pid, (False, 0))[0], cpu)
            self.peak_job_kb = max(self.peak_job_kb, job)
            self.peak_all_kb = max(self.peak_all_kb, all_)
            self.stop.wait(0.1)


RAY_DAEMONS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # per-node agents, named like workers


def _is_pool_child(pid: int, root: int, tree: dict[int, list[int]]) -> bool:
    """A direct child of the driver that runs Python code of the job (the original's pool workers)."""
    return pid in tree.get(root, []) and "python" in _cmdline(pid).split(" ")[0] and "ray" not in _cmdline(pid)


def measured(side: str, annotations: Path, videos: Path, output: Path, workers: int) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, __file__, side, str(annotations), str(videos), str(output), str(workers)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(process.pid)
    sampler.start()
    stdout, _ = process.communicate()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{side} failed with exit status {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file() and not p.name.endswith(".json")
               and not p.name.endswith(".jsonl"))
    return {**result, "wall_s": wall, "bytes": size, "peak_job_mb": sampler.peak_job_kb / 1024,
            "peak_all_mb": sampler.peak_all_kb / 1024, "cpu_job_s": sampler.cpu_s(job_only=True),
            "cpu_all_s": sampler.cpu_s(job_only=False), "load": max(load, os.getloadavg()[0]), "top": sampler.top()}


def core_cpu(clips: list[Path]) -> dict[str, float]:
    """CPU seconds per video of each side's per-video work alone, in this process on one thread, no Ray, no pool.

    "ours" is the default exact PyAV reader, "decord" the same work with `video.decoder=decord`.
    """
    import torch

    from stgpt.config import VideoConfig
    from stgpt.preprocessing import preprocess_video

    torch.set_num_threads(1)
    _original_init()
    sides = {
        "original": lambda path: _original_one(("id", str(path), [])),
        "ours": lambda path: preprocess_video(str(path), VideoConfig()),
        "decord": lambda path: preprocess_video(str(path), VideoConfig(decoder="decord")),
    }
    result = {}
    for side, work in sides.items():
        work(clips[0])  # warm-up: imports, first-call set-up
        start = time.process_time()
        for path in clips:
            work(path)
        result[side] = (time.process_time() - start) / len(clips)
    return result


def frames_decoded(clips: list[Path]) -> dict[str, float]:
    """Frames decoded per video: this reader, the minimum its 8 targets need at the clips' keyframe interval
    (from the keyframe before each group of targets to its last target, in decode order), a full decode, and
    the original's two full decodes."""
    import av

    from stgpt.video import read_video, sample_indices

    ours, minimum, total = [], [], []
    for path in clips:
        ours.append(read_video(path, 8).frames_decoded)
        with av.open(str(path)) as container:
            packets = [p for p in container.demux(video=0) if p.size]
        shown = sorted(p.pts for p in packets)
        place = {p.pts: i for i, p in enumerate(packets)}
        keys = sorted(p.pts for p in packets if p.is_keyframe)
        groups: dict[int, int] = {}
        for index in sample_indices(len(shown), 8):
            target = shown[index]
            key = max(k for k in keys if k <= target)
            groups[key] = max(groups.get(key, 0), place[target])
        minimum.append(sum(last - place[key] + 1 for key, last in groups.items()))
        total.append(len(shown))
    return {"ours": float(np.mean(ours)), "minimum": float(np.mean(minimum)), "full": float(np.mean(total)),
            "original": 2.0 * float(np.mean(total))}


def reader_report(core: dict, decoded: dict, clips: int) -> str:
    from benchmarks._results import machine_info

    ratio, vs_decord = core["original"] / core["ours"], core["decord"] / core["ours"]
    return "\n".join([
        "## Reading video: the exact PyAV reader against decord and the original",
        "",
        f"Host: {machine_info()}; no GPU. {clips} clips of {SECONDS} s at {FPS} fps, {WIDTH}x{HEIGHT}, H.264 with "
        f"B-frames and a keyframe every {GOP // FPS} s; one process, one thread, one run; "
        "`python benchmarks/preprocess_bench.py --reader-only`. The per-video work of preprocessing: decode, sample "
        "8 frames, resize to 224 on the short side, centre-crop 224, JPEG (the original: PyAV decoding every frame "
        "twice, the VideoMAE processor, float32). CPU time, so other load on the machine does not inflate it.",
        "",
        "| reader | CPU s/video | vs the original | frames decoded/video | exact |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| original (PyAV, two full decodes) | {core['original']:.3f} | 1.00x | {decoded['original']:.0f} | yes |",
        f"| decord (`video.decoder=decord`) | {core['decord']:.3f} | {core['original'] / core['decord']:.2f}x | - | "
        "no (B-frames, MPEG-1, discard flags) |",
        f"| **stgpt (PyAV, exact; default)** | **{core['ours']:.3f}** | **{ratio:.2f}x** | {decoded['ours']:.0f} | yes |",
        "",
        f"- Target: at least 3x the original per core: **{'met' if ratio >= 3 else 'missed'}** ({ratio:.2f}x); no "
        f"slower than decord: **{'met' if vs_decord >= 1 else 'missed'}** (decord takes {vs_decord:.2f}x our CPU).",
        f"- Frames decoded per video: {decoded['ours']:.0f}, against {decoded['minimum']:.0f} that the 8 targets "
        f"need from their keyframes (fewer is possible: non-reference frames that are not targets are skipped), "
        f"{decoded['full']:.0f} in a full decode and {decoded['original']:.0f} in the original's two.",
    ])


# --------------------------------------------------------------------------------------------------------
# Frame storage: bytes and codec cost per frame on the benchmark's own frames.


def codec_table(video: Path, repeats: int = 5) -> list[tuple[str, float, float, float, float]]:
    """(encoding, KB per frame, encode ms, decode ms, PSNR dB) for 8 frames of one clip at 224x224."""
    from stgpt.config import VideoConfig
    from stgpt.preprocessing import preprocess_video
    from stgpt.shards import decode_frames, encode_frames

    raw = preprocess_video(str(video), VideoConfig(), encoding="raw")
    frames = np.stack([np.frombuffer(f, np.uint8).reshape(224, 224, 3) for f in raw["frames"]])
    table = []
    for encoding in ("jpeg", "png", "raw"):
        encode_frames(frames, encoding)  # warm up
        start = time.process_time()  # CPU time: other load on the machine does not inflate it
        for _ in range(repeats):
            encoded = encode_frames(frames, encoding, 95)
        encode_ms = (time.process_time() - start) / repeats / len(frames) * 1e3
        start = time.process_time()
        for _ in range(repeats):
            decoded = decode_frames(encoded, encoding, 224, 224)
        decode_ms = (time.process_time() - start) / repeats / len(frames) * 1e3
        mse = float(((decoded.astype(np.float64) - frames) ** 2).mean())
        psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
        table.append((encoding, sum(map(len, encoded)) / len(frames) / 1024, encode_ms, decode_ms, psnr))
    return table


# --------------------------------------------------------------------------------------------------------


def report(results: dict, core: dict, codecs: list, workers: int, base: int, scale: int) -> str:
    from benchmarks._results import machine_info

    ours, original = results[("ours", base)], results[("original", base)]
    rate = lambda r: r["rows"] / r["process_s"]  # noqa: E731
    cpu_per_video = lambda r: r["cpu_job_s"] / r["rows"]  # noqa: E731
    wall_ratio = rate(ours) / rate(original)
    job_cpu_ratio = cpu_per_video(original) / cpu_per_video(ours)
    core_ratio = core["original"] / core["ours"]
    bytes_ratio = (ours["bytes"] / ours["rows"]) / (original["bytes"] / original["rows"])
    loads = [r["load"] for r in results.values()]
    lines = [
        f"## Preprocessing: this pipeline vs the original, {base} and {scale} videos",
        "",
        f"Host: {machine_info()}; no GPU. The machine is shared: 1-minute load average {min(loads):.0f}-"
        f"{max(loads):.0f} during the runs, so wall times (and videos/s) here are inflated and noisy; CPU seconds "
        f"are the figures to compare. {workers} worker processes on each side; clips of {SECONDS} s at {FPS} fps, "
        f"{WIDTH}x{HEIGHT}, H.264 with a keyframe every {GOP // FPS} s and B-frames; 8 frames per video stored at "
        "224x224. One run of each; `benchmarks/preprocess_bench.py`.",
        "",
        "| side | videos | videos/s | per worker | CPU s/video (job, start-up included) | wall incl. start-up | "
        "bytes/video | peak PSS job | peak PSS incl. Ray daemons |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (side, count), r in sorted(results.items(), key=lambda item: (item[0][0] != "ours", item[0][1])):
        name = "this pipeline" if side == "ours" else "original"
        lines.append(
            f"| {name} | {count} | {rate(r):.2f} | {rate(r) / workers:.2f} | {cpu_per_video(r):.3f} | "
            f"{r['wall_s']:.1f} s | {r['bytes'] / r['rows'] / 1024:,.0f} KiB | {r['peak_job_mb']:,.0f} MiB | "
            f"{r['peak_all_mb']:,.0f} MiB |")
    lines += [
        "",
        "videos/s counts from the start of the work (after `ray.init` for this pipeline, so it includes starting the "
        "actor pool; from pool creation for the original). CPU s/video adds up the CPU time of the job's processes "
        "(driver and Ray workers; the pool's parent and workers) over the whole run, start-up included.",
        "",
        f"- Throughput per core, the per-video work alone (one process, one thread, no Ray or pool; {CORE_CLIPS} "
        f"clips): original {core['original']:.3f} CPU s/video, this pipeline {core['ours']:.3f}: **{core_ratio:.2f}x**. "
        f"Whole jobs of {base} videos: **{job_cpu_ratio:.2f}x** by CPU time, {wall_ratio:.2f}x by wall time. "
        f"Target >= 3x: **{'met' if min(core_ratio, job_cpu_ratio) >= 3 else 'missed'}**.",
        f"- Bytes per video: **{bytes_ratio:.3f}** of the original's ({1 / bytes_ratio:.0f}x smaller; target <= 0.25: "
        f"**{'met' if bytes_ratio <= 0.25 else 'missed'}**).",
    ]
    if ("ours", scale) in results:
        big = results[("ours", scale)]
        marginal_cpu = (big["cpu_job_s"] - ours["cpu_job_s"]) / (big["rows"] - ours["rows"])
        fixed_cpu = ours["cpu_job_s"] - marginal_cpu * ours["rows"]
        lines.append(
            f"- Growth, this pipeline, {base} -> {scale} videos ({scale / base:.0f}x the work): processing time "
            f"{ours['process_s']:.1f} -> {big['process_s']:.1f} s ({big['process_s'] / ours['process_s']:.2f}x), CPU "
            f"{ours['cpu_job_s']:.1f} -> {big['cpu_job_s']:.1f} s ({big['cpu_job_s'] / ours['cpu_job_s']:.2f}x: "
            f"{marginal_cpu:.3f} s per extra video on top of ~{fixed_cpu:.0f} s of fixed start-up: Ray workers, "
            f"Ray Data, imports); peak PSS of driver + workers {ours['peak_job_mb']:,.0f} -> "
            f"{big['peak_job_mb']:,.0f} MiB ({big['peak_job_mb'] / ours['peak_job_mb']:.2f}x). Memory is per process "
            f"and per piece of {VIDEOS_PER_TASK} videos, never the dataset.")
    if ("original", scale) in results:
        big = results[("original", scale)]
        lines.append(f"- Growth, original, {base} -> {scale} videos: time {original['process_s']:.1f} s -> "
                     f"{big['process_s']:.1f} s, peak PSS {original['peak_job_mb']:,.0f} -> {big['peak_job_mb']:,.0f} MiB.")
    lines += [
        f"- Where the per-video time goes: the reader decodes from the keyframe before each group of sampled frames "
        f"and skips non-reference frames (section 'Reading video'); the original decodes all 300 frames twice "
        f"(~{core['original']:.2f} s). Fixed costs (starting Ray workers, importing torch in each) weigh on short "
        "jobs and vanish per video in long ones.",
        "",
        "Frame storage, per 224x224 frame of these clips (why shards hold JPEG at quality 95):",
        "",
        "| encoding | KiB/frame | encode CPU ms | decode CPU ms | PSNR vs the uint8 frame |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for encoding, kib, enc, dec, psnr in codecs:
        quality = f"{psnr:.1f} dB" if np.isfinite(psnr) else "lossless"
        lines.append(f"| {encoding} | {kib:.1f} | {enc:.2f} | {dec:.2f} | {quality} |")
    lines.append(f"| float32 pixel values (original) | {224 * 224 * 3 * 4 / 1024:.1f} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("ours", "original"):
        side, annotations, videos, output, workers = sys.argv[1:6]
        run = run_ours if side == "ours" else run_original
        print(json.dumps(run(annotations, videos, output, int(workers))), flush=True)
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=40, help="videos in the comparison (distinct clips)")
    parser.add_argument("--scale", type=int, default=160, help="videos in the growth run (0: skip)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes on each side")
    parser.add_argument("--original-scale", action="store_true", help="also run the original on --scale videos")
    parser.add_argument("--work-dir", default=str(REPO / "outputs" / "bench" / "preprocess"))
    parser.add_argument("--no-write", action="store_true", help="print, do not update benchmarks/RESULTS.md")
    parser.add_argument("--only", choices=("ours", "original"), help="run one side only (implies --no-write)")
    parser.add_argument("--reader-only", action="store_true",
                        help="only the per-video work of each reader on one core (section 'reader')")
    args = parser.parse_args()

    if args.reader_only:
        work = Path(args.work_dir)
        prepare_inputs(work, CORE_CLIPS, [], args.workers)
        clips = sorted((work / "clips").glob("clip*.mp4"))[:CORE_CLIPS]
        core, decoded = core_cpu(clips), frames_decoded(clips)
        markdown = reader_report(core, decoded, len(clips))
        print(markdown)
        if not args.no_write:
            from benchmarks._results import write_section

            write_section("reader", markdown)
        return

    work = Path(args.work_dir)
    counts = [args.videos] + ([args.scale] if args.scale else [])
    sets = prepare_inputs(work, args.videos, counts, args.workers)
    results = {}
    plan = [("original", args.videos), ("ours", args.videos)] + ([("ours", args.scale)] if args.scale else [])
    if args.only:
        plan = [(side, count) for side, count in plan if side == args.only]
    if args.original_scale and args.scale:
        plan.append(("original", args.scale))
    for side, count in plan:
        folder, annotations = sets[count]
        print(f"{side}: {count} videos ...", flush=True)
        results[(side, count)] = measured(side, annotations, folder, work / f"out-{side}-{count}", args.workers)
        print(f"  {json.dumps(results[(side, count)])}", flush=True)
    if args.only:
        return
    clips = sorted((work / "clips").glob("clip*.mp4"))
    core = core_cpu(clips[:CORE_CLIPS])
    print(f"core work, CPU s/video: {core}", flush=True)
    codecs = codec_table(clips[0])
    markdown = report(results, core, codecs, args.workers, args.videos, args.scale)
    print(markdown)
    if not args.no_write:
        from benchmarks._results import write_section

        write_section("preprocess", markdown)


if __name__ == "__main__":
    main()
