"""Evaluation: caption a split on Ray, then score the captions as coco-caption does.

    shards or videos -> decode stage (CPU tasks) -> model actors (generate only) -> predictions + errors -> metrics

Inputs are a split's Parquet shards or raw videos named by an annotation file; `stgpt.pipeline` decodes them on
CPU workers and a pool of `evaluate.num_actors` model actors runs beam search (`Captioner.caption_each`, the
code offline captioning and serving run, so the captions are theirs). Nothing lost, nothing twice: every input
row becomes one prediction or one error record, checked before scoring; videos preprocessing rejected are
carried over from the shards' metadata. Scoring is `stgpt.metrics.score_captions` over `evaluate.metric_workers`
actors; the synthetic dataset's references also give colour / shape / motion accuracy. Output files:
`generated_captions.json` (COCO result format), `metrics.json`, `per_video_scores.jsonl`, `errors.jsonl`.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import ray

from stgpt import storage, synthetic
from stgpt.annotations import VideoAnnotation, find_video_files, load_annotations, load_predictions, save_predictions
from stgpt.checkpoints import UNTRAINED_NOTE
from stgpt.config import Config, ConfigError
from stgpt.metrics import CIDER_D, METRICS, score_captions
from stgpt.model import decode_settings
from stgpt.pipeline import caption_stages, decode_shard_rows, decode_videos, pool_size
from stgpt.preprocessing import PreprocessError, SplitInput, preprocess, read_shard_metadata
from stgpt.resources import AUTO, beat, fit_evaluation
from stgpt.shards import FRAME_COLUMNS, list_shards

GENERATED_CAPTIONS = "generated_captions.json"
REVERSED_CAPTIONS = "generated_captions_reversed.json"  # the time-reversal check's captions (synthetic data)
METRICS_FILE = "metrics.json"
PER_VIDEO_FILE = "per_video_scores.jsonl"
ERRORS_FILE = "errors.jsonl"

ACTOR_START_TIMEOUT_S = 600  # loading a checkpoint is slow; a pool that cannot be placed at all fails after this


class EvaluationError(RuntimeError):
    """An evaluation that ran but has nothing to score, or whose accounting does not add up."""


# --------------------------------------------------------------------------------------------------------
# What to caption: shard rows or raw videos, with the references to score against.


@dataclass
class EvalInput:
    """The rows to caption, in order, and the references; `errors` are videos known to have no row."""

    kind: str  # "shards" or "videos"
    source: str  # where the rows come from, for the report
    video_ids: list[str]  # one per input row, in input order (shard rows may repeat an ID)
    references: dict[str, list[str]]
    shard_files: list[str] = field(default_factory=list)  # kind "shards"
    video_paths: dict[str, str] = field(default_factory=dict)  # kind "videos": ID -> file
    attributes: dict[str, dict] | None = None  # the synthetic dataset's objects, for attribute accuracy
    errors: list[dict] = field(default_factory=list)  # missing files, videos preprocessing could not use


def shard_input(data: str | os.PathLike, split: str = "test", references: str | os.PathLike | None = None,
                ) -> EvalInput:
    """Rows of a split's shards: a shard folder (its complete `split`), a glob of shard files, or one file.

    References are the rows' own captions unless a `references` file is given (then every video it names is
    expected). Attributes come from that file, or from the annotation file named in the folder's manifest.
    """
    text = os.fspath(data)
    if _is_glob(text):
        files = sorted(os.path.abspath(f) for f in glob.glob(text))
        if not files:
            raise FileNotFoundError(f"no shard files match {text}")
    elif text.endswith(".parquet"):
        if not storage.exists(text):
            raise FileNotFoundError(f"shard file {text} does not exist")
        files = [storage.absolute(text)]
    else:
        files = list_shards(text, split)
    video_ids: list[str] = []
    captions: dict[str, list[str]] = {}
    errors: list[dict] = []
    for path in files:
        table = pq.read_table(path, columns=["video_id", "captions"])
        for video_id, row_captions in zip(table.column("video_id").to_pylist(), table.column("captions").to_pylist()):
            video_ids.append(video_id)
            captions.setdefault(video_id, list(row_captions or []))
        errors += [_error(e["video_id"], e.get("path", path), e["reason"], "preprocess") for e in _shard_errors(path)]
    inputs = EvalInput("shards", text, video_ids, captions, shard_files=files, errors=errors)
    if references is not None:
        inputs.references, inputs.attributes = _read_references(references)
    else:
        inputs.attributes = _manifest_attributes(files[0], split)
    return inputs


def video_input(annotations: str | os.PathLike, videos: str | os.PathLike,
                references: str | os.PathLike | None = None) -> EvalInput:
    """Raw videos: one row per annotated video with a file in `videos`; the others are errors already."""
    entries = load_annotations(annotations)
    listing = find_video_files([a.video_id for a in entries], videos)
    found = {video_id: file.path for video_id, file in listing.found.items()}
    errors = [_error(v, f"{os.fspath(videos).rstrip('/')}/{v}.mp4", listing.reason(v), "find") for v in listing.missing]
    inputs = EvalInput("videos", os.fspath(annotations), [a.video_id for a in entries if a.video_id in found],
                       {a.video_id: list(a.captions) for a in entries}, video_paths=found,
                       attributes=_attributes(entries), errors=errors)
    if references is not None:
        inputs.references, inputs.attributes = _read_references(references)
    return inputs


def _read_references(path: str | os.PathLike) -> tuple[dict[str, list[str]], dict[str, dict] | None]:
    entries = load_annotations(path)
    return {a.video_id: list(a.captions) for a in entries}, _attributes(entries)


def _attributes(entries: Sequence[VideoAnnotation]) -> dict[str, dict] | None:
    found = {a.video_id: a.extra["attributes"] for a in entries if isinstance(a.extra.get("attributes"), dict)}
    return found or None


def _shard_errors(path: str) -> list[dict]:
    """The videos preprocessing could not use, as the shard's metadata records them (none if it has none)."""
    try:
        return list(read_shard_metadata(path).get("errors", []))
    except (KeyError, ValueError, OSError):  # a shard written by another tool: no stgpt metadata
        return []


