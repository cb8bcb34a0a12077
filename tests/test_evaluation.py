"""Evaluation on the simulated 3-node cluster: every input row one prediction or one error, captions equal to
single-process `Captioner`, actors on several nodes, the output files, the no-argument default, and score-only
mode on real VATEX references and SpaceTimeGPT's own captions."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stgpt.annotations import VideoAnnotation, load_annotations, load_references, save_annotations
from stgpt.checkpoints import Choice, choose
from stgpt.config import load_config
from stgpt.evaluation import (
    ERRORS_FILE,
    GENERATED_CAPTIONS,
    METRICS_FILE,
    PER_VIDEO_FILE,
    EvalInput,
    EvaluationError,
    _account,
    evaluate,
    shard_input,
    video_input,
)
from stgpt.inference import Captioner
from stgpt.model import build_model, save_checkpoint
from stgpt.shards import SCHEMA, encode_frames, row_frames, shard_file_name
from stgpt.synthetic import make_synthetic_dataset, write_damaged_videos
from stgpt.transforms import resize_and_crop
from stgpt.video import read_video

REPO = Path(__file__).resolve().parents[1]
VATEX = REPO.parent / "shared" / "vatex"
# A tiny model on 4 frames of 32 px, and short beam searches, keep generation fast on two cores.
SMALL = ["video.short_side=32", "video.crop_size=32", "video.num_frames=4", "model.hidden_size=32",
         "model.vocab_size=300", "generation.num_beams=2", "generation.min_new_tokens=1",
         "generation.max_new_tokens=8"]
RUN = ["evaluate.num_actors=2", "evaluate.batch_size=2", "evaluate.metric_workers=1"]
FEW_METRICS = "evaluate.metrics=[CIDEr-D,ROUGE-L]"  # no METEOR: its JVM takes seconds to start
DAMAGED = ("truncated", "empty", "random_bytes", "text")


def small_config(*extra: str):
    return load_config(None, ["model.kind=tiny", *SMALL, *RUN, *extra])


def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_job", REPO / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Synthetic test videos, a tiny checkpoint whose captions depend on the video, and shards of those videos
    mixed with a row of undecodable frames, a row with too few frames and a second row of one video."""
    root = tmp_path_factory.mktemp("eval")
    dataset = make_synthetic_dataset(root / "synthetic", {"test": 6}, seed=3, size=(64, 48), num_frames=16)
    entries = load_annotations(dataset.annotation_paths["test"])
    cfg = small_config()
    torch.manual_seed(0)
    built = build_model(cfg, [c for e in entries for c in e.captions])
    with torch.no_grad():  # random-init weights of std 0.02 caption every video alike; wider ones do not
        for parameter in built.model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.1)
    checkpoint = save_checkpoint(built, root / "checkpoint")

    rows = []
    for entry in entries:
        frames = read_video(dataset.video_path(entry.video_id), 4).frames
        frames = resize_and_crop(frames, 32, 32).numpy()
        rows.append({"video_id": entry.video_id, "split": "test", "frames": encode_frames(frames), "encoding": "jpeg",
                     "height": 32, "width": 32, "frame_indices": [0, 4, 8, 12], "num_source_frames": 16,
                     "captions": entry.captions})
    bad_jpeg = {**rows[0], "video_id": "bad_frames", "frames": [b"not a jpeg"] * 4, "captions": ["a broken row"]}
    short = {**rows[1], "video_id": "too_few_frames", "frames": rows[1]["frames"][:3], "captions": ["three frames"]}
    duplicate = dict(rows[2])
    shards = root / "shards"
    shards.mkdir()
    parts = [rows[:3] + [bad_jpeg], rows[3:] + [short, duplicate]]
    lost = {"video_id": "lost_in_preprocessing", "path": "/videos/lost_in_preprocessing.mp4", "reason": "truncated"}
    for part, part_rows in enumerate(parts):
        metadata = {"rows": len(part_rows), "errors": [lost] if part == 0 else []}  # as preprocessing records
        schema = SCHEMA.with_metadata({b"stgpt": json.dumps(metadata).encode()})
        pq.write_table(pa.Table.from_pylist(part_rows, schema=schema), shards / shard_file_name("test", part, 2))

    # Raw videos: the test split plus one damaged file of each kind and one ID with no file.
    damaged = write_damaged_videos(root / "damaged", dataset.video_path(entries[0].video_id))
    raw = list(entries)
    for kind, path in damaged.items():
        path.rename(dataset.video_dir / f"bad_{kind}.mp4")
        raw.append(VideoAnnotation(f"bad_{kind}", [f"a {kind} video"]))
    raw.append(VideoAnnotation("never_downloaded", ["a video that is not there"]))
    # a file that makes its (isolated) decoder die with SIGSEGV, as a hostile file can
    from stgpt.isolation import CRASH

    (dataset.video_dir / "bad_crasher.mp4").write_bytes(CRASH + dataset.video_path(entries[0].video_id).read_bytes())
    raw.append(VideoAnnotation("bad_crasher", ["a video that crashes its decoder"]))
    save_annotations(raw, root / "raw.json")
    return {"root": root, "dataset": dataset, "checkpoint": str(checkpoint), "shards": shards, "rows": rows,
            "raw_annotations": root / "raw.json", "entries": {e.video_id: e for e in entries}}


