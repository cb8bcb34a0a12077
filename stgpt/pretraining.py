"""The original recipe in miniature: pretrain the encoder and the decoder apart, then caption with both.

SpaceTimeGPT starts from a TimeSformer trained to classify Kinetics-600 videos and from GPT-2 trained to complete
text, and fine-tunes the two end to end with fresh cross-attention. The tiny default does the same with no
downloads, in three Ray Train stages, each a job that resumes and is skipped once its output exists:

1. `encoder`: a tiny `TimesformerForVideoClassification` learns the synthetic videos' attributes: its labels are
   (colour, shape) and (colour, motion) pairs (colours are distinct within a video, so a colour names one
   object), trained per colour present with a softmax over its shapes and one over its motions
   (`attribute_loss`): the stand-in for Kinetics-600. Saved as a Hugging Face checkpoint at `model.encoder`.
2. `decoder`: a tiny `GPT2LMHeadModel` learns the caption text as a language model: the stand-in for `gpt2`.
   Saved with its tokenizer at `model.decoder`.
3. `caption`: `model.kind: pretrained` with those two local checkpoints, the code path the VATEX recipe takes with
   hub ids, fine-tuned by `stgpt.training.run_training` (encoder at `train.encoder_lr_scale` of the learning rate).

The proofs that the result reads time live in `stgpt.synthetic`: `reverse_time` with `flip_motion` (a video
played backwards must be captioned with the opposite motion; `stgpt.evaluation` reports it) and the
single-frame control's `first_frame_only` (`data.synthetic_single_frame`: eight copies of frame 0 must leave
motion at chance).
Measurements behind the recipe: benchmarks/RESULTS.md ("pretraining stages").
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionOptions, ExecutionResources
from ray.train.torch import TorchTrainer
from transformers import (AutoModelForCausalLM, AutoModelForVideoClassification, GPT2Config, GPT2LMHeadModel,
                          PreTrainedTokenizerBase, TimesformerConfig, TimesformerForVideoClassification, set_seed)

from stgpt import storage
from stgpt.config import Config, VideoConfig
from stgpt.device import autocast, resolve_precision
from stgpt.model import load_tokenizer, train_tokenizer, unwrap
from stgpt.shard_data import read_captions, shard_dataset, split_paths
from stgpt.shards import row_clip, row_error
from stgpt.synthetic import COLOURS, MOTIONS, SHAPES, SyntheticDataset, flip_motion, reverse_time
from stgpt.train_log import EpochProgress
from stgpt.training import (Progress, load_training_state, make_optimizer, make_scheduler, save_training_state,
                            steps_per_epoch)
from stgpt.transforms import to_pixel_values

# --------------------------------------------------------------------------------------------------------
# Labels and transforms

LABELS: tuple[str, ...] = (*(f"{c} {s}" for c in COLOURS for s in SHAPES),
                           *(f"{c} {m}" for c in COLOURS for m in MOTIONS))
LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}


NUM_COLOURS = len(COLOURS)


def label_vector(objects: Sequence[Mapping[str, str]]) -> np.ndarray:
    """A video's targets, 3 x len(COLOURS) integers: per colour whether an object has it, then that object's
    shape index and motion index (-100 where no object has the colour). What `attribute_loss` takes."""
    target = np.full(3 * NUM_COLOURS, -100, np.int64)
    target[:NUM_COLOURS] = 0
    colours = list(COLOURS)
    for obj in objects:
        c = colours.index(obj["colour"])
        target[c], target[NUM_COLOURS + c] = 1, SHAPES.index(obj["shape"])
        target[2 * NUM_COLOURS + c] = MOTIONS.index(obj["motion"])
    return target


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The classifier's loss over `LABELS` logits: for each colour in the video, cross-entropy of its shape and
    of its motion among that colour's pairs; for every colour, whether it is there (binary, from the log-sum-exp
    of its shape logits). Per-object softmaxes train far faster than one sigmoid per pair (RESULTS.md)."""
    functional = torch.nn.functional
    logits = logits.float()  # bf16 under autocast: the softmaxes in fp32
    batch = logits.shape[0]
    shapes = logits[:, : NUM_COLOURS * len(SHAPES)].reshape(batch, NUM_COLOURS, len(SHAPES))
    motions = logits[:, NUM_COLOURS * len(SHAPES):].reshape(batch, NUM_COLOURS, len(MOTIONS))
    present = targets[:, :NUM_COLOURS].float()
    loss = functional.binary_cross_entropy_with_logits(shapes.logsumexp(-1), present)
    shape_targets, motion_targets = targets[:, NUM_COLOURS: 2 * NUM_COLOURS], targets[:, 2 * NUM_COLOURS:]
    if (shape_targets >= 0).any():
        loss = loss + functional.cross_entropy(shapes.reshape(-1, len(SHAPES)), shape_targets.reshape(-1),
                                               ignore_index=-100)
        loss = loss + functional.cross_entropy(motions.reshape(-1, len(MOTIONS)), motion_targets.reshape(-1),
                                               ignore_index=-100)
    return loss