def _manifest_attributes(shard_path: str, split: str) -> dict[str, dict] | None:
    """Attributes from the annotation file preprocessing recorded in `<split>-manifest.json`, if it has any."""
    if storage.local_path(shard_path) is None:
        return None
    manifest = Path(storage.local_path(shard_path)).parent / f"{split}-manifest.json"
    try:
        annotations = json.loads(manifest.read_text())["annotations"]
        return _attributes(load_annotations(annotations)) if os.path.isfile(annotations) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _error(video_id: str, path: str, reason: str, stage: str) -> dict[str, str]:
    return {"video_id": video_id, "path": path, "reason": reason, "stage": stage}


# --------------------------------------------------------------------------------------------------------
# Generation on Ray Data.


@dataclass
class GenerationResult:
    """Captions in input order, the videos without one, and how the work spread."""

    predictions: dict[str, str]
    errors: list[dict[str, str]]
    nodes: dict[str, int]  # node ID -> rows its actors handled
    seconds: float


def caption_dataset(inputs: EvalInput, checkpoint: str, cfg: Config, log: Callable[[str], None] = print,
                    reverse_time: bool = False) -> GenerationResult:
    """Caption every input row: a CPU stage decodes, a pool of `evaluate.num_actors` model actors generates;
    one prediction or error each. `reverse_time`: every video played backwards (`decode_reversed`)."""
    ecfg = cfg.evaluate
    start = time.perf_counter()
    rows = len(inputs.video_ids)
    outputs: list[dict[str, Any]] = []
    num_actors = fit_evaluation(cfg, log).evaluate.num_actors if ecfg.num_actors == AUTO else ecfg.num_actors
    num_actors = pool_size(num_actors, ecfg.cpus_per_actor, log)
    log(f"captioning {rows} rows of {inputs.source} with {checkpoint} on {num_actors} actor(s) "
        f"({'1 GPU' if ecfg.use_gpu else f'{ecfg.cpus_per_actor:g} CPU'} each)")
    if rows:
        video = decode_settings(checkpoint, cfg.video)
        # About one block per batch, so the pool's actors share the work from the first batch on.
        num_blocks = max(1, min(rows, math.ceil(rows / ecfg.batch_size)))
        if inputs.kind == "shards":
            dataset = ray.data.read_parquet(inputs.shard_files, include_paths=True, override_num_blocks=num_blocks)
            dataset = dataset.select_columns([*FRAME_COLUMNS, "path"])  # pushed into the read: no captions
            # A read block is a whole file (or several small ones); cut into batch-sized blocks, streaming,
            # so every actor of the pool gets work instead of one actor a whole shard.
            dataset = dataset.repartition(target_num_rows_per_block=ecfg.batch_size)
            decode, decode_kwargs = decode_shard_rows, {"video": video}
        else:
            items = [{"video_id": v, "path": inputs.video_paths[v], "part": 0} for v in inputs.video_ids]
            dataset = ray.data.from_items(items, override_num_blocks=num_blocks)
            decode, decode_kwargs = decode_videos, {"video": video}
        if reverse_time:
            decode, decode_kwargs = decode_reversed, {"decode": decode, **decode_kwargs}
        dataset = caption_stages(dataset, decode, decode_kwargs, checkpoint, cfg.generation, ecfg, num_actors)
        # Start the whole pool before the first batch: the first actor up would otherwise take every batch of a
        # small split, and a pool the cluster cannot hold (no GPUs) fails with a message instead of waiting.
        dataset.context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        try:
            for row in dataset.iter_rows():
                if row["kind"] != "end":  # a video's window count: evaluation takes one window per video
                    outputs.append(row)
                beat()  # a caption (or an error) finished: progress for the job's stall watchdog
        except ray.exceptions.GetTimeoutError:
            raise EvaluationError(
                f"{num_actors} captioning actor(s) of {ecfg.cpus_per_actor:g} CPU and {int(ecfg.use_gpu)} GPU "
                f"did not start within {ACTOR_START_TIMEOUT_S} s: the cluster ({ray.cluster_resources()}) cannot "
                "hold them; lower evaluate.num_actors or evaluate.cpus_per_actor") from None
    return _account(inputs, outputs, time.perf_counter() - start)


