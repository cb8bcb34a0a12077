"""The synthetic dataset: real videos, decoded with decord, checked against what the annotations claim."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

decord = pytest.importorskip("decord")

from stgpt import synthetic  # noqa: E402
from stgpt.annotations import load_annotations  # noqa: E402
from stgpt.synthetic import (  # noqa: E402
    COLOURS,
    MOTIONS,
    SHAPES,
    ObjectSpec,
    attribute_accuracy,
    caption_variants,
    make_synthetic_dataset,
    parse_caption,
    plan_video,
    render_video,
    write_damaged_videos,
)

SMALL = {"train": 16, "validation": 4, "test": 4}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # More two-object videos than the default, so both kinds are well represented in a small set.
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), SMALL, seed=3, p_two_objects=0.4)


def decode(path) -> np.ndarray:
    reader = decord.VideoReader(str(path))
    return reader.get_batch(list(range(len(reader)))).asnumpy()


def colour_mask(frame: np.ndarray, colour: str, tolerance: float = 60.0) -> np.ndarray:
    distance = np.linalg.norm(frame.astype(np.float32) - np.asarray(COLOURS[colour], np.float32), axis=-1)
    return distance < tolerance


def centroid_and_area(frame: np.ndarray, colour: str) -> tuple[float, float, int]:
    ys, xs = np.nonzero(colour_mask(frame, colour))
    assert len(xs), f"no {colour} pixels in the frame"
    return float(xs.mean()), float(ys.mean()), len(xs)


def sorted_objects(objects):
    return sorted(objects, key=lambda obj: obj["colour"] or "")


# --------------------------------------------------------------------------------------------------------
# The folder


def test_folder_holds_vatex_annotations_and_one_video_per_id(dataset):
    all_ids = []
    for split, count in SMALL.items():
        path = dataset.annotation_paths[split]
        assert path == dataset.root / "annotations" / f"{split}.json"
        annotations = load_annotations(path)  # the suite's own strict reader accepts it
        assert len(annotations) == count
        for annotation in annotations:
            assert len(annotation.captions) == 10
            assert len(set(annotation.captions)) == 10, "captions should vary"
            objects = annotation.extra["attributes"]["objects"]
            assert 1 <= len(objects) <= 2
            assert len({obj["colour"] for obj in objects}) == len(objects), "colours tell objects apart"
            assert dataset.video_path(annotation.video_id).is_file()
        all_ids += [a.video_id for a in annotations]
    assert len(set(all_ids)) == len(all_ids), "video IDs are unique across splits"
    manifest = json.loads((dataset.root / "manifest.json").read_text())
    assert manifest["splits"] == {split: dataset.video_ids(split) for split in SMALL}
    counts = Counter(len(a["objects"]) for split in SMALL for a in dataset.attributes(split).values())
    assert counts[1] and counts[2], "both one- and two-object videos are made"


def test_videos_decode_with_the_requested_shape_and_rate(dataset):
    video_id = dataset.video_ids("test")[0]
    reader = decord.VideoReader(str(dataset.video_path(video_id)))
    assert len(reader) == 32
    assert reader.get_avg_fps() == pytest.approx(8)
    assert reader[0].asnumpy().shape == (128, 128, 3)


def test_encoded_frames_match_the_rendered_ones(dataset):
    """What decord decodes is what the renderer drew, up to H.264/yuv420p loss."""
    plan = synthetic.plan_dataset(SMALL, seed=3, p_two_objects=0.4)
    for spec in plan["validation"]:
        decoded = decode(dataset.video_path(spec.video_id)).astype(np.float32)
        rendered = render_video(spec, (128, 128), 32).astype(np.float32)
        assert np.abs(decoded - rendered).mean() < 3.0


def test_non_square_frames(tmp_path):
    data = make_synthetic_dataset(tmp_path, {"train": 2}, size=(160, 120), num_frames=20, fps=10)
    frames = decode(data.video_path(data.video_ids("train")[0]))
    assert frames.shape == (20, 120, 160, 3)


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="even"):
        make_synthetic_dataset(tmp_path / "a", {"train": 1}, size=(127, 128))
    with pytest.raises(ValueError, match="container"):
        make_synthetic_dataset(tmp_path / "b", {"train": 1}, container="avi")


# --------------------------------------------------------------------------------------------------------
# Determinism and idempotence


def test_same_seed_gives_identical_annotations_and_frames(tmp_path):
    counts = {"train": 3, "test": 2}
    first = make_synthetic_dataset(tmp_path / "first", counts, seed=7, p_two_objects=0.5)
    second = make_synthetic_dataset(tmp_path / "second", counts, seed=7, p_two_objects=0.5)
    other = make_synthetic_dataset(tmp_path / "other", counts, seed=8, p_two_objects=0.5)
    for split in counts:
        assert first.annotation_paths[split].read_bytes() == second.annotation_paths[split].read_bytes()
        assert first.entries(split) != other.entries(split)
        for video_id in first.video_ids(split):
            assert np.array_equal(decode(first.video_path(video_id)), decode(second.video_path(video_id)))
    video_id = first.video_ids("train")[0]
    assert not np.array_equal(decode(first.video_path(video_id)), decode(other.video_path(video_id)))


def test_a_split_does_not_change_when_another_split_grows(tmp_path):
    small = make_synthetic_dataset(tmp_path / "small", {"train": 2, "test": 3})
    large = make_synthetic_dataset(tmp_path / "large", {"train": 5, "test": 3})
    assert small.annotation_paths["test"].read_bytes() == large.annotation_paths["test"].read_bytes()


def test_second_call_on_a_complete_folder_writes_nothing(tmp_path):
    first = make_synthetic_dataset(tmp_path, {"train": 3})
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock")
    before = {p: p.stat().st_mtime_ns for p in files}
    again = make_synthetic_dataset(tmp_path, {"train": 3})
    assert again == first
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock") == files
    # Readable by others sharing the folder (not the 0600 of a mkstemp file), as the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in files)
    with pytest.raises(FileExistsError, match="seed"):
        make_synthetic_dataset(tmp_path, {"train": 3}, seed=1)


def test_interrupted_run_is_completed_on_the_next_call(tmp_path, monkeypatch):
    counts = {"train": 5, "test": 2}
    real_encode = synthetic.encode_video
    calls = []

    def encode_then_die(frames, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:
            # Die half way through writing the fourth video, as a killed process would.
            Path(path).write_bytes(b"\x00\x00\x00 ftypisom")
            raise KeyboardInterrupt
        return real_encode(frames, path, *args, **kwargs)

    folder = tmp_path / "data"
    monkeypatch.setattr(synthetic, "encode_video", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_synthetic_dataset(folder, counts)
    monkeypatch.setattr(synthetic, "encode_video", real_encode)

    assert not (folder / "manifest.json").exists(), "an interrupted folder must not look complete"
    written = sorted((folder / "videos").iterdir())
    assert len(written) == 3, "only whole videos carry their final name"
    for video in written:
        assert len(decord.VideoReader(str(video))) == 32
    kept = {video: video.stat().st_mtime_ns for video in written}
    # A process killed outright (no cleanup) leaves its temporary file behind.
    (folder / "videos" / ".synth_train_00003.mp4.x1y2z3.tmp").write_bytes(b"\x00\x00\x00 ftypisom")

    completed = make_synthetic_dataset(folder, counts)
    fresh = make_synthetic_dataset(tmp_path / "fresh", counts)
    assert {video: video.stat().st_mtime_ns for video in kept} == kept, "finished videos are not redone"
    assert (folder / "manifest.json").is_file()
    assert not list(folder.rglob("*.tmp"))
    for split in counts:
        assert completed.annotation_paths[split].read_bytes() == fresh.annotation_paths[split].read_bytes()
        for video_id in completed.video_ids(split):
            assert np.array_equal(decode(completed.video_path(video_id)), decode(fresh.video_path(video_id)))


def test_files_of_unknown_origin_are_replaced(tmp_path):
    """Without a manifest or in-progress record from these parameters, a file with a video's name is not trusted."""
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "synth_train_00000.mp4").write_bytes(b"not a video")
    data = make_synthetic_dataset(tmp_path, {"train": 1})
    assert len(decord.VideoReader(str(data.video_path("synth_train_00000")))) == 32