@pytest.fixture(scope="module")
def shard_run(ray_cluster, assets):
    inputs = shard_input(assets["shards"], "test")
    result = evaluate(inputs, assets["checkpoint"], small_config(FEW_METRICS), assets["root"] / "out-shards",
                      log=lambda _: None)
    return inputs, result


@pytest.fixture(scope="module")
def video_run(ray_cluster, assets):
    inputs = video_input(assets["raw_annotations"], assets["dataset"].video_dir)
    result = evaluate(inputs, assets["checkpoint"], small_config(FEW_METRICS), assets["root"] / "out-videos",
                      log=lambda _: None)
    return inputs, result


def read_outputs(folder: Path) -> tuple[list[dict], list[dict], dict, list[dict]]:
    captions = json.loads((folder / GENERATED_CAPTIONS).read_text())
    errors = [json.loads(line) for line in (folder / ERRORS_FILE).read_text().splitlines()]
    metrics = json.loads((folder / METRICS_FILE).read_text())
    per_video = [json.loads(line) for line in (folder / PER_VIDEO_FILE).read_text().splitlines()]
    return captions, errors, metrics, per_video


def test_every_shard_row_is_one_prediction_or_one_error(assets, shard_run):
    inputs, result = shard_run
    captions, errors, metrics, _ = read_outputs(result.output_dir)
    good = [row["video_id"] for row in assets["rows"]]
    # Rows in: 6 good, 1 bad JPEG, 1 short, 1 duplicate; the shard metadata adds the video preprocessing lost.
    assert Counter(inputs.video_ids) == Counter(good + ["bad_frames", "too_few_frames", good[2]])
    assert [c["image_id"] for c in captions] == good  # input order, each once
    by_stage = Counter(e["stage"] for e in errors)
    assert by_stage == {"decode": 2, "duplicate": 1, "preprocess": 1}
    reasons = {(e["video_id"], e["stage"]): e for e in errors}
    assert "does not decode" in reasons["bad_frames", "decode"]["reason"]
    assert "3 frames, expected 4" in reasons["too_few_frames", "decode"]["reason"]
    assert (good[2], "duplicate") in reasons and (good[2], "decode") not in reasons
    assert reasons["lost_in_preprocessing", "preprocess"]["reason"] == "truncated"
    assert reasons["bad_frames", "decode"]["path"].endswith("test-part-00000-of-00002.parquet")
    # Accounting: every row (plus the preprocessing error) is exactly one prediction or one error.
    assert len(captions) + len(errors) == len(inputs.video_ids) + 1
    counts = metrics["counts"]
    assert (counts["inputs"], counts["predictions"], counts["errors"]) == (9, 6, 4)


def test_shard_captions_equal_single_process_captioner(assets, shard_run):
    _, result = shard_run
    captioner = Captioner.from_pretrained(assets["checkpoint"], use_gpu=False)
    generation = {"num_beams": 2, "min_new_tokens": 1, "max_new_tokens": 8}
    expected = {row["video_id"]: captioner.caption_frames(row_frames(row, 4)[None], **generation)[0]
                for row in assets["rows"]}
    assert result.predictions == expected
    assert len(set(expected.values())) > 1  # the check means something: captions depend on the video


def test_every_row_was_captioned_by_an_actor_of_the_cluster(ray_cluster, shard_run, video_run):
    """The pool runs on the two-node cluster and every row went through one of its actors. Which actors get rows
    is Ray Data's choice: with the decode stage in front, a tiny model generates faster than videos decode, so
    one free actor may take every row of these small splits (it did in about half the runs here)."""
    import ray

    cluster_nodes = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert len(cluster_nodes) >= 2
    for _, result in (shard_run, video_run):
        nodes = result.info["nodes"]
        assert nodes and set(nodes) <= cluster_nodes, nodes
        assert sum(nodes.values()) == result.info["counts"]["inputs"]


