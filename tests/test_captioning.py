"""jobs/caption.py on the simulated cluster: every video of a folder (nested, every container, bad files) is its
captions or one error, equal to single-process captioning; windows for long videos; resuming after a run killed
between parts keeps the finished parts and duplicates nothing; other settings are refused; list files and globs."""
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stgpt.annotations import load_annotations
from stgpt.captioning import CaptionError, _PartCollector, caption_collection, list_inputs
from stgpt.config import load_config
from stgpt.inference import Captioner
from stgpt.isolation import CRASH
from stgpt.model import build_model, save_checkpoint
from stgpt.synthetic import encode_video, make_synthetic_dataset, plan_dataset, render_video

REPO = Path(__file__).resolve().parents[1]
SMALL = ["video.short_side=32", "video.crop_size=32", "video.num_frames=4", "model.hidden_size=32",
         "model.vocab_size=300", "generation.num_beams=2", "generation.min_new_tokens=1",
         "generation.max_new_tokens=6", "caption.num_actors=2", "caption.batch_size=2"]


def small_config(*extra: str):
    return load_config(None, ["model.kind=tiny", *SMALL, *extra])


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A folder of 6 synthetic videos (two in a subfolder, one remuxed to .mkv), a 6 s video, a text file named
    .mp4 and a file that crashes its decoder; a tiny checkpoint whose captions depend on the video."""
    root = tmp_path_factory.mktemp("caption")
    dataset = make_synthetic_dataset(root / "synthetic", {"test": 6}, seed=5, size=(64, 48), num_frames=16)
    folder = root / "videos"
    (folder / "sub").mkdir(parents=True)
    ids = dataset.video_ids("test")
    for i, video_id in enumerate(ids):
        target = folder / ("sub" if i < 2 else "") / f"{video_id}.mp4"
        target.write_bytes(dataset.video_path(video_id).read_bytes())
    spec = plan_dataset({"long": 1}, seed=2, size=(64, 48))["long"][0]
    encode_video(render_video(spec, (64, 48), num_frames=48), folder / "long.mp4", fps=8)  # 6 s
    (folder / "notes.mp4").write_text("not a video\n")
    (folder / "crasher.mp4").write_bytes(CRASH + dataset.video_path(ids[0]).read_bytes())
    (folder / "readme.txt").write_text("not listed: not a video extension")
    cfg = small_config()
    torch.manual_seed(0)
    captions = [c for entry in load_annotations(dataset.annotation_paths["test"]) for c in entry.captions]
    built = build_model(cfg, captions)
    with torch.no_grad():
        for parameter in built.model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.1)
    return {"root": root, "folder": folder, "ids": ids, "checkpoint": str(save_checkpoint(built, root / "ckpt"))}


def read_parts(output: Path) -> list[dict]:
    return [row for part in sorted(output.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def read_errors(output: Path) -> dict[str, dict]:
    return {e["video_id"]: e for e in map(json.loads, (output / "errors.jsonl").read_text().splitlines())}


def test_listing_a_folder_recursively_and_list_files(assets, tmp_path):
    folder = assets["folder"]
    inputs, errors = list_inputs(str(folder))
    ids = {v.video_id for v in inputs}
    assert ids == {f"sub/{v}" for v in assets["ids"][:2]} | set(assets["ids"][2:]) | {"long", "notes", "crasher"}
    assert errors == []
    paths = [str(folder / f"{v}.mp4") for v in assets["ids"][2:4]]
    (tmp_path / "list.txt").write_text("# two videos\n" + "\n".join(paths) + "\n\n")
    assert [v.path for v in list_inputs(str(tmp_path / "list.txt"))[0]] == sorted(paths)
    (tmp_path / "list.csv").write_text("path,video_id\n" + "".join(f"{p},clip{i}\n" for i, p in enumerate(paths)))
    assert [v.video_id for v in list_inputs(str(tmp_path / "list.csv"))[0]] == ["clip0", "clip1"]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": p, "video_id": "same"}) + "\n" for p in paths))
    inputs, errors = list_inputs(str(tmp_path / "list.jsonl"))
    assert len(inputs) == 1 and len(errors) == 1 and "second input" in errors[0]["reason"]
    pq.write_table(pa.table({"path": paths}), tmp_path / "list.parquet")
    assert len(list_inputs(str(tmp_path / "list.parquet"))[0]) == 2
    assert len(list_inputs(str(folder / "*.mp4"))[0]) == 7  # the top folder's .mp4 files only
    with pytest.raises(CaptionError, match="no such folder"):
        list_inputs(str(tmp_path / "nowhere"))
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(CaptionError, match="no 'path'"):
        list_inputs(str(tmp_path / "bad.csv"))


@pytest.fixture(scope="module")
def whole_run(ray_cluster, assets):
    output = assets["root"] / "out-whole"
    summary = caption_collection(str(assets["folder"]), str(output), assets["checkpoint"],
                                 small_config("caption.videos_per_part=3"), log=lambda _: None)
    return output, summary


def test_every_video_is_its_caption_or_one_error(assets, whole_run):
    output, summary = whole_run
    rows, errors = read_parts(output), read_errors(output)
    captioned = [row["video_id"] for row in rows]
    assert len(captioned) == len(set(captioned)) == 7  # one caption each: the 6 clips and the long video
    assert set(errors) == {"notes", "crasher"}
    assert "not a video" in errors["notes"]["reason"] and "SIGSEGV" in errors["crasher"]["reason"]
    assert summary.videos == 9 and summary.errors == 2 and summary.written_parts == 3
    people = [json.loads(line) for line in (output / "captions.jsonl").read_text().splitlines()]
    assert sorted(p["video_id"] for p in people) == sorted(captioned)
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["settings"]["window_seconds"] is None


def test_captions_equal_single_process_captioning(assets, whole_run):
    output, _ = whole_run
    captioner = Captioner.from_pretrained(assets["checkpoint"], use_gpu=False)
    generation = {"num_beams": 2, "min_new_tokens": 1, "max_new_tokens": 6}
    for row in read_parts(output):
        single = captioner.caption_video(row["path"], **generation)
        assert row["caption"] == single.caption and row["frame_indices"] == single.frame_indices
    assert len({row["caption"] for row in read_parts(output)}) > 1  # the captions depend on the video


def test_windows_for_long_videos(ray_cluster, assets):
    output = assets["root"] / "out-windows"
    cfg = small_config("caption.window_seconds=2", "caption.window_stride_seconds=2")
    caption_collection(str(assets["folder"]), str(output), assets["checkpoint"], cfg, log=lambda _: None)
    long = [row for row in read_parts(output) if row["video_id"] == "long"]
    assert [(r["window_start_s"], r["window_end_s"]) for r in long] == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    assert [r["frame_indices"] for r in long] == [[0, 4, 8, 12], [16, 20, 24, 28], [32, 36, 40, 44]]
    short = [row for row in read_parts(output) if row["video_id"] == assets["ids"][2]]
    assert [(r["window_start_s"], r["window_end_s"]) for r in short] == [(0.0, 2.0)]  # 2 s: one window


def test_a_killed_run_resumes_without_duplicates_and_settings_are_checked(ray_cluster, assets, monkeypatch):
    output = assets["root"] / "out-resume"
    cfg = small_config("caption.videos_per_part=3")
    original, calls = _PartCollector._write, []

    def dies_after_one_part(self, part):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(part)
        original(self, part)

    monkeypatch.setattr(_PartCollector, "_write", dies_after_one_part)
    with pytest.raises(KeyboardInterrupt):
        caption_collection(str(assets["folder"]), str(output), assets["checkpoint"], cfg, log=lambda _: None)
    monkeypatch.setattr(_PartCollector, "_write", original)
    kept = sorted(output.glob("part-*.parquet"))
    assert len(kept) == 1 and not (output / "captions.jsonl").exists()
    before = kept[0].stat().st_mtime_ns
    summary = caption_collection(str(assets["folder"]), str(output), assets["checkpoint"], cfg, log=lambda _: None)
    assert (summary.kept_parts, summary.written_parts) == (1, 2) and kept[0].stat().st_mtime_ns == before
    ids = [row["video_id"] for row in read_parts(output)]
    assert len(ids) == len(set(ids)) == 7 and set(read_errors(output)) == {"notes", "crasher"}

    with pytest.raises(CaptionError, match="generation"):
        caption_collection(str(assets["folder"]), str(output), assets["checkpoint"],
                           small_config("caption.videos_per_part=3", "generation.num_beams=3"), log=lambda _: None)
    summary = caption_collection(str(assets["folder"]), str(output), assets["checkpoint"],
                                 small_config("caption.videos_per_part=3", "generation.num_beams=3"), overwrite=True,
                                 log=lambda _: None)
    assert summary.kept_parts == 0 and summary.written_parts == 3


def load_job():
    spec = importlib.util.spec_from_file_location("caption_job", REPO / "jobs" / "caption.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_exit_codes(ray_cluster, assets, tmp_path, capsys):
    job = load_job()
    args = ["--checkpoint", assets["checkpoint"], *SMALL]
    assert job.main(["--videos", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), *args]) == 2
    assert "no such folder" in capsys.readouterr().err
    videos = tmp_path / "two"
    videos.mkdir()
    for video_id in assets["ids"][2:4]:
        (videos / f"{video_id}.webm").write_bytes((assets["folder"] / f"{video_id}.mp4").read_bytes())
    assert job.main(["--videos", str(videos), "--output", str(tmp_path / "o"), *args]) == 0
    assert "2 videos: 2 captions" in capsys.readouterr().out
    assert job.main(["--videos", str(assets["folder"]), "--output", str(tmp_path / "o2"), *args]) == 1  # errors


def test_links_out_of_the_folder_are_errors_not_inputs(assets, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    inside = folder / "real.mp4"
    inside.write_bytes((assets["folder"] / f"{assets['ids'][2]}.mp4").read_bytes())
    (folder / "alias.mp4").symlink_to(inside)  # inside the folder: an input
    (folder / "escape.mp4").symlink_to(assets["folder"] / f"{assets['ids'][3]}.mp4")  # outside: refused
    (folder / "dangling.mp4").symlink_to(tmp_path / "nothing.mp4")
    inputs, errors = list_inputs(str(folder))
    assert {v.video_id for v in inputs} == {"real", "alias"}
    reasons = {e["video_id"]: e["reason"] for e in errors}
    assert "outside" in reasons["escape"] and "no file" in reasons["dangling"]