def test_a_deleted_video_is_rewritten(tmp_path):
    data = make_synthetic_dataset(tmp_path, {"train": 3})
    video = data.video_path(data.video_ids("train")[1])
    expected = decode(video)
    video.unlink()
    make_synthetic_dataset(tmp_path, {"train": 3})
    assert np.array_equal(decode(video), expected)


# --------------------------------------------------------------------------------------------------------
# The pictures show what the captions say


def overlap_at_end(spec) -> bool:
    """Whether a video's two objects' bounding boxes meet in its last frame (one may hide part of the other)."""
    if len(spec.objects) < 2:
        return False
    (ax, ay, ah), (bx, by, bh) = (synthetic.object_state(obj, 1.0, (128, 128)) for obj in spec.objects)
    return max(abs(ax - bx), abs(ay - by)) <= ah + bh + 1


def test_objects_move_the_way_their_attributes_say(dataset):
    """Measured on decoded frames: each object's colour blob moves (or scales) as its attributes say."""
    travel = synthetic.TRAVEL * 128
    plans = synthetic.plan_dataset(SMALL, seed=3, p_two_objects=0.4)
    occluded = {spec.video_id for specs in plans.values() for spec in specs if overlap_at_end(spec)}
    checked = Counter()
    for split in SMALL:
        for video_id, attributes in dataset.attributes(split).items():
            if video_id in occluded:
                continue
            frames = decode(dataset.video_path(video_id))
            for obj in attributes["objects"]:
                x0, y0, area0 = centroid_and_area(frames[0], obj["colour"])
                x1, y1, area1 = centroid_and_area(frames[-1], obj["colour"])
                dx, dy, growth = x1 - x0, y1 - y0, area1 / area0
                along, across = {
                    "left": (-dx, dy), "right": (dx, dy), "up": (-dy, dx), "down": (dy, dx),
                    "grow": (0.0, max(abs(dx), abs(dy))), "shrink": (0.0, max(abs(dx), abs(dy))),
                }[obj["motion"]]
                message = f"{video_id} {obj}: moved ({dx:.1f}, {dy:.1f}), area x{growth:.2f}"
                if obj["motion"] in ("grow", "shrink"):
                    assert (growth > 1.5) if obj["motion"] == "grow" else (growth < 1 / 1.5), message
                    assert across < 0.2 * travel, message
                else:
                    assert 0.7 * travel < along < 1.3 * travel, message
                    assert abs(across) < 0.2 * travel, message
                    assert 0.75 < growth < 1.33, message
                checked[obj["motion"]] += 1
    assert len(checked) >= 4, f"the small dataset should exercise most motions, got {checked}"
    assert sum(checked.values()) >= 20


