"""Preprocessing on the simulated 3-node cluster: every video accounted for once, work spread, resume, refusal."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stgpt.annotations import VideoAnnotation, load_annotations, save_annotations
from stgpt.config import load_config
from stgpt.launch import DEFAULT_CONFIG
from stgpt import preprocessing
from stgpt.isolation import CRASH
from stgpt.preprocessing import (
    OutputFolder,
    PiecePreprocessor,
    PreprocessError,
    SplitInput,
    plan_split,
    preprocess,
    preprocess_video,
    read_errors,
    read_shard_metadata,
    split_name,
)
from stgpt.video import VideoDecodeError
from stgpt.shards import list_shards, row_frames
from stgpt.synthetic import make_synthetic_dataset, write_damaged_videos
from stgpt.video import read_video, sample_indices

REPO = Path(__file__).resolve().parents[1]
NUM_FRAMES_IN_VIDEOS = 16
# Small frames keep the tests quick; pieces of 3 videos and shards of 8 make several parts and merges.
SETTINGS = ["video.short_side=32", "video.crop_size=32", "preprocess.rows_per_shard=8",
            "preprocess.videos_per_task=3", "preprocess.concurrency=3", "preprocess.max_error_rate=0.5"]
DAMAGED = ("truncated", "empty", "random_bytes", "text")


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic train split plus one damaged file of each kind and one ID with no file, in one annotation file."""
    root = tmp_path_factory.mktemp("data")
    dataset = make_synthetic_dataset(root / "synthetic", {"train": 20, "validation": 4}, seed=5, size=(64, 48),
                                     num_frames=NUM_FRAMES_IN_VIDEOS)
    entries = load_annotations(dataset.annotation_paths["train"])
    damaged = write_damaged_videos(root / "damaged", dataset.video_path(entries[0].video_id))
    for kind, path in damaged.items():
        path.rename(dataset.video_dir / f"bad_{kind}.mp4")
        entries.append(VideoAnnotation(f"bad_{kind}", [f"caption {i} of a broken video" for i in range(10)]))
    entries.append(VideoAnnotation("gone_000001_000011", ["a video that was never downloaded"] * 10))
    annotations = root / "train_with_damage.json"
    save_annotations(entries, annotations)
    bad = {f"bad_{kind}" for kind in DAMAGED} | {"gone_000001_000011"}
    return {"dataset": dataset, "annotations": annotations, "entries": {e.video_id: e for e in entries}, "bad": bad}


def config(*extra: str):
    return load_config(None, [*SETTINGS, *extra])


def shard_rows(output) -> list[dict]:
    return [row for path in list_shards(output, "train") for row in pq.read_table(path).to_pylist()]


