"""Typed configuration shared by every job: YAML files in `configs/` plus `key=value` overrides.

A config file has one section per concern (`video`, `model`, `encoder`, `generation`, `data`, `preprocess`,
`train`, `evaluate`, `serve`, `caption`, `cluster`); each maps onto a dataclass below. Overrides use dotted keys,
and values are parsed as YAML scalars, so `train.lr=1e-4 train.use_gpu=true model.kind=tiny` do what they look
like. An unknown key or a value of the wrong type is an error that names the key, not a silent no-op.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class VideoConfig:
    """Frame sampling and preprocessing; the defaults are `MCG-NJU/videomae-base`'s processor settings."""

    num_frames: int = 8
    short_side: int = 224
    crop_size: int = 224
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    decoder: str = "pyav"  # or "decord" (optional extra; inexact on B-frames, MPEG-1/2, no AV1): see stgpt/video.py
    # What one video may cost to read (hostile input): checked from the header before decoding, while indexing and
    # on every decoded frame; each refusal is a VideoDecodeError naming the limit.
    max_pixels: int = 3840 * 2160  # per frame
    max_aspect_ratio: float = 8.0  # long side over short side
    max_frames: int = 216_000  # an hour at 60 fps
    max_seconds: float = 3600.0  # measured from the frames' timestamps, not the header
    decode_cpu_seconds: float = 60.0
    decode_memory_mb: int = 4096  # address space an isolated decoder process may add (stgpt/isolation.py)
    decode_timeout_s: float = 120.0  # wall clock, isolated decoders only: killed past it


@dataclass
class ModelConfig:
    """Which model to build: `pretrained` (encoder + decoder), `checkpoint` (fine-tuned) or `tiny` (random)."""

    kind: str = "pretrained"
    encoder: str = "facebook/timesformer-base-finetuned-k600"
    decoder: str = "gpt2"
    checkpoint: Optional[str] = None  # hub id or directory, for kind=checkpoint
    tokenizer: Optional[str] = None  # defaults to the decoder's (or the checkpoint's) tokenizer
    # kind=tiny: a random-init model small enough for CPU tests and demos
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    patch_size: int = 16
    vocab_size: int = 512  # of the byte-level BPE tokenizer trained on the dataset's captions
    dropout: float = 0.1  # GPT-2's residual, embedding and attention dropout (TimeSformer's default is 0)
    # std of the random init of weights (transformers' initializer_range, 0.02 by default, sized for 768 wide
    # models); configs/tiny.yaml sets more for its 64 wide one, which learned direction of travel only then
    initializer_range: float = 0.02


@dataclass
class EncoderConfig:
    """How the TimeSformer encoder runs (not what it is: checkpoints are unchanged); see stgpt/encoder.py."""

    attention: str = "sdpa"  # sdpa: PyTorch's fused scaled_dot_product_attention; eager: transformers' matmuls
    channels_last: bool = True  # frames reach the patch convolution as (B, T, H, W, C) in memory
    compile: bool = False  # torch.compile the encoder (worth it on GPUs for long runs; minutes of compiling)

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "eager"):
            raise ConfigError(f"encoder.attention must be sdpa or eager, got {self.attention!r}")


@dataclass
class GenerationConfig:
    """Beam search, as in the original: 8 beams, 30 to 60 new tokens."""

    num_beams: int = 8
    min_new_tokens: int = 30
    max_new_tokens: int = 60
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        """These settings as `generate` keyword arguments (the one translation; checkpoints save the same)."""
        return {"num_beams": self.num_beams, "min_new_tokens": self.min_new_tokens,
                "max_new_tokens": self.max_new_tokens, "length_penalty": self.length_penalty,
                "no_repeat_ngram_size": self.no_repeat_ngram_size, "early_stopping": self.num_beams > 1,
                "do_sample": False}