def measure_objects(specs, num_frames: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """Per motion: x, y and area of each object, measured from rendered pixels, at each of num_frames frames."""
    found: dict[str, list] = {motion: [] for motion in MOTIONS}
    for spec in specs:
        for obj in spec.objects:
            # Each object alone: later frames may show one object passing in front of the other.
            frames = render_video(dataclasses.replace(spec, objects=(obj,)), (128, 128), num_frames)
            found[obj.motion].append([centroid_and_area(frame, obj.colour) for frame in frames])
    return {motion: np.asarray(values, dtype=np.float64) for motion, values in found.items()}


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, alpha: float) -> float:
    return float(np.sqrt(-np.log(alpha / 2) / 2) * np.sqrt((n + m) / (n * m)))


def test_first_frame_does_not_reveal_the_motion():
    """Start x, y and size are distributed alike for every motion; the test can see a real difference.

    Thousands of videos are planned (no encoding) and their frames rendered; objects are measured from the
    pixels. Every pair of motions is compared on x, y and area with a two-sample KS test at a Bonferroni-
    corrected 1% level. As a control of the test's power, the same test must see the difference between left
    and right movers half way through the clip, where their mean x differs by only one travel distance, and
    between growers and shrinkers there.
    """
    specs = [plan_video(f"v{i}", synthetic.video_rng(11, "stats", i)) for i in range(2000)]
    measured = measure_objects(specs)  # frames at progress 0, 0.5, 1
    pairs = list(itertools.combinations(MOTIONS, 2))
    alpha = 0.01 / (len(pairs) * 3)
    for first, second in pairs:
        a, b = measured[first], measured[second]
        assert min(len(a), len(b)) > 300
        for feature, name in enumerate(("x", "y", "area")):
            statistic = ks_statistic(a[:, 0, feature], b[:, 0, feature])
            limit = ks_critical(len(a), len(b), alpha)
            assert statistic < limit, f"frame 0 {name} of {first} vs {second} movers differ: KS {statistic:.3f}"

    left, right, grow, shrink = (measured[m] for m in ("left", "right", "grow", "shrink"))
    assert ks_statistic(left[:, 1, 0], right[:, 1, 0]) > ks_critical(len(left), len(right), alpha)
    assert ks_statistic(grow[:, 1, 2], shrink[:, 1, 2]) > ks_critical(len(grow), len(shrink), alpha)