def fingerprints(output) -> dict[str, tuple[int, int]]:
    """Shard file -> (inode, mtime): a file rewritten, even with the same bytes, changes them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(output).glob("train-part-*.parquet")}


@pytest.fixture(scope="module")
def first_run(ray_cluster, data, tmp_path_factory):
    from ray.data import DataContext

    output = tmp_path_factory.mktemp("shards")
    source = SplitInput("train", str(data["annotations"]), str(data["dataset"].video_dir))
    # These pieces take milliseconds: without waiting for the whole actor pool, the first actor up could do
    # them all before the others start, and the run would say nothing about spreading over nodes.
    context = DataContext.get_current()
    wait, context.wait_for_min_actors_s = context.wait_for_min_actors_s, 300
    try:
        summary = preprocess([source], output, config(), progress=False, log=quiet)
    finally:
        context.wait_for_min_actors_s = wait
    return output, summary, source


def test_every_video_is_a_row_or_an_error_exactly_once(data, first_run):
    output, summary, _ = first_run
    rows = shard_rows(output)
    errors = read_errors(output, "train")
    row_ids = [r["video_id"] for r in rows]
    error_ids = [e["video_id"] for e in errors]
    assert len(row_ids) + len(error_ids) == len(data["entries"])
    assert sorted(row_ids + error_ids) == sorted(data["entries"])  # each once: no loss, no duplicate
    assert set(error_ids) == data["bad"]
    reasons = {e["video_id"]: e["reason"] for e in errors}
    assert "not found" in reasons["gone_000001_000011"]
    assert "empty" in reasons["bad_empty"]
    assert "not a video" in reasons["bad_text"] and "not a video" in reasons["bad_random_bytes"]
    assert "truncated" in reasons["bad_truncated"]
    for error in errors:
        assert error["path"].endswith(f"{error['video_id']}.mp4")
    assert (summary.videos, summary.rows, summary.errors) == (len(data["entries"]), len(rows), len(errors))
    assert summary.videos_processed == len(data["entries"]) and not summary.too_many_errors


def test_rows_hold_the_sampled_uint8_frames_and_captions(data, first_run):
    output, _, _ = first_run
    cfg = config()
    rows = {r["video_id"]: r for r in shard_rows(output)}
    for video_id, row in rows.items():
        frames = row_frames(row, cfg.video.num_frames)
        assert frames.dtype == np.uint8 and frames.shape == (8, 32, 32, 3)
        assert row["num_source_frames"] == NUM_FRAMES_IN_VIDEOS
        assert row["frame_indices"] == sample_indices(NUM_FRAMES_IN_VIDEOS, 8).tolist()
        assert row["captions"] == data["entries"][video_id].captions
        assert row["split"] == "train" and row["encoding"] == "jpeg"
    # The stored frames are the foundation's decode + resize + crop of that video (up to JPEG loss).
    video_id = sorted(rows)[3]
    path = str(data["dataset"].video_path(video_id))
    expected = preprocess_video(path, cfg.video, encoding="raw")
    expected = np.stack([np.frombuffer(f, np.uint8).reshape(32, 32, 3) for f in expected["frames"]])
    stored = row_frames(rows[video_id]).astype(int)
    assert np.abs(stored - expected).mean() < 2.0
    assert read_video(path, 8).indices.tolist() == rows[video_id]["frame_indices"]


def test_shards_are_named_by_split_and_part_and_sorted(data, first_run):
    output, _, _ = first_run
    paths = list_shards(output, "train")
    num_videos = len(data["entries"])
    assert [Path(p).name for p in paths] == [f"train-part-{i:05d}-of-{len(paths):05d}.parquet"
                                             for i in range(len(paths))]
    assert len(paths) == -(-num_videos // 8)
    ids = sorted(data["entries"])
    for part, path in enumerate(paths):  # part P holds (rows or errors of) sorted IDs [8P, 8P+8)
        metadata = read_shard_metadata(path)
        in_part = [r["video_id"] for r in pq.read_table(path).to_pylist()] + [e["video_id"] for e in metadata["errors"]]
        assert sorted(in_part) == ids[8 * part:8 * part + 8]
        table_ids = pq.read_table(path, columns=["video_id"]).column(0).to_pylist()
        assert table_ids == sorted(table_ids)
    assert not list((Path(output) / "_work").glob("*.parquet"))  # pieces were merged and removed


def test_work_ran_on_more_than_one_node(first_run):
    output, summary, _ = first_run
    nodes = {piece["node_id"] for path in list_shards(output, "train") for piece in read_shard_metadata(path)["pieces"]}
    assert len(nodes) > 1
    assert set(summary.nodes) == nodes and sum(summary.nodes.values()) == summary.videos


def test_rerun_skips_finished_work(first_run):
    output, first, source = first_run
    before = fingerprints(output)
    summary = preprocess([source], output, config(), progress=False, log=quiet)
    assert summary.splits[0].parts_resumed == len(before)
    assert summary.videos_processed == 0
    assert (summary.rows, summary.errors) == (first.rows, first.errors)
    assert fingerprints(output) == before


def test_other_settings_are_refused_unless_overwriting(data, first_run, tmp_path):
    output, _, source = first_run
    before = fingerprints(output)
    with pytest.raises(PreprocessError, match="rows_per_shard"):
        preprocess([source], output, config("preprocess.rows_per_shard=5"), progress=False, log=quiet)
    with pytest.raises(PreprocessError, match="crop_size"):
        preprocess([source], output, config("video.crop_size=24"), progress=False, log=quiet)
    assert fingerprints(output) == before  # nothing touched

    # --overwrite starts that split again with the new partitioning (in a copy, not to disturb the other tests)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(output), str(copy)], check=True)
    summary = preprocess([source], copy, config("preprocess.rows_per_shard=13"), overwrite=True, progress=False,
                         log=quiet)
    assert summary.splits[0].parts == 2 and summary.videos_processed == len(data["entries"])
    assert sorted(p.name for p in copy.glob("train-part-*")) == ["train-part-00000-of-00002.parquet",
                                                                 "train-part-00001-of-00002.parquet"]


def load_job():
    spec = importlib.util.spec_from_file_location("preprocess_job", REPO / "jobs" / "preprocess.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def job_args(data, output, *extra):
    return ["--annotations", str(data["annotations"]), "--videos", str(data["dataset"].video_dir),
            "--output", str(output), "--split", "train", "--no-progress", *SETTINGS, *extra]


def test_job_fails_above_max_error_rate_after_writing(ray_cluster, data, tmp_path, capsys):
    output = tmp_path / "out"
    code = load_job().main(job_args(data, output, "--max-error-rate", "0.1"))
    err = capsys.readouterr().err
    assert code == 1
    assert "5 of 25 videos (20.0%) could not be used" in err and "train-errors.jsonl" in err
    assert len(shard_rows(output)) == 20 and len(read_errors(output, "train")) == 5  # written all the same


@pytest.mark.parametrize("content, where", [
    ('[{"videoID": "a", "enCap": ["x"]}, {"videoID": "b", "enCap": ["y"]', "line 1"),
    ('[{"videoID": "a", "enCap": ["x"]}, {"videoID": "b"}]', "entry 1"),
    ('[{"videoID": "a", "enCap": ["x"]}, {"videoID": "a", "enCap": ["y"]}]', "listed more than once: 'a'"),
])
def test_malformed_annotations_are_rejected_up_front(data, tmp_path, capsys, content, where):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    output = tmp_path / "out"
    args = job_args(data, output)
    args[1] = str(bad)
    assert load_job().main(args) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and where in err
    assert not list(output.glob("*.parquet")) if output.exists() else True


def test_killed_run_resumes_with_one_row_per_video(ray_cluster, data, tmp_path):
    """Kill the job once a shard is written, run it again: finished shards are kept, every video is there once."""
    output = tmp_path / "out"
    slow = ["preprocess.concurrency=1", "preprocess.rows_per_shard=2", "preprocess.videos_per_task=1"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    job = subprocess.Popen([sys.executable, str(REPO / "jobs" / "preprocess.py"), *job_args(data, output), *slow],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(output.glob("train-part-*.parquet")):
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.02)
    # while it works, a second run on the same output is refused
    source = SplitInput("train", str(data["annotations"]), str(data["dataset"].video_dir))
    with pytest.raises(PreprocessError, match=rf"in use by another preprocessing run \(pid {job.pid} "):
        preprocess([source], output, config(*slow), progress=False, log=quiet)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    time.sleep(1.0)  # let the killed job's workers go
    kept = fingerprints(output)
    num_parts = -(-len(data["entries"]) // 2)
    assert 0 < len(kept) < num_parts  # killed half-way: some parts done, not all

    summary = preprocess([source], output, config(*slow), progress=False, log=quiet)  # takes over the dead lock
    rows = shard_rows(output)
    errors = read_errors(output, "train")
    assert sorted([r["video_id"] for r in rows] + [e["video_id"] for e in errors]) == sorted(data["entries"])
    assert len(rows) == len(data["entries"]) - len(data["bad"])
    after = fingerprints(output)
    assert {name: after[name] for name in kept} == kept  # finished parts were not redone
    assert summary.splits[0].parts_resumed >= len(kept)
    assert summary.videos_processed <= len(data["entries"]) - 2 * len(kept)


def test_split_names_and_incomplete_splits(tmp_path):
    assert split_name("data/vatex_training_v1.0.json") == "train"
    assert split_name("s3://b/vatex_validation_v1.0.json") == "validation"
    assert split_name("vatex_public_test_english_v1.1.json") == "test"
    (tmp_path / "train-part-00000-of-00003.parquet").write_bytes(b"")
    (tmp_path / "train-part-00002-of-00003.parquet").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 of 3 parts"):
        list_shards(tmp_path, "train")
    assert len(list_shards(tmp_path, "train", require_complete=False)) == 2
    with pytest.raises(FileNotFoundError, match="no shards"):
        list_shards(tmp_path, "validation")


def test_default_run_preprocesses_every_synthetic_split(ray_cluster, tmp_path, capsys):
    """No annotation file given: the job makes the synthetic dataset and preprocesses all of its splits.

    The output is given as a URI, the way s3:// or gs:// would be, so all output I/O goes through pyarrow.fs.
    """
    shards = f"file://{tmp_path / 'shards'}"
    code = load_job().main(["--no-progress", f"data.root={tmp_path / 'data'}", f"data.shards={shards}",
                            "data.synthetic_train=5", "data.synthetic_validation=2", "data.synthetic_test=2",
                            "preprocess.videos_per_task=2", "preprocess.concurrency=2"])
    assert code == 0
    assert "videos in: 9, rows written: 9, errors: 0" in capsys.readouterr().out
    for split, count in (("train", 5), ("validation", 2), ("test", 2)):
        paths = list_shards(shards, split)
        assert all(path.startswith("file://") for path in paths)
        rows = [r for path in paths for r in pq.read_table(path).to_pylist()]
        assert len(rows) == count and {r["split"] for r in rows} == {split}
        assert {r["height"] for r in rows} == {load_config(DEFAULT_CONFIG).video.crop_size}  # the job's default


def test_a_decoder_crash_fails_only_that_video(data, tmp_path):
    cfg = config()
    path = str(data["dataset"].video_path(min(set(data["entries"]) - data["bad"])))
    assert preprocess_video(path, cfg.video, isolated=True) == preprocess_video(path, cfg.video)
    crashing = tmp_path / "crash.mp4"  # the isolated decoder kills itself on this (tests' fault injection)
    crashing.write_bytes(CRASH + b"\0" * 64)
    with pytest.raises(VideoDecodeError, match=r"decoder crashed on this file \(killed by SIGSEGV\)"):
        preprocess_video(str(crashing), cfg.video, isolated=True)


def test_a_piece_retried_after_its_worker_died_decodes_in_child_processes(ray_cluster, data, tmp_path):
    cfg = config()
    source = SplitInput("train", str(data["annotations"]), str(data["dataset"].video_dir))
    piece = plan_split(source, 8, 3).pieces(0)[1]  # sorted IDs: bad_truncated, gone_..., synth_train_00000
    folder = OutputFolder(tmp_path)
    folder.write_bytes(f"{preprocessing.ATTEMPTS_DIR}/{preprocessing._attempt_prefix(piece)}earlier", b"")
    worker = PiecePreprocessor(str(tmp_path), cfg.video.__dict__, "jpeg", 95)
    report = worker.process(piece)
    metadata = folder.read_metadata(piece.file_name)
    assert metadata["isolated"] and report["rows"] + report["errors"] == len(piece.video_ids) == 3
    assert {e["video_id"] for e in metadata["errors"]} == set(piece.video_ids) & data["bad"]
    assert "truncated" in next(e["reason"] for e in metadata["errors"] if e["video_id"] == "bad_truncated")
    assert report["rows"] == 1
    assert not folder.names(preprocessing.ATTEMPTS_DIR)  # finished: its attempt records are gone


@pytest.mark.slow  # three small runs
def test_rerun_redoes_exactly_the_parts_whose_inputs_changed(ray_cluster, tmp_path):
    """Fixed captions, a replaced file, a clip downloaded since: those parts are made again, the others kept."""
    dataset = make_synthetic_dataset(tmp_path / "synthetic", {"train": 6}, seed=7, size=(64, 48),
                                     num_frames=NUM_FRAMES_IN_VIDEOS)
    videos = dataset.video_dir
    ids = dataset.video_ids("train")  # sorted: parts of 2 are [0, 1], [2, 3], [4, 5], [zz_late, zz_linked]
    suffix = dataset.video_path(ids[0]).suffix
    entries = {e.video_id: e for e in load_annotations(dataset.annotation_paths["train"])}
    entries["zz_late"] = VideoAnnotation("zz_late", ["downloaded later"])
    entries["zz_linked"] = VideoAnnotation("zz_linked", ["a link to a file elsewhere"])
    outside = tmp_path / "elsewhere.mp4"
    outside.write_bytes(dataset.video_path(ids[5]).read_bytes())
    (videos / f"zz_linked{suffix}").symlink_to(outside)
    annotations = tmp_path / "train.json"
    save_annotations(list(entries.values()), annotations)
    source = SplitInput("train", str(annotations), str(videos))
    settings = ("preprocess.rows_per_shard=2", "preprocess.videos_per_task=1")

    first = preprocess([source], tmp_path / "out", config(*settings), progress=False, log=quiet)
    assert (first.rows, first.errors) == (6, 2)
    reasons = {e["video_id"]: e["reason"] for e in read_errors(tmp_path / "out", "train")}
    assert "not found" in reasons["zz_late"] and "outside the videos folder" in reasons["zz_linked"]
    before = fingerprints(tmp_path / "out")

    entries[ids[0]].captions = ["a fixed caption"]  # part 0
    save_annotations(list(entries.values()), annotations)
    replacement = videos / f".new{suffix}"  # part 1: another file in place of ids[2]
    replacement.write_bytes(dataset.video_path(ids[3]).read_bytes())
    os.replace(replacement, dataset.video_path(ids[2]))
    (videos / f"zz_late{suffix}").write_bytes(dataset.video_path(ids[4]).read_bytes())  # part 3
    second = preprocess([source], tmp_path / "out", config(*settings), progress=False, log=quiet)
    after = fingerprints(tmp_path / "out")
    changed = sorted(name for name in before if after[name] != before[name])
    assert changed == [f"train-part-{p:05d}-of-00004.parquet" for p in (0, 1, 3)]  # part 2 kept as it was
    assert second.splits[0].parts_resumed == 1 and second.videos_processed == 6
    assert (second.rows, second.errors) == (7, 1)
    rows = {r["video_id"]: r for r in shard_rows(tmp_path / "out")}
    assert rows[ids[0]]["captions"] == ["a fixed caption"] and "zz_late" in rows
    assert rows[ids[2]]["frames"] == rows[ids[3]]["frames"]  # the replaced file was read
    assert [e["video_id"] for e in read_errors(tmp_path / "out", "train")] == ["zz_linked"]

    # Pieces of an unfinished part are checked too: a piece made from old captions is redone, a current one kept.
    cfg = config(*settings)
    plan = plan_split(source, 2, 1)
    (tmp_path / "out" / "train-part-00002-of-00004.parquet").unlink()  # as if killed before the merge
    worker = PiecePreprocessor(str(tmp_path / "out"), cfg.video.__dict__, "jpeg", 95)
    for piece in plan.pieces(2):
        worker.process(piece)
    entries[ids[5]].captions = ["fixed after its piece was made"]
    save_annotations(list(entries.values()), annotations)
    third = preprocess([source], tmp_path / "out", cfg, progress=False, log=quiet)
    assert third.videos_processed == 1  # piece 0 of part 2 kept, piece 1 redone
    assert {r["video_id"]: r["captions"] for r in shard_rows(tmp_path / "out")}[ids[5]] == \
        ["fixed after its piece was made"]


def test_a_second_run_on_the_same_output_is_refused(data, tmp_path):
    """The lock names the run holding it; a lock whose process is gone on this host is taken over."""
    source = SplitInput("train", str(data["annotations"]), str(data["dataset"].video_dir))
    output = tmp_path / "out"
    folder = OutputFolder(output)
    lock = {"token": "other", "pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}
    folder.write_json(preprocessing.LOCK_FILE, lock)
    with pytest.raises(PreprocessError, match=rf"in use by another preprocessing run \(pid {os.getpid()} on host"):
        preprocess([source], output, config(), progress=False, log=quiet)
    folder.write_json(preprocessing.LOCK_FILE, {**lock, "host": "another-host", "heartbeat": time.time() - 60})
    with pytest.raises(PreprocessError, match=r"another-host.*delete .*_lock\.json"):
        preprocess([source], output, config(), progress=False, log=quiet)
    assert not list(output.glob("*.parquet")) and not list(output.glob("*manifest*"))  # nothing touched

    # stale: another host's run that stopped beating, or a process that is gone on this host
    folder.write_json(preprocessing.LOCK_FILE, {**lock, "host": "another-host", "heartbeat": time.time() - 3600})
    with preprocessing.RunLock(folder, log=quiet):
        pass

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    folder.write_json(preprocessing.LOCK_FILE, {**lock, "pid": gone.pid})
    lock_obj = preprocessing.RunLock(folder, log=quiet)
    lock_obj.HEARTBEAT_S = 0.05
    with lock_obj:
        assert folder.read_json(preprocessing.LOCK_FILE)["token"] == lock_obj.record["token"]
        beat = folder.read_json(preprocessing.LOCK_FILE)["heartbeat"]
        deadline = time.monotonic() + 30
        while folder.read_json(preprocessing.LOCK_FILE)["heartbeat"] == beat:  # the holder keeps it fresh
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(PreprocessError, match="in use by another preprocessing run"):
            preprocessing.RunLock(folder, log=quiet).__enter__()
    assert not folder.exists(preprocessing.LOCK_FILE)  # released at the end