def decode_reversed(batch: dict[str, np.ndarray], decode: Callable, **kwargs: Any):
    """`decode`'s rows with every clip's frames in reverse order: the time-reversal check's decode stage."""
    crop = kwargs["video"].crop_size
    for out in decode(batch, **kwargs):
        if out["kind"][0] == "window":
            frames = np.frombuffer(out["frames"][0], np.uint8).reshape(-1, crop, crop, 3)
            out["frames"] = [synthetic.reverse_time(frames, axis=0).tobytes()]
            out["frame_indices"] = [list(out["frame_indices"][0])[::-1]]
        yield out


def _account(inputs: EvalInput, outputs: list[dict[str, Any]], seconds: float) -> GenerationResult:
    """Match the actors' rows to the input rows: each becomes one prediction or one error, in input order."""
    got = Counter(str(row["video_id"]) for row in outputs)
    if got != Counter(inputs.video_ids):
        lost, extra = Counter(inputs.video_ids) - got, got - Counter(inputs.video_ids)
        raise EvaluationError(f"captioning returned {len(outputs)} rows for {len(inputs.video_ids)} inputs "
                              f"(missing {sorted(lost)[:5]}, unexpected {sorted(extra)[:5]})")
    by_id: dict[str, list[dict]] = defaultdict(list)
    nodes: Counter = Counter()
    for row in outputs:
        by_id[str(row["video_id"])].append(row)
        nodes[str(row["node_id"])] += 1
    predictions: dict[str, str] = {}
    errors = list(inputs.errors)
    for video_id in inputs.video_ids:
        row = by_id[video_id].pop()
        if row["error"]:
            errors.append(_error(video_id, str(row["path"]), str(row["error"]), str(row["stage"])))
        elif video_id in predictions:
            errors.append(_error(video_id, str(row["path"]), "another row of this video ID was captioned first; "
                                 "this one is not scored", "duplicate"))
        else:
            predictions[video_id] = str(row["caption"])
    return GenerationResult(predictions, errors, dict(nodes), seconds)


# --------------------------------------------------------------------------------------------------------
# Scoring and the output files.