def test_colour_shape_and_motion_are_drawn_evenly():
    specs = [plan_video(f"v{i}", synthetic.video_rng(5, "even", i)) for i in range(1200)]
    objects = [obj for spec in specs for obj in spec.objects]
    for attribute, values in (("colour", list(COLOURS)), ("shape", SHAPES), ("motion", MOTIONS)):
        counts = Counter(getattr(obj, attribute) for obj in objects)
        expected = len(objects) / len(values)
        assert set(counts) == set(values)
        assert all(abs(counts[v] - expected) < 0.25 * expected for v in values), counts


# --------------------------------------------------------------------------------------------------------
# Captions


def test_every_caption_names_the_recorded_attributes(dataset):
    for split in SMALL:
        for entry in dataset.entries(split):
            truth = sorted_objects(entry["attributes"]["objects"])
            for caption in entry["enCap"]:
                assert sorted_objects(parse_caption(caption)["objects"]) == truth, caption


def test_parse_caption_round_trips_every_template():
    count = 0
    for colour, shape, motion in itertools.product(COLOURS, SHAPES, MOTIONS):
        obj = ObjectSpec(colour, shape, motion, 0.0, 0.0, 1.0)
        for caption in caption_variants([obj]):
            assert parse_caption(caption) == {"objects": [obj.attributes()]}, caption
            count += 1
    # Two objects: pairs that between them use every colour, shape and motion, in both orders.
    pairs = [
        (("red", "circle", "left"), ("blue", "square", "grow")),
        (("green", "triangle", "shrink"), ("yellow", "circle", "down")),
        (("yellow", "square", "up"), ("red", "triangle", "right")),
    ]
    for pair in pairs:
        for ordered in (pair, pair[::-1]):
            objects = [ObjectSpec(*attrs, 0.0, 0.0, 1.0) for attrs in ordered]
            expected = {"objects": [obj.attributes() for obj in objects]}
            # Every 7th of the ~10,000 variants: all templates, and (7 being prime to the synonym counts)
            # every wording in both places.
            for caption in itertools.islice(caption_variants(objects), 0, None, 7):
                assert parse_caption(caption) == expected, caption
                count += 1
    assert count > 20_000


def test_parse_caption_reads_free_wording_and_reports_what_is_missing():
    assert parse_caption("The Red Ball is moving leftwards.") == {
        "objects": [{"colour": "red", "shape": "circle", "motion": "left"}]
    }
    assert parse_caption("a yellow box ascends") == {
        "objects": [{"colour": "yellow", "shape": "square", "motion": "up"}]
    }
    assert parse_caption("a blue thing") == {"objects": [{"colour": "blue", "shape": None, "motion": None}]}
    assert parse_caption("nothing to see") == {"objects": []}


