"""Which checkpoint a job uses: the one named, else training's best, else the one tiny demo checkpoint.

Serving, evaluation, batch captioning and the demo all ask `choose`, so they agree. The demo checkpoint is a
tiny random-init model of configs/tiny.yaml (seed 0) built once under `outputs/demo/untrained`: it lets every job
run end to end before any training, and the jobs say when they use it.
"""
from __future__ import annotations

import copy
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from stgpt.config import CONFIG_DIR, Config, load_config
from stgpt.model import build_model, save_checkpoint
from stgpt.synthetic import plan_dataset

BEST_DIR = "best"  # training exports its best checkpoint to <train.output_dir>/best
DEMO_CHECKPOINT = Path("outputs/demo/untrained")  # relative to the working directory, like every output
DEMO_SEED = 0
UNTRAINED_NOTE = ("UNTRAINED: a tiny random-init model, since there is no trained checkpoint at "
                  "<train.output_dir>/best (run jobs/train.py first); its captions and scores mean nothing")


@dataclass(frozen=True)
class Choice:
    path: str  # an absolute local directory (every node must be able to read it) or a hub id
    untrained: bool  # the tiny demo checkpoint: jobs say so next to their results
    origin: str  # how it was chosen, for the job's log


def best_checkpoint(cfg: Config) -> Path:
    """Where training leaves its best checkpoint."""
    return Path(cfg.train.output_dir) / BEST_DIR


def choose(checkpoint: Optional[str | os.PathLike], cfg: Optional[Config] = None) -> Choice:
    """The checkpoint a job loads: `checkpoint` if given (a directory becomes absolute, else it is a hub id), else
    `<train.output_dir>/best` if training left one, else the demo checkpoint (built from `cfg`, default
    configs/tiny.yaml, if missing)."""
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if path.resolve() == DEMO_CHECKPOINT.resolve():
            return Choice(str(ensure_demo_checkpoint(path, cfg).resolve()), True, "tiny random-init demo")
        if path.exists():
            return Choice(str(path.resolve()), False, "given")
        return Choice(os.fspath(checkpoint), False, "given (hub id)")
    trained = best_checkpoint(cfg or Config())
    if (trained / "config.json").exists():
        return Choice(str(trained.resolve()), False, "trained (default)")
    return Choice(str(ensure_demo_checkpoint(cfg=cfg).resolve()), True, "tiny random-init demo (default)")


def ensure_demo_checkpoint(out_dir: str | os.PathLike = DEMO_CHECKPOINT, cfg: Optional[Config] = None,
                           seed: int = DEMO_SEED) -> Path:
    """A tiny random-init checkpoint (seeded), built once in `out_dir`: the same files on every call and node.

    Its tokenizer is trained on the synthetic dataset's planned captions (no videos rendered); `cfg` (default
    configs/tiny.yaml) gives the tiny sizes and the video settings. Concurrent callers wait on a lock file, and
    the folder appears complete or not at all. Delete it to rebuild after changing the config.
    """
    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        tiny = copy.deepcopy(cfg) if cfg is not None else load_config(CONFIG_DIR / "tiny.yaml")
        tiny.model.kind = "tiny"
        plans = plan_dataset({"train": max(1, tiny.data.synthetic_train)}, seed=tiny.data.synthetic_seed)
        captions = [caption for spec in plans["train"] for caption in spec.captions]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            built = build_model(tiny, captions)
        temporary = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            save_checkpoint(built, temporary)
            os.replace(temporary, out)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return out