@dataclass
class EvaluationResult:
    """What an evaluation produced; `summary` is metrics.json, `format` the text for stdout."""

    output_dir: Path
    report: Any  # stgpt.metrics.MetricsReport
    predictions: dict[str, str]
    references: dict[str, list[str]]
    errors: list[dict[str, str]]
    attribute_accuracy: dict[str, float] | None
    info: dict[str, Any]  # mode, checkpoint, data, generation settings, counts of inputs, nodes, timings
    worst: int = 10

    def worst_videos(self, n: int | None = None) -> list[dict[str, Any]]:
        """The `n` lowest-CIDEr-D videos with their prediction and first reference, lowest first."""
        metric = CIDER_D if CIDER_D in self.report.corpus else next(iter(self.report.corpus))
        return [{"video_id": video_id, metric: score, "prediction": self.predictions[video_id],
                 "reference": self.references[video_id][0]}
                for video_id, score in self.report.worst(self.worst if n is None else n, metric)]

    def summary(self) -> dict[str, Any]:
        report = self.report.to_dict(per_video=False)
        # Scoring's workers, named apart from captioning's "nodes".
        report["metric_workers"], report["metric_node_ids"] = report.pop("num_workers", 1), report.pop("node_ids", [])
        counts = {
            **self.info.get("counts", {}),
            "predictions": len(self.predictions),
            "errors": len(self.errors),
            "references": len(self.references),
            "scored": report["num_scored"],
            "predictions_without_reference": len(report["predictions_without_reference"]),
            "references_without_prediction": len(report["references_without_prediction"]),
        }
        return {**{k: v for k, v in self.info.items() if k != "counts"}, "counts": counts, **report,
                "attribute_accuracy": self.attribute_accuracy, "worst": self.worst_videos()}

    def format(self) -> str:
        """The metrics table, counts, attribute accuracy and the worst videos, for people."""
        info = self.info
        lines = []
        if info.get("untrained"):
            lines += [f"WARNING: {UNTRAINED_NOTE}", ""]
        if info["mode"] == "generate":
            nodes = info.get("nodes", {})
            lines += [f"Captioned {info['data']} with {info['checkpoint']}: {info['counts']['inputs']} rows -> "
                      f"{len(self.predictions)} captions, {len(self.errors)} errors, in "
                      f"{info['seconds']['generate']:.1f} s on {len(nodes)} node(s)", ""]
        lines.append(self.report.format_table(worst=0))
        if self.attribute_accuracy:
            acc = self.attribute_accuracy
            lines += ["", f"Attribute accuracy on {int(acc['num_videos'])} synthetic videos: " + ", ".join(
                f"{key} {100 * acc[key]:.1f}%" for key in ("colour", "shape", "motion", "object", "video"))]
        if info.get("per_motion"):
            lines.append("Motion per direction (one-object videos): " + ", ".join(
                f"{m} {100 * v:.0f}%" for m, v in info["per_motion"].items()))
        if info.get("time_reversal"):
            rev = info["time_reversal"]
            lines.append(f"Time reversal (the videos played backwards, against the flipped motions): motion "
                         f"{100 * rev['motion']:.1f}%, colour {100 * rev['colour']:.1f}%, shape "
                         f"{100 * rev['shape']:.1f}%; the caption's motion flips with the video for "
                         f"{100 * rev['flips_with_video']:.1f}% of one-object videos")
        worst = self.worst_videos()
        if worst:
            metric = next(k for k in worst[0] if k not in ("video_id", "prediction", "reference"))
            lines += ["", f"Worst {len(worst)} videos by {metric} (x100):"]
            for item in worst:
                lines += [f"  {100 * item[metric]:7.2f}  {item['video_id']}",
                          f"           predicted: {item['prediction']!r}",
                          f"           reference: {item['reference']!r}"]
        if self.errors:
            stages = Counter(e["stage"] for e in self.errors)
            lines += ["", f"{len(self.errors)} video(s) without a caption ("
                      + ", ".join(f"{n} {stage}" for stage, n in sorted(stages.items()))
                      + f"): {self.output_dir / ERRORS_FILE}"]
        lines += ["", f"Outputs: {self.output_dir}"]
        return "\n".join(lines)


