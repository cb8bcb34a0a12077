"""Offline captioning on Ray Data, shared by evaluation and batch captioning: CPU stages that decode, then a pool
of model actors that only run the model.

    rows -> map_batches(decode_videos | decode_shard_rows): CPU tasks -> map_batches(ModelActor): actor pool

Every input row leaves the decode stage as `window` rows (model-sized uint8 frames) and, for videos, an `end`
row counting them, or as one `error` row saying why; the actors caption the window rows and pass the others on,
so a bad video costs its own row and the caller can account for every input. Videos are decoded in an isolated
child process (`stgpt.isolation`): a crash, a hang or a bomb is that video's error.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import ray

# Light imports only (no torch, no transformers): the decode stages run in fresh Ray workers, which would
# otherwise spend seconds importing them. The model actor imports torch in its constructor.
from stgpt import storage
from stgpt.config import GenerationConfig, VideoConfig
from stgpt.isolation import read_windows_isolated, sample_video_isolated
from stgpt.resources import ResourceError
from stgpt.shards import FRAME_COLUMNS, row_clip, row_error
from stgpt.video import SampledWindow, VideoDecodeError

ROW_KINDS = ("window", "end", "error")
DECODE_CPUS = 1.0  # what one decode task holds; the model pool always leaves this much free
PASSED_ON = ("video_id", "path", "part", "window_index", "window_start_s", "window_end_s", "num_source_frames")


def row(video_id: str, path: str, part: int, kind: str, window: int = 0, start: float = 0.0, end: float = 0.0,
        frames: bytes = b"", indices: Sequence[int] = (), num_source: int = 0, error: str = "") -> dict[str, list]:
    """One row of the stages' output (a batch of one): `kind` is one of ROW_KINDS; an error's `stage` says
    where it arose (decode here, generate in the model actor)."""
    return {"video_id": [video_id], "path": [path], "part": [part], "kind": [kind], "window_index": [window],
            "window_start_s": [float(start)], "window_end_s": [float(end)], "frames": [frames],
            "frame_indices": [list(indices)], "num_source_frames": [int(num_source)], "error": [error],
            "stage": ["decode" if kind == "error" else ""]}


def decode_videos(batch: dict[str, np.ndarray], video: VideoConfig, window_s: float | None = None,
                  stride_s: float | None = None) -> Iterator[dict[str, list]]:
    """Ray Data stage over `video_id, path, part` rows: each video's windows (the whole video when `window_s` is
    None), one row each as they are read, then an `end` row; or one `error` row."""
    for video_id, path, part in zip(batch["video_id"], batch["path"], batch["part"]):
        video_id, path, part = str(video_id), str(path), int(part)
        count = 0
        try:
            source = storage.video_source(path)
            if window_s is None:
                sampled = sample_video_isolated(source, video, name=path)
                windows: Any = [SampledWindow(0, 0.0, sampled.num_source_frames / sampled.fps if sampled.fps else 0.0,
                                              sampled)]
            else:
                windows = read_windows_isolated(source, video, window_s, stride_s, name=path)
            for window in windows:
                frames = centre_crop(window.video.frames, video.crop_size)
                yield row(video_id, path, part, "window", window=window.index, start=window.start_s,
                          end=window.end_s, frames=frames.tobytes(), indices=window.video.indices.tolist(),
                          num_source=window.video.num_source_frames)
                count += 1
        except (VideoDecodeError, OSError) as exc:
            yield row(video_id, path, part, "error", error=getattr(exc, "reason", None) or str(exc))
            continue
        yield row(video_id, path, part, "end", window=count)


def decode_shard_rows(batch: dict[str, np.ndarray], video: VideoConfig) -> Iterator[dict[str, list]]:
    """Ray Data stage over shard rows (`FRAME_COLUMNS` + `path`): each row's frames as one `window` row, or an
    `error` row for frames that do not decode or are not `video.num_frames`."""
    for i, video_id in enumerate(batch["video_id"]):
        video_id, path = str(video_id), str(batch["path"][i])
        try:
            clip = row_clip({key: batch[key][i] for key in FRAME_COLUMNS}, video)
        except Exception as exc:  # ShardRowError, or anything odd in one row: its error, not the job's
            yield row(video_id, path, 0, "error", error=row_error(exc))
            continue
        yield row(video_id, path, 0, "window", frames=np.ascontiguousarray(clip).tobytes(),
                  num_source=video.num_frames)


def centre_crop(frames: np.ndarray, crop: int) -> np.ndarray:
    """The centre `crop` square of frames already scaled to their short side (transforms.resize_and_crop's rule)."""
    height, width = frames.shape[1:3]
    if height < crop or width < crop:
        from stgpt.transforms import (
            resize_and_crop,  # torch: only for frames smaller than the crop (rare)
        )

        return resize_and_crop(frames, crop, crop).numpy()
    top, left = (height - crop) // 2, (width - crop) // 2
    return np.ascontiguousarray(frames[:, top:top + crop, left:left + crop])


class ModelActor:
    """Ray Data callable class: loads the checkpoint once, captions the window rows of each batch, passes the
    others through. It never decodes: the GPU (or its CPUs) only runs the model."""

    def __init__(self, checkpoint: str, generation: dict[str, Any], use_gpu: bool = False,
                 precision: str = "fp32", num_threads: int = 1):
        import torch  # in the actor only: the decode tasks never import torch or transformers

        from stgpt.inference import Captioner

        torch.set_num_threads(max(1, num_threads))
        self.captioner = Captioner.from_pretrained(checkpoint, use_gpu=use_gpu, precision=precision)
        self.generation = generation
        self.actor = ray.get_runtime_context().get_actor_id() or "local"
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        video = self.captioner.video
        kinds = [str(k) for k in batch["kind"]]
        errors = [str(e) for e in batch["error"]]
        stages = [str(s) for s in batch["stage"]]
        captions = [""] * len(kinds)
        ready = [i for i, kind in enumerate(kinds) if kind == "window"]
        if ready:
            shape = (video.num_frames, video.crop_size, video.crop_size, 3)
            frames = np.stack([np.frombuffer(batch["frames"][i], np.uint8).reshape(shape) for i in ready])
            for i, text in zip(ready, self.captioner.caption_each(frames, **self.generation)):
                if isinstance(text, Exception):
                    kinds[i], stages[i] = "error", "generate"
                    errors[i] = f"generation failed: {type(text).__name__}: {text}"[:500]
                else:
                    captions[i] = text
        out = {key: list(batch[key]) for key in PASSED_ON}
        out["frame_indices"] = [list(map(int, v)) for v in batch["frame_indices"]]
        out.update(kind=kinds, error=errors, stage=stages, caption=captions, actor=[self.actor] * len(kinds),
                   node_id=[self.node_id] * len(kinds))
        return out


def pool_size(num_actors: int, cpus_per_actor: float, log: Callable[[str], None] = print) -> int:
    """As many actors as the cluster's CPUs hold with a decode task's CPUs to spare (GPU actors hold CPUs too).

    The pool starts all its actors first; the read and decode tasks need a CPU of their own, so a pool holding
    every CPU would wait for its input forever (on a 2-core machine, 2 actors of 1 CPU do).
    """
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus - cpus_per_actor < DECODE_CPUS:
        raise ResourceError(f"the cluster has {cpus:g} CPU(s): one model actor of {cpus_per_actor:g} CPU would "
                         "leave none to read and decode videos with; lower cpus_per_actor")
    fit = int((cpus - DECODE_CPUS) // cpus_per_actor)
    if num_actors > fit:
        log(f"{num_actors} model actor(s) x {cpus_per_actor:g} CPU would leave no CPU of the cluster's "
            f"{cpus:g} to decode with: using {fit}")
        return fit
    return num_actors


def caption_stages(dataset: ray.data.Dataset, decode: Callable, decode_kwargs: dict[str, Any], checkpoint: str,
                   generation: GenerationConfig, pool: Any, num_actors: int) -> ray.data.Dataset:
    """`dataset` through a decode stage and the model pool. `pool` is the job's section (`evaluate` or `caption`:
    batch_size, use_gpu, precision, cpus_per_actor)."""
    # Decoding stays a CPU task stage of its own: Ray Data fuses a task stage into the actor stage after it when
    # their remote args match, and the model actors would then decode. max_retries makes them differ (a decode
    # task lost with its worker is retried; a bad video is already an error row, not a failure).
    dataset = dataset.map_batches(decode, batch_size=1, num_cpus=DECODE_CPUS, max_retries=3, fn_kwargs=decode_kwargs)
    return dataset.map_batches(
        ModelActor, fn_constructor_kwargs={"checkpoint": checkpoint, "generation": generation.generate_kwargs(),
                                           "use_gpu": pool.use_gpu, "precision": pool.precision,
                                           "num_threads": max(1, int(pool.cpus_per_actor))},
        batch_size=pool.batch_size, compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if pool.use_gpu else 0, num_cpus=pool.cpus_per_actor)