def test_metrics_files_and_report(assets, shard_run):
    _, result = shard_run
    _, _, metrics, per_video = read_outputs(result.output_dir)
    assert metrics["mode"] == "generate" and metrics["untrained"] is False
    assert list(metrics["corpus"]) == ["CIDEr-D", "ROUGE-L"] and "pycocoevalcap" in metrics["notes"]["CIDEr-D"]
    assert metrics["generation"]["num_beams"] == 2 and metrics["generation"]["max_new_tokens"] == 8
    assert metrics["num_scored"] == 6 and metrics["predictions_without_reference"] == []
    assert metrics["references_without_prediction"] == ["bad_frames", "too_few_frames"]  # reported, not dropped
    # Per-video lines hold the prediction and a reference; their mean CIDEr-D is the corpus CIDEr-D.
    assert sorted(p["video_id"] for p in per_video) == sorted(result.predictions)
    for line in per_video:
        assert line["prediction"] == result.predictions[line["video_id"]]
        assert line["reference"] == assets["entries"][line["video_id"]].captions[0]
    assert np.isclose(np.mean([p["CIDEr-D"] for p in per_video]), metrics["corpus"]["CIDEr-D"])
    worst = metrics["worst"]
    assert [w["video_id"] for w in worst] == [v for v, _ in result.report.worst(10)]
    assert [w["CIDEr-D"] for w in worst] == sorted(w["CIDEr-D"] for w in worst)
    text = result.format()
    assert "CIDEr-D" in text and f"Worst {len(worst)} videos" in text and worst[0]["video_id"] in text


def test_raw_videos_damaged_and_missing_are_recorded_and_captions_match(assets, video_run):
    inputs, result = video_run
    captions, errors, metrics, _ = read_outputs(result.output_dir)
    good = list(assets["entries"])
    assert [c["image_id"] for c in captions] == good
    reasons = {e["video_id"]: e for e in errors}
    assert set(reasons) == {f"bad_{kind}" for kind in DAMAGED} | {"never_downloaded", "bad_crasher"}
    assert reasons["bad_crasher"]["stage"] == "decode" and "SIGSEGV" in reasons["bad_crasher"]["reason"]
    assert reasons["never_downloaded"]["stage"] == "find" and "not found" in reasons["never_downloaded"]["reason"]
    assert "empty" in reasons["bad_empty"]["reason"] and "truncated" in reasons["bad_truncated"]["reason"]
    assert all(reasons[f"bad_{kind}"]["stage"] == "decode" for kind in DAMAGED)
    assert reasons["bad_text"]["path"] == str(assets["dataset"].video_dir / "bad_text.mp4")
    assert len(captions) + len(errors) == len(load_annotations(assets["raw_annotations"]))
    # The videos without a caption still have references: scoring reports them, it does not drop them.
    assert sorted(metrics["references_without_prediction"]) == sorted(reasons)
    captioner = Captioner.from_pretrained(assets["checkpoint"], use_gpu=False)
    generation = {"num_beams": 2, "min_new_tokens": 1, "max_new_tokens": 8}
    for video_id in good:
        single = captioner.caption_video(assets["dataset"].video_path(video_id), **generation).caption
        assert result.predictions[video_id] == single
    # Synthetic references carry attributes: accuracy per attribute over the captioned videos.
    accuracy = metrics["attribute_accuracy"]
    assert accuracy["num_videos"] == len(good)
    assert all(0.0 <= accuracy[key] <= 1.0 for key in ("colour", "shape", "motion", "object", "video"))
    assert "Attribute accuracy on 6 synthetic videos" in result.format()


def test_accounting_refuses_lost_rows():
    inputs = EvalInput("videos", "x", ["a", "b"], {"a": ["r"], "b": ["r"]})
    row = {"video_id": "a", "caption": "c", "error": "", "stage": "", "path": "a.mp4", "node_id": "n"}
    assert _account(inputs, [row, {**row, "video_id": "b"}], 0.0).predictions == {"a": "c", "b": "c"}
    with pytest.raises(EvaluationError, match="missing"):
        _account(inputs, [row], 0.0)
    with pytest.raises(EvaluationError, match="unexpected"):
        _account(inputs, [row, {**row, "video_id": "b"}, {**row, "video_id": "z"}], 0.0)