@dataclass
class DataConfig:
    """Where the data lives. With no annotations given, jobs make and use the synthetic dataset under `root`."""

    root: str = "outputs/data"  # synthetic dataset (videos + annotations)
    shards: str = "outputs/shards"  # Parquet shards written by preprocessing
    annotations: Optional[str] = None
    videos: Optional[str] = None
    synthetic_train: int = 96
    synthetic_validation: int = 24
    synthetic_test: int = 24
    synthetic_seed: int = 0
    synthetic_single_frame: bool = False  # the control: every frame of every video is its frame 0


@dataclass
class PreprocessConfig:
    """jobs/preprocess.py: shard size, the work unit, resources per task, and when too many errors fail a run."""

    rows_per_shard: int = 256  # videos per Parquet file (the last file of a split holds the rest)
    videos_per_task: int = 16  # videos per Ray task; a shard of several tasks is assembled when they finish
    num_cpus_per_task: float = 1.0
    memory_per_task_mb: int = 0  # 0: no reservation
    concurrency: Optional[int] = None  # None: as many tasks as the cluster's CPUs allow
    max_error_rate: float = 0.05
    frame_encoding: str = "jpeg"  # "jpeg" or "raw": see stgpt/preprocessing.py for the measurements
    jpeg_quality: int = 95


@dataclass
class TrainConfig:
    """jobs/train.py: workers and devices, optimisation, checkpoints and faults (see stgpt/training.py)."""

    output_dir: str = "outputs/train"
    num_workers: Union[int, Literal["auto"]] = 2  # auto: as many as the cluster holds beside Ray Data's CPUs
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 8  # per worker
    epochs: int = 10
    max_steps: int = 0  # >0: stop after this many optimiser steps (that epoch still validates and checkpoints)
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto: bf16 on GPUs that support it, else fp16 on CUDA; fp32 on CPU
    seed: int = 0
    all_captions_each_epoch: bool = False  # the original's "every caption, every epoch"
    log_every: int = 10
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val_loss"
    max_failures: int = 1
    val_cider_videos: int = 0  # >0: CIDEr-D by generation on this many validation videos each epoch
    checkpoint_every_steps: int = 0  # >0: also checkpoint mid-epoch every this many optimiser steps (resume point)
    shuffle_buffer: int = 64  # rows each worker shuffles locally (0: stream order); bounded, so memory stays flat
    encoder_lr_scale: float = 1.0  # the encoder's learning rate as a fraction of train.lr (pretrained encoders)
    encoder_freeze_ratio: float = 0.0  # fraction of the steps the encoder does not learn (with encoder_lr_scale)


@dataclass
class PretrainConfig:
    """The tiny recipe's pretraining stages (stgpt/pretraining.py): with `enabled`, jobs/train.py first makes
    `model.encoder` (a video classifier) and `model.decoder` (a language model) where they are missing."""

    enabled: bool = False
    output_dir: str = "outputs/pretrain"  # the stages' Ray Train runs (what resuming reads)
    embedding_std: float = 0.5  # init of the encoder's position and time embeddings (0: transformers' default)
    reverse_augment: float = 0.0  # encoder stage: fraction of clips played backwards, motions flipped
    encoder_epochs: int = 4
    encoder_lr: float = 2e-3
    encoder_batch_size: int = 16  # per worker
    decoder_epochs: int = 2
    decoder_lr: float = 2e-3
    decoder_batch_size: int = 32  # per worker