def evaluate(inputs: EvalInput, checkpoint: str, cfg: Config, output: str | os.PathLike,
             untrained: bool = False, log: Callable[[str], None] = print) -> EvaluationResult:
    """Generate captions for `inputs` on Ray, save them and the errors, score them, write the outputs."""
    check_metrics(cfg)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    generated = caption_dataset(inputs, checkpoint, cfg, log)
    # Captions and errors are on disk before scoring starts, so a scoring failure loses no generation work.
    save_predictions(generated.predictions, out / GENERATED_CAPTIONS)
    _write_lines(out / ERRORS_FILE, generated.errors)
    if not generated.predictions:
        raise EvaluationError(f"no video could be captioned ({len(generated.errors)} errors): see "
                              f"{out / ERRORS_FILE}")
    info = {
        "mode": "generate", "checkpoint": checkpoint, "untrained": untrained, "data": inputs.source,
        "data_kind": inputs.kind, "generation": dataclasses.asdict(cfg.generation),
        "evaluate": dataclasses.asdict(cfg.evaluate),
        "counts": {"inputs": len(inputs.video_ids), "known_errors": len(inputs.errors)},
        "nodes": generated.nodes, "seconds": {"generate": round(generated.seconds, 3)},
    }
    if inputs.attributes:
        info["per_motion"] = motion_accuracy(generated.predictions, inputs.attributes)
    if cfg.evaluate.time_reversal and inputs.attributes:
        backwards = caption_dataset(inputs, checkpoint, cfg, log, reverse_time=True)
        save_predictions(backwards.predictions, out / REVERSED_CAPTIONS)
        info["time_reversal"] = time_reversal_check(generated.predictions, backwards.predictions, inputs.attributes)
        info["seconds"]["generate_reversed"] = round(backwards.seconds, 3)
    return _score_and_write(out, generated.predictions, inputs.references, inputs.attributes, generated.errors,
                            info, cfg)


def score_files(predictions: str | os.PathLike, references: str | os.PathLike, cfg: Config,
                output: str | os.PathLike) -> EvaluationResult:
    """Score-only: a COCO-result prediction file against VATEX or COCO-format references."""
    check_metrics(cfg)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    predicted = load_predictions(predictions)
    refs, attributes = _read_references(references)
    info = {"mode": "score", "predictions_file": os.fspath(predictions), "references_file": os.fspath(references),
            "counts": {"inputs": len(predicted)}, "seconds": {}}
    return _score_and_write(out, predicted, refs, attributes, [], info, cfg)


def _score_and_write(out: Path, predictions: dict[str, str], references: dict[str, list[str]],
                     attributes: dict[str, dict] | None, errors: list[dict], info: dict[str, Any],
                     cfg: Config) -> EvaluationResult:
    start = time.perf_counter()
    try:
        report = score_captions(predictions, references, num_workers=cfg.evaluate.metric_workers,
                                metrics=cfg.evaluate.metrics or METRICS)
    except ValueError as exc:  # e.g. no video has both a prediction and references
        raise EvaluationError(f"cannot score: {exc}") from None
    info["seconds"]["score"] = round(time.perf_counter() - start, 3)
    accuracy = None
    if attributes and any(video_id in attributes for video_id in predictions):
        accuracy = synthetic.attribute_accuracy(predictions, attributes)
    result = EvaluationResult(out, report, predictions, references, errors, accuracy, info, cfg.evaluate.worst)
    _write_lines(out / PER_VIDEO_FILE, [
        {"video_id": video_id, **scores, "prediction": predictions[video_id], "reference": references[video_id][0]}
        for video_id, scores in report.per_video.items()])
    storage.write_text(out / METRICS_FILE, json.dumps(result.summary(), indent=2, ensure_ascii=False) + "\n")
    return result