def read_labels(logits: np.ndarray | torch.Tensor, num_objects: int) -> list[dict[str, str]]:
    """The `num_objects` objects a classifier's logits name: the colours with the strongest pairs, each with its
    best shape and best motion."""
    logits = np.asarray(logits, dtype=np.float64)
    colours = list(COLOURS)
    strength = [np.logaddexp.reduce([logits[LABEL_INDEX[f"{c} {s}"]] for s in SHAPES]) for c in colours]  # as trained
    chosen = [colours[i] for i in np.argsort(strength)[::-1][:num_objects]]
    return [{"colour": c, "shape": max(SHAPES, key=lambda s: logits[LABEL_INDEX[f"{c} {s}"]]),
             "motion": max(MOTIONS, key=lambda m: logits[LABEL_INDEX[f"{c} {m}"]])} for c in chosen]


# --------------------------------------------------------------------------------------------------------
# The two models to pretrain


def build_encoder_classifier(cfg: Config, seed: int = 0) -> TimesformerForVideoClassification:
    """A random-init tiny TimeSformer with a multi-label head over `LABELS` (sizes from `cfg.model`, `cfg.video`).

    Its position and time embeddings start at `pretrain.embedding_std` rather than transformers' (0.02 and
    zeros): with time embeddings at zero the temporal attention cannot tell frames apart at the start, and the
    classifier learned the direction of travel slowly or not at all (RESULTS.md).
    """
    m, v = cfg.model, cfg.video
    config = TimesformerConfig(
        image_size=v.crop_size, patch_size=m.patch_size, num_frames=v.num_frames, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, intermediate_size=4 * m.hidden_size,
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=dict(LABEL_INDEX),
        initializer_range=m.initializer_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TimesformerForVideoClassification(config)
        std = cfg.pretrain.embedding_std
        if std > 0:
            embeddings = model.timesformer.embeddings
            with torch.no_grad():
                torch.nn.init.trunc_normal_(embeddings.position_embeddings, std=std, a=-2 * std, b=2 * std)
                torch.nn.init.trunc_normal_(embeddings.time_embeddings, std=std, a=-2 * std, b=2 * std)
    return model


def build_decoder_lm(cfg: Config, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> GPT2LMHeadModel:
    """A random-init tiny GPT-2 language model (no cross-attention yet: captioning adds it, as for `gpt2`)."""
    m = cfg.model
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=m.initializer_range,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def lm_batch(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int = 64
             ) -> dict[str, torch.Tensor]:
    """Language-model inputs for captions as captioning will see them: bos, the caption, eos; loss on all but bos
    and padding (bos is what the captioner's decoder starts from)."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length - 2)["input_ids"]
    width = max(len(x) for x in ids) + 2
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        sequence = [tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id]
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, 1: len(sequence)] = torch.tensor(sequence[1:])
        mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------
# The stages as Ray Train jobs

STAGES: tuple[str, ...] = ("encoder", "decoder")


@dataclasses.dataclass
class StageResult:
    stage: str
    path: Path  # the exported Hugging Face checkpoint
    skipped: bool  # it was there already
    seconds: float
    metrics: dict[str, Any]


def stage_seconds(stages: Mapping[str, StageResult], caption_seconds: float) -> dict[str, float]:
    """Each stage's training time, then captioning's: a stage skipped as done shows the time its own run took."""
    return {**{name: round(stage.metrics.get("seconds", stage.seconds), 1) for name, stage in stages.items()},
            "caption": round(caption_seconds, 1)}


def is_done(path: str | Path) -> bool:
    """A stage is done when its exported checkpoint is complete (`export_checkpoint` renames it into place)."""
    return (Path(path) / "config.json").is_file()


def stage_paths(cfg: Config) -> dict[str, Path]:
    """Where each stage exports its checkpoint: the encoder and decoder that captioning's model.kind=pretrained
    reads, so the two settings cannot disagree."""
    return {"encoder": Path(cfg.model.encoder), "decoder": Path(cfg.model.decoder)}


def run_pretraining(cfg: Config, log: Callable[[str], None] = print) -> tuple[Config, dict[str, StageResult]]:
    """Run the pretraining stages whose checkpoint is missing (`pretrain.enabled`), on the connected Ray cluster;
    return the config for captioning (model.encoder and model.decoder as absolute paths, which Ray's workers
    need) and what each stage did.

    Each stage is a TorchTrainer job under `<pretrain.output_dir>/ray-<stage>`: an interrupted stage resumes from its
    last epoch's checkpoint, a finished one is skipped. The encoder stage needs the synthetic dataset's
    attributes (`data.root`), which the shards do not carry.
    """
    if not cfg.pretrain.enabled:
        return cfg, {}
    if cfg.model.kind != "pretrained":  # e.g. model.kind=tiny: a random-init captioner, nothing to pretrain
        log(f"model.kind={cfg.model.kind}: no pretraining stages (they make model.kind=pretrained's parts)")
        return cfg, {}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, encoder=str(Path(cfg.model.encoder).resolve()), decoder=str(Path(cfg.model.decoder).resolve())))
    results = {}
    train_paths = split_paths(cfg, "train")
    val_paths = split_paths(cfg, "validation", required=False)
    for stage, path in stage_paths(cfg).items():
        if is_done(path):
            log(f"pretraining stage {stage}: done already ({path})")
            results[stage] = StageResult(stage, path, True, 0.0, _read_json(path / STAGE_SUMMARY))
            continue
        log(f"pretraining stage {stage} -> {path}")
        start = time.perf_counter()
        if stage == "encoder":
            metrics = _run_stage(cfg, stage, path, _encoder_data(cfg, train_paths, val_paths), log)
        else:
            metrics = _run_stage(cfg, stage, path, _decoder_data(cfg, read_captions(train_paths),
                                                                 read_captions(val_paths) if val_paths else {}), log)
        seconds = time.perf_counter() - start
        metrics["seconds"] = round(seconds, 1)
        (path / STAGE_SUMMARY).write_text(json.dumps(metrics, indent=1) + "\n")
        log(f"pretraining stage {stage}: {seconds:.0f} s, " + ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(("train_", "val_"))))
        results[stage] = StageResult(stage, path, False, seconds, metrics)
    return cfg, results


RUN_PREFIX = "ray-"  # a stage's Ray run folder is <pretrain.output_dir>/ray-<stage>, apart from its export
STAGE_SUMMARY = "stage.json"  # the stage's last metrics and time, beside its exported checkpoint


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _encoder_data(cfg: Config, train_paths: Sequence[str], val_paths: Sequence[str]) -> dict[str, Any]:
    dataset = SyntheticDataset.from_root(cfg.data.root)
    objects = {}
    for split in ("train", "validation"):
        if split in dataset.splits:
            objects.update({v: a["objects"] for v, a in dataset.attributes(split).items()})
    datasets = {"train": shard_dataset(train_paths)}
    if val_paths:
        datasets["validation"] = shard_dataset(val_paths)
    num = datasets["train"].count()
    return {"datasets": datasets, "num_train": num, "objects": objects}


def _decoder_data(cfg: Config, train: Mapping[str, list[str]], validation: Mapping[str, list[str]]
                  ) -> dict[str, Any]:
    texts = [c for captions in train.values() for c in captions]
    datasets = {"train": ray.data.from_items([{"text": c} for c in texts])}
    val = [c for captions in validation.values() for c in captions]
    if val:
        datasets["validation"] = ray.data.from_items([{"text": c} for c in val])
    tokenizer_dir = Path(cfg.pretrain.output_dir).resolve() / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():  # trained once: a resumed stage keeps its vocabulary
        with storage.replacing(tokenizer_dir) as temporary:
            train_tokenizer(texts, cfg.model.vocab_size, out_dir=temporary)
    files = {p.name: p.read_text(encoding="utf-8") for p in tokenizer_dir.iterdir() if p.is_file()}
    return {"datasets": datasets, "num_train": len(texts), "tokenizer_files": files}


def _run_stage(cfg: Config, stage: str, export_to: Path, data: dict[str, Any],
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from stgpt.trainer import export_checkpoint  # here: stgpt.trainer imports this module

    t = cfg.train
    root = Path(cfg.pretrain.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    datasets = data.pop("datasets")
    # Ray Data within cluster.data_cpus, the CPUs the fit check keeps beside the workers (as run_training does)
    data_limits = ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.cluster.data_cpus))
    trainer = TorchTrainer(
        _stage_func, dataset_config=ray.train.DataConfig(execution_options=data_limits),
        train_loop_config={"cfg": cfg, "stage": stage, "has_validation": "validation" in datasets,
                           "progress_file": str(root / f"{stage}.jsonl"), **data},  # absolute: workers run elsewhere
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker,
                                                                     **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(name=f"{RUN_PREFIX}{stage}", storage_path=str(root),
                                       failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        datasets=datasets,
    )
    epochs = _stage_settings(cfg, stage)[0]
    with EpochProgress(root / f"{stage}.jsonl", epochs, lambda line: log(f"[{stage}] {line}")):
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"pretraining stage {stage} ended without a checkpoint")
    export_to.parent.mkdir(parents=True, exist_ok=True)
    export_checkpoint(result.checkpoint, export_to.resolve())
    return {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}


def _stage_settings(cfg: Config, stage: str) -> tuple[int, float, int]:
    p = cfg.pretrain
    if stage == "encoder":
        return p.encoder_epochs, p.encoder_lr, p.encoder_batch_size
    return p.decoder_epochs, p.decoder_lr, p.decoder_batch_size


def _stage_func(config: dict) -> None:
    """Ray Train's per-worker loop of a pretraining stage: epochs over the stage's dataset, a checkpoint (the
    Hugging Face model plus the optimiser state) after each, resuming from the latest one."""

    cfg: Config = config["cfg"]
    stage, t = config["stage"], cfg.train
    epochs, lr, batch_size = _stage_settings(cfg, stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    precision = resolve_precision(t.precision, device)  # as captioning trains
    set_seed(t.seed)
    tokenizer = None
    if stage == "decoder":
        with tempfile.TemporaryDirectory() as folder:
            for name, text in config["tokenizer_files"].items():
                Path(folder, name).write_text(text, encoding="utf-8")
            tokenizer = load_tokenizer(folder)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        if resume_dir:
            auto = AutoModelForVideoClassification if stage == "encoder" else AutoModelForCausalLM
            model = auto.from_pretrained(resume_dir)
        else:
            model = build_encoder_classifier(cfg, t.seed) if stage == "encoder" else build_decoder_lm(cfg, tokenizer,
                                                                                                     t.seed)
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if world > 1 else None)
        raw = unwrap(model)
        optimizer = make_optimizer(raw, lr, t.weight_decay)
        per_epoch = steps_per_epoch(config["num_train"], world, batch_size, 1)
        scheduler = make_scheduler(optimizer, per_epoch * epochs, t.warmup_ratio)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        progress = load_training_state(resume_dir, optimizer, scheduler, scaler) if resume_dir else Progress()

    def collate_for(epoch: int, reverse: float = 0.0) -> Callable:
        if stage == "encoder":
            return functools.partial(_video_batch, objects=config["objects"], video=cfg.video, reverse=reverse,
                                     seed=t.seed, epoch=epoch)
        return functools.partial(_text_batch, tokenizer=tokenizer)

    collate = collate_for(-1)  # validation: every clip forwards
    train_data = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("validation") if config["has_validation"] else None
    started_epoch = progress.epoch  # where this attempt began: > 0 after a resume
    for epoch in range(progress.epoch, epochs):
        model.train()
        start, totals = time.perf_counter(), torch.zeros(3, dtype=torch.float64)  # loss sum, batches, samples
        train_collate = collate_for(epoch, cfg.pretrain.reverse_augment)
        for batch in train_data.iter_torch_batches(batch_size=batch_size, prefetch_batches=2, collate_fn=train_collate,
                                                   local_shuffle_buffer_size=t.shuffle_buffer or None,
                                                   local_shuffle_seed=t.seed * 100_003 + epoch * 1_009 + rank):
            num_ok = batch.pop("num_ok")
            batch.pop("objects", None)
            with autocast(device, precision):
                loss = _loss(model, batch, stage, device)
            (loss * (1.0 if num_ok else 0.0)).backward()  # an all-bad batch still runs backward (DDP), weight 0
            torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            totals += torch.tensor([loss.item() * bool(num_ok), bool(num_ok), num_ok], dtype=torch.float64)
        totals = _all_reduce(totals, world)
        seconds = time.perf_counter() - start
        metrics = {"stage": stage, "epoch": epoch, "started_epoch": started_epoch, "step": progress.step,
                   "lr": scheduler.get_last_lr()[0], "train_loss": float(totals[0] / max(totals[1], 1)),
                   "samples": int(totals[2]), "epoch_seconds": seconds, "samples_per_s": float(totals[2]) / seconds}
        if val_data is not None:
            with autocast(device, precision):
                metrics.update(_validate(model, raw, val_data, collate, stage, device, world, batch_size))
        progress = Progress(epoch + 1, 0, progress.step)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                raw.save_pretrained(folder)
                if tokenizer is not None:
                    tokenizer.save_pretrained(folder)
                save_training_state(folder, optimizer, scheduler, scaler, progress)
                with open(config["progress_file"], "a") as lines:
                    lines.write(json.dumps(metrics) + "\n")  # the driver shows it (EpochProgress)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank == 0 else None)


@torch.no_grad()
def _validate(model, raw, data, collate, stage: str, device, world: int, batch_size: int) -> dict[str, float]:
    """Validation loss, and for the encoder how often it names each object's colour, shape and motion."""
    model.eval()
    totals = torch.zeros(6, dtype=torch.float64)  # loss sum, batches, objects, colour, shape, motion hits
    for batch in data.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
        if not batch.pop("num_ok"):
            continue
        objects = batch.pop("objects", None)
        keep = ("pixel_values",) if stage == "encoder" else tuple(batch)  # the encoder's loss is attribute_loss
        output = raw(**{k: batch[k].to(device) for k in keep})
        totals[0] += _loss(raw, batch, stage, device, output).item()
        totals[1] += 1
        if stage == "encoder":
            for logits, truth in zip(output.logits.float().cpu(), objects):
                named = {o["colour"]: o for o in read_labels(logits, len(truth))}
                for true in truth:
                    guess = named.get(true["colour"])
                    totals[2] += 1
                    totals[3:] += torch.tensor([guess is not None] + [guess is not None and guess[k] == true[k]
                                                                      for k in ("shape", "motion")],
                                               dtype=torch.float64)
    totals = _all_reduce(totals, world)
    model.train()
    out = {"val_loss": float(totals[0] / max(totals[1], 1))}
    if stage == "encoder" and totals[2]:
        out.update({f"val_{k}": float(totals[3 + i] / totals[2]) for i, k in enumerate(("colour", "shape", "motion"))})
    return out


def _loss(model, batch: Mapping[str, torch.Tensor], stage: str, device, output=None) -> torch.Tensor:
    if stage == "decoder":
        return (output if output is not None else model(**{k: v.to(device) for k, v in batch.items()})).loss
    if output is None:
        output = model(pixel_values=batch["pixel_values"].to(device))
    return attribute_loss(output.logits, batch["labels"].to(device))


def _all_reduce(values: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return values
    import torch.distributed as dist

    dist.all_reduce(values)
    return values


def plays_backwards(seed: int, epoch: int, video_id: str, fraction: float) -> bool:
    """Whether the encoder stage shows a video backwards in an epoch (time-reversal augmentation): a pure
    function of (seed, epoch, video ID), like the caption a video gets, so a resumed epoch sees the same."""
    if fraction <= 0:
        return False
    rng = np.random.default_rng([seed, epoch + 1, zlib.crc32(video_id.encode("utf-8")), 13])
    return bool(rng.random() < fraction)


def _video_batch(rows: Mapping[str, Sequence], objects: Mapping[str, list], video: VideoConfig,
                 reverse: float = 0.0, seed: int = 0, epoch: int = 0) -> dict[str, Any]:
    """Shard rows -> pixel values and attribute targets; rows that do not decode, or whose video has no
    recorded attributes, are skipped (a batch with none left is one blank row of weight 0). With `reverse`, that
    fraction of the clips is played backwards with its motions flipped (`plays_backwards`): on a bounded canvas a
    late frame hints at the motion (a left mover ends left), and with time-reversal augmentation that hint points
    both ways, so only the order of the frames tells a direction (RESULTS.md: it is what made the encoder read
    time)."""
    clips, targets, truth = [], [], []
    for i, video_id in enumerate(rows["video_id"]):
        try:
            clip = row_clip({k: rows[k][i] for k in ("frames", "encoding", "height", "width")}, video)
            found = objects[str(video_id)]
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the stage
            print(f"skipping shard row {video_id!r}: {row_error(exc)}", flush=True)
            continue
        if plays_backwards(seed, epoch, str(video_id), reverse):
            clip, found = reverse_time(clip, axis=0), flip_motion({"objects": found})["objects"]
        clips.append(clip)
        targets.append(label_vector(found))
        truth.append(found)
    num_ok = len(clips)
    if not num_ok:
        clips = [np.zeros((video.num_frames, video.crop_size, video.crop_size, 3), np.uint8)]
        targets = [label_vector([])]
    return {"pixel_values": to_pixel_values(torch.from_numpy(np.stack(clips)), video),
            "labels": torch.from_numpy(np.stack(targets)), "num_ok": num_ok, "objects": truth}


def _text_batch(rows: Mapping[str, Sequence], tokenizer) -> dict[str, Any]:
    texts = [str(text) for text in rows["text"] if text and str(text).strip()]
    num_ok = len(texts)
    return {**lm_batch(tokenizer, texts or [""]), "num_ok": num_ok}