@dataclass
class EvaluateConfig:
    """jobs/evaluate.py: the pool of captioning actors, the split to caption, and how scoring is reported."""

    output_dir: str = "outputs/eval"
    num_actors: Union[int, Literal["auto"]] = 2  # captioning actors, each loading the checkpoint once (auto: fit)
    use_gpu: bool = False  # one GPU per actor
    cpus_per_actor: float = 1.0
    batch_size: int = 8  # videos per beam search
    metric_workers: int = 2  # Ray actors that score (1: in the driver)
    split: str = "test"  # which split's shards to caption when --data is a shard folder
    precision: str = "fp32"  # fp32 keeps scores independent of the GPU; "auto" is bf16/fp16 on GPUs
    worst: int = 10  # how many of the lowest-CIDEr-D videos to list
    metrics: Optional[list[str]] = None  # None: all of stgpt.metrics.METRICS; e.g. [CIDEr-D, BLEU-4] skips METEOR's JVM
    time_reversal: bool = True  # synthetic data: caption the videos played backwards too, scored on flipped motions


@dataclass
class CaptionConfig:
    """jobs/caption.py: caption every video of a folder, bucket, glob or list; windows for long videos."""

    output_dir: str = "outputs/captions"
    num_actors: int = 2  # model actors (fewer if the cluster must keep a CPU for decoding)
    use_gpu: bool = False  # one GPU per model actor
    cpus_per_actor: float = 1.0
    batch_size: int = 8  # windows per beam search
    precision: str = "fp32"
    window_seconds: Optional[float] = None  # None: one caption per video (the model's training setting)
    window_stride_seconds: Optional[float] = None  # None: window_seconds (windows side by side)
    videos_per_part: int = 64  # videos per output Parquet part: the unit a re-run keeps or redoes


@dataclass
class ServeConfig:
    """A caption replica (stgpt/serving_deployment.py); the serving defaults live here only. Batching, request
    bounds and the timeout may change on running replicas through Serve's `user_config` (LIVE_SETTINGS there)."""

    max_batch_size: int = 8  # requests per batched beam search (@serve.batch)
    batch_wait_timeout_s: float = 0.05  # how long a batch waits to fill
    request_timeout_s: float = 60.0  # slower requests: 504
    max_video_seconds: float = 120.0  # longer uploads: 422
    max_beams: int = 16  # bounds on what a request may ask for
    max_new_tokens_limit: int = 128
    max_upload_mb: int = 50  # larger bodies: 413 (the proxy's guard reads it too, at start)
    decode_threads: int = 2  # per replica: decodes at once, each in its own child process (stgpt/isolation.py)
    auth_token: Optional[str] = None  # bearer token for /caption; None: $STGPT_SERVE_TOKEN if set, else open
    max_ongoing_requests: int = 32  # Serve's per-replica cap unless the deployment options set it; >= 2 batches


@dataclass
class ClusterConfig:
    """How a job fits the cluster it lands on, and when a job that stopped moving gives up (stgpt/resources.py)."""

    address: Optional[str] = None  # the Ray cluster jobs join (RAY_ADDRESS wins); None: a new local Ray
    data_cpus: float = 1.0  # CPUs kept free beside training workers / captioning actors for Ray Data's reads
    autoscaling: Optional[bool] = None  # None: ask Ray whether an autoscaler runs; true/false to say so
    wait_for_nodes_s: float = 900.0  # autoscaling clusters: how long to wait for nodes the job needs
    stall_warn_s: float = 300.0  # nothing finished (step, row, caption) this long: print what is pending
    stall_fail_s: float = 1800.0  # ... this long: fail with that report (0: never)


@dataclass
class Config:
    video: VideoConfig = field(default_factory=VideoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"section {section!r} is not a mapping")
        raw[section][name] = yaml.safe_load(value) if value else None
    return _build(Config, raw, "")


def _build(cls: type, values: Any, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(_join(where, u) for u in unknown)}; "
                          f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, _join(where, name))
        else:
            kwargs[name] = _coerce(value, hint, _join(where, name))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc).split(": expected ", 1)[-1].split(", got ")[0])
        raise ConfigError(f"{where}: expected {' or '.join(errors)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected {' or '.join(repr(a) for a in args)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else list(value)
    if hint is float:
        # YAML 1.1 reads "1e-4" as a string, so numeric strings are accepted for floats
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name