def time_reversal_check(forward: Mapping[str, str], backward: Mapping[str, str],
                        attributes: Mapping[str, Mapping]) -> dict[str, float]:
    """How the captions of videos played backwards score against the flipped motions (left <-> right, up <->
    down, grow <-> shrink): a model that reads the frames in order gets motion right both ways; one that reads
    the motion from a single frame, or guesses it, does not. `flips_with_video`: of one-object videos, how often
    the forward caption names the true motion and the backward one its opposite."""
    flipped = {video_id: synthetic.flip_motion(value) for video_id, value in attributes.items()}
    scored = [v for v in backward if v in attributes]
    if not scored:
        return {}
    accuracy = synthetic.attribute_accuracy({v: backward[v] for v in scored}, flipped)
    single = [v for v in scored if v in forward and len(attributes[v]["objects"]) == 1]
    flips = 0
    for video_id in single:
        truth = attributes[video_id]["objects"][0]["motion"]
        named = [synthetic.parse_caption(text)["objects"] for text in (forward[video_id], backward[video_id])]
        flips += bool(all(named) and named[0][0]["motion"] == truth
                      and named[1][0]["motion"] == synthetic.OPPOSITE_MOTION[truth])
    return {"motion": accuracy["motion"], "colour": accuracy["colour"], "shape": accuracy["shape"],
            "video": accuracy["video"], "flips_with_video": flips / len(single) if single else float("nan"),
            "num_videos": float(len(scored))}


def motion_accuracy(predictions: Mapping[str, str], attributes: Mapping[str, Mapping]) -> dict[str, float]:
    """Per true motion, the fraction of one-object videos whose caption names it: 'every direction'."""
    right: Counter = Counter()
    seen: Counter = Counter()
    for video_id, text in predictions.items():
        objects = attributes[video_id]["objects"] if video_id in attributes else []
        if len(objects) == 1:
            motion = objects[0]["motion"]
            named = synthetic.parse_caption(text)["objects"]
            seen[motion] += 1
            right[motion] += bool(named and named[0]["motion"] == motion)
    return {m: right[m] / seen[m] for m in synthetic.MOTIONS if seen[m]}


def _is_glob(text: str) -> bool:
    """Whether --data names shard files by a glob pattern (as `glob.glob` reads one)."""
    return any(char in text for char in "*?[")


def check_metrics(cfg: Config) -> None:
    """Refuse unknown metric names before any work, not after an hour of generation."""
    unknown = [m for m in cfg.evaluate.metrics or () if m not in METRICS]
    if unknown or cfg.evaluate.metrics == []:
        raise ConfigError(f"evaluate.metrics: unknown or no metrics {unknown}; choose from {list(METRICS)}")


def _write_lines(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    storage.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------------------------------------
# Defaults: which checkpoint, which data.


def resolve_input(data: str | os.PathLike | None, cfg: Config, videos: str | os.PathLike | None = None,
                  references: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> EvalInput:
    """`--data` as the job reads it: a shard folder, glob or file; an annotation file (with `videos`); or, with
    none, the config's shards, or for a config without annotations the synthetic split (made if missing)."""
    split = cfg.evaluate.split
    if data is None:
        if cfg.data.annotations is None:
            return synthetic_input(cfg, log)
        data = cfg.data.shards
    text = os.fspath(data)
    if _is_glob(text) or text.endswith(".parquet") or storage.is_dir(text):
        return shard_input(text, split, references)
    videos = videos or cfg.data.videos
    if not videos:
        raise FileNotFoundError(f"{text} is an annotation file: --videos (or data.videos) must name the folder "
                                "of its videos")
    return video_input(text, videos, references)


def synthetic_input(cfg: Config, log: Callable[[str], None] = print) -> EvalInput:
    """The synthetic dataset's `evaluate.split`, made and preprocessed into `data.shards` if not there yet.

    References (with attributes) come from the split's annotation file. If the shard folder holds that split
    made with other settings, the raw videos are captioned instead (shards are never overwritten here).
    """
    data, split = cfg.data, cfg.evaluate.split
    dataset = synthetic.from_config(data)
    if split not in dataset.annotation_paths:
        raise FileNotFoundError(f"the synthetic dataset has no split {split!r}; it has {dataset.splits}")
    annotations = str(dataset.annotation_paths[split])
    shards = storage.absolute(data.shards)  # the same on every worker
    try:
        preprocess([SplitInput(split, annotations, str(dataset.video_dir))], shards, cfg, progress=False, log=log)
    except PreprocessError as exc:
        log(f"not using the shards: {exc}\ncaptioning the raw videos of {annotations} instead")
        return video_input(annotations, dataset.video_dir)
    return shard_input(shards, split, references=annotations)