def test_score_only_on_real_vatex_matches_pycocoevalcap(tmp_path, capsys):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = load_references(VATEX / "vatex_test.json")
    generated = json.loads((VATEX / "spacetimegpt_generated_captions.json").read_text())
    both = [g for g in generated if g["image_id"] in references][:30]
    predicted = both[:25] + [{"image_id": "not_a_vatex_video", "caption": "a man is talking"}]
    only_references = [g["image_id"] for g in both[25:]]
    (tmp_path / "p.json").write_text(json.dumps(predicted))
    subset = [VideoAnnotation(g["image_id"], references[g["image_id"]]) for g in both]
    save_annotations(subset, tmp_path / "r.json")

    code = load_job().main(["--predictions", str(tmp_path / "p.json"), "--references", str(tmp_path / "r.json"),
                            "--output", str(tmp_path / "out"), "evaluate.metric_workers=1"])
    assert code == 0
    metrics = json.loads((tmp_path / "out" / METRICS_FILE).read_text())
    assert metrics["mode"] == "score" and metrics["num_scored"] == 25
    assert list(metrics["corpus"]) == ["CIDEr-D", "CIDEr", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR",
                                       "ROUGE-L"]  # all of them by default, each variant named
    assert "CIDEr-D" in metrics["notes"] and "plain CIDEr" in metrics["notes"]["CIDEr"]
    assert metrics["predictions_without_reference"] == ["not_a_vatex_video"]
    assert metrics["references_without_prediction"] == only_references
    assert not (tmp_path / "out" / GENERATED_CAPTIONS).exists()
    # The reference implementation, single process, on the same 25 videos.
    gts = {g["image_id"]: [{"caption": c} for c in references[g["image_id"]]] for g in both[:25]}
    res = {g["image_id"]: [{"caption": g["caption"]}] for g in both[:25]}
    tokenizer = PTBTokenizer()
    cider, per_video = Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))
    assert metrics["corpus"]["CIDEr-D"] == pytest.approx(cider, rel=1e-9)
    lines = [json.loads(x) for x in (tmp_path / "out" / PER_VIDEO_FILE).read_text().splitlines()]
    assert len(lines) == 25
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and "Worst 10 videos" in out and "not_a_vatex_video" not in out.split("Worst")[1]


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    job = load_job()
    assert job.main(["--predictions", str(tmp_path / "p.json"), "--output", str(tmp_path / "out")]) == 2
    assert "--references" in capsys.readouterr().err
    (tmp_path / "p.json").write_text("[]")
    code = job.main(["--predictions", str(tmp_path / "p.json"), "--references", str(tmp_path / "p.json"),
                     "--output", str(tmp_path / "out"), "evaluate.metrics=[CIDEr-D,SPICE]"])
    assert code == 2 and "SPICE" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_default_checkpoint_is_training_best_when_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best = tmp_path / "outputs" / "train" / "best"
    best.mkdir(parents=True)
    (best / "config.json").write_text("{}")
    assert choose(None, small_config()) == Choice(str(best), False, "trained (default)")
    other = tmp_path / "runs" / "vatex" / "best"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    assert choose(None, small_config("train.output_dir=runs/vatex")).path == str(other)
    assert choose("some-org/some-model", small_config()) == Choice("some-org/some-model", False, "given (hub id)")


def test_no_arguments_runs_the_default_on_the_synthetic_test_split(ray_cluster, tmp_path, monkeypatch, capsys):
    """The job with no flags: makes and preprocesses the synthetic test split, builds an untrained tiny model
    (there is no outputs/train/best here), captions, scores, and says the model is untrained."""
    monkeypatch.chdir(tmp_path)
    sizes = ["data.synthetic_train=2", "data.synthetic_validation=1", "data.synthetic_test=4"]
    lighter = ["evaluate.num_actors=1", "preprocess.concurrency=1", FEW_METRICS]  # the cores are few
    code = load_job().main([*sizes, *SMALL, *RUN, *lighter])
    assert code == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "CIDEr-D" in out
    folder = tmp_path / "outputs" / "eval"
    captions, errors, metrics, per_video = read_outputs(folder)
    test_ids = [e.video_id for e in load_annotations(tmp_path / "outputs" / "data" / "annotations" / "test.json")]
    assert sorted(c["image_id"] for c in captions) == sorted(test_ids) and errors == []
    assert metrics["untrained"] is True and metrics["data_kind"] == "shards"
    assert metrics["checkpoint"] == str(tmp_path / "outputs" / "demo" / "untrained")
    assert metrics["attribute_accuracy"]["num_videos"] == 4
    assert metrics["time_reversal"]["num_videos"] == 4  # the synthetic test split, played backwards too
    assert len(json.loads((folder / "generated_captions_reversed.json").read_text())) == 4
    assert sorted(p.name for p in (tmp_path / "outputs" / "shards").glob("test-part-*.parquet")) == [
        "test-part-00000-of-00001.parquet"]