def test_attribute_accuracy_matches_objects_in_either_order():
    attributes = {
        "a": {"objects": [{"colour": "red", "shape": "circle", "motion": "left"}]},
        "b": {
            "objects": [
                {"colour": "blue", "shape": "square", "motion": "up"},
                {"colour": "green", "shape": "triangle", "motion": "grow"},
            ]
        },
        "c": {"objects": [{"colour": "yellow", "shape": "square", "motion": "shrink"}]},
    }
    perfect = {
        "a": "A red ball slides left.",
        "b": "The green triangle grows while a blue box rises.",  # objects in the other order
        "c": "A yellow block gets smaller.",
    }
    result = attribute_accuracy(perfect, attributes)
    assert {key: result[key] for key in ("colour", "shape", "motion", "object", "video")} == dict.fromkeys(
        ("colour", "shape", "motion", "object", "video"), 1.0
    )
    assert result["num_videos"] == 3

    flawed = {
        "a": "A red ball slides right.",  # motion wrong
        "b": "A blue square rises.",  # second object not mentioned
        "c": "A yellow block gets smaller and a red dot falls.",  # right, plus an object that is not there
        "unknown": "A red ball slides left.",  # no attributes: not scored
    }
    result = attribute_accuracy(flawed, attributes)
    # 4 true objects: a (colour, shape right), b1 (all right), b2 (nothing), c (all right).
    assert result["colour"] == pytest.approx(3 / 4)
    assert result["shape"] == pytest.approx(3 / 4)
    assert result["motion"] == pytest.approx(2 / 4)
    assert result["object"] == pytest.approx(2 / 4)
    assert result["video"] == pytest.approx(0 / 3)
    with pytest.raises(ValueError, match="share no video"):
        attribute_accuracy({"x": "a red ball"}, attributes)


def test_attribute_accuracy_of_reference_captions_and_of_shuffled_ones(dataset):
    attributes = dataset.attributes("train")
    entries = dataset.entries("train")
    own = {entry["videoID"]: entry["enCap"][0] for entry in entries}
    assert attribute_accuracy(own, attributes)["object"] == 1.0
    # Each video gets the caption of the next: right only where two videos happen to agree.
    shifted = {entry["videoID"]: entries[(i + 1) % len(entries)]["enCap"][0] for i, entry in enumerate(entries)}
    assert attribute_accuracy(shifted, attributes)["object"] < 0.5


# --------------------------------------------------------------------------------------------------------
# Damaged files and webm


def test_damaged_videos_cannot_be_opened(dataset, tmp_path):
    source = dataset.video_path(dataset.video_ids("train")[0])
    damaged = write_damaged_videos(tmp_path, source)
    assert set(damaged) == set(synthetic.DAMAGED_KINDS)
    assert damaged["empty"].stat().st_size == 0
    assert damaged["truncated"].read_bytes() == source.read_bytes()[: source.stat().st_size // 2]
    assert damaged["text"].read_text().strip()
    for kind, path in damaged.items():
        assert path.suffix == ".mp4" and path.name == f"damaged_{kind}.mp4"
        with pytest.raises(Exception):
            decord.VideoReader(str(path))


@pytest.mark.skipif(synthetic.available_encoder("webm") is None, reason="this PyAV build has no VP9/VP8 encoder")
def test_webm_videos(tmp_path):
    data = make_synthetic_dataset(tmp_path, {"train": 2}, container="webm", num_frames=16)
    video_id = data.video_ids("train")[0]
    path = data.video_path(video_id)
    assert path.suffix == ".webm" and path.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML (Matroska/WebM)
    frames = decode(path)
    assert frames.shape == (16, 128, 128, 3)
    spec = synthetic.plan_dataset({"train": 2})["train"][0]
    assert np.abs(frames.astype(np.float32) - render_video(spec, (128, 128), 16)).mean() < 3.0
    assert sorted(os.listdir(data.video_dir)) == [f"{i}.webm" for i in data.video_ids("train")]
