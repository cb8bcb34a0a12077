"""Rehearse the full-scale recipe (`configs/vatex.yaml`) end to end on CPU, with local stand-ins for the hub parts.

    python -m stgpt.rehearsal outputs/rehearsal                    # real sizes: slow on a CPU (see RESULTS.md)
    python -m stgpt.rehearsal outputs/rehearsal-1l --encoder-layers 1 --decoder-layers 1

Each step is the real job, run as users run it (`python jobs/<job>.py --config configs/vatex.yaml ...`), with
only the overrides a CPU and offline parts need: stand-ins from `stgpt.standins` (`model.encoder=DIR
model.decoder=DIR`), CPU, fp32, two training workers, batch 1 and `train.max_steps`. Everything else (8 frames at
224 px, AdamW, the schedule, 8-beam search producing 30 to 60 tokens) is the recipe's.
1. a handful of synthetic 320x240 videos, preprocessed into shards at 224 px (`jobs/preprocess.py`);
2. training with Ray Train, DDP over two workers (`jobs/train.py`), exporting `<out>/train/best`;
3. evaluation of the test split with the recipe's beam search (`jobs/evaluate.py`);
4. the Serve deployment of `configs/serve.yaml` on that checkpoint (`jobs/serve.py`) and one caption request.
With RAY_ADDRESS set, every job joins that cluster; otherwise each starts its own local Ray, as it would alone
(`rehearse(runner=...)` can submit them with `ray job submit` instead, as tests/test_rehearsal.py does).
A step that fails raises `RehearsalError` with the end of its output.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

from stgpt.client import caption
from stgpt.standins import StandIns, write_standins
from stgpt.synthetic import make_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "configs" / "vatex.yaml"
CPU_OVERRIDES = ["train.use_gpu=false", "train.precision=fp32", "train.num_workers=2", "train.cpus_per_worker=1",
                 "train.batch_size=1", "train.log_every=1", "evaluate.use_gpu=false", "evaluate.precision=fp32"]


class RehearsalError(RuntimeError):
    """A step of the rehearsal failed; the message names it and ends with its output."""


@dataclass
class Rehearsal:
    """What the run produced: its folders, each step's seconds and the figures the jobs reported."""

    out: Path
    standins: StandIns
    seconds: dict[str, float] = field(default_factory=dict)
    train_epochs: list[dict] = field(default_factory=list)  # <out>/train/epochs.jsonl
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # <out>/eval/metrics.json
    served: dict[str, Any] = field(default_factory=dict)  # the /caption answer


JobRunner = Callable[[Sequence[str], float], "subprocess.CompletedProcess"]  # (command, timeout) -> finished


def run_locally(command: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a job as `python jobs/<job>.py ...` in the checkout (it joins RAY_ADDRESS's cluster, or starts Ray)."""
    return subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _run(name: str, command: Sequence[str], timeout: float, log: Callable[[str], None], runner: JobRunner) -> str:
    log(f"[{name}] {' '.join(command)}")
    done = runner(list(command), timeout)
    if done.returncode != 0:
        raise RehearsalError(f"{name} exited {done.returncode}:\n{(done.stdout + (done.stderr or ''))[-6000:]}")
    return done.stdout


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_one_request(checkpoint: Path, video: Path, timeout: float, log: Callable[[str], None],
                      env: dict[str, str] | None = None) -> dict:
    """Start jobs/serve.py on `checkpoint`, caption `video` once over HTTP, stop the server (SIGINT: its clean
    shutdown)."""
    port = _free_port()
    command = [sys.executable, "jobs/serve.py", "--checkpoint", str(checkpoint), "--port", str(port),
               "--num-replicas", "1"]
    log(f"[serve] {' '.join(command)}")
    server_log = checkpoint.parent.parent / "serve.log"
    with open(server_log, "w") as output:
        server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while True:
                if server.poll() is not None:
                    raise RehearsalError(f"serve exited {server.returncode}:\n{server_log.read_text()[-6000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RehearsalError(f"serve not healthy after {timeout:.0f} s:\n"
                                         f"{server_log.read_text()[-6000:]}")
                time.sleep(2)
            return caption(video, f"http://127.0.0.1:{port}", timeout_s=max(60.0, deadline - time.monotonic()))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def rehearse(out: str | Path, encoder_layers: int = 12, decoder_layers: int = 12, max_steps: int = 2,
             videos: int = 4, timeout: float = 3600, metrics: Sequence[str] = ("CIDEr-D", "BLEU-4"),
             log: Callable[[str], None] = print, runner: JobRunner = run_locally,
             serve_env: dict[str, str] | None = None) -> Rehearsal:
    """Run the recipe's four jobs end to end under `out` (see the module docstring). `runner` runs the batch
    jobs (default: locally; e.g. `ray job submit` to a cluster), `serve_env` is the server's extra environment."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = "python"
    start = time.perf_counter()
    standins = write_standins(out / "standins", encoder_layers, decoder_layers)
    result = Rehearsal(out, standins, seconds={"standins": time.perf_counter() - start})

    start = time.perf_counter()
    # at least 2 validation videos: Ray splits a split's rows equally over the 2 workers, dropping the remainder
    split_sizes = {"train": videos, "validation": max(2, videos // 2), "test": max(1, videos // 2)}
    dataset = make_synthetic_dataset(out / "videos", split_sizes, size=(320, 240), num_frames=48)
    annotations = [str(dataset.annotation_paths[split]) for split in split_sizes]
    shards = out / "shards"
    _run("preprocess", [py, "jobs/preprocess.py", "--config", str(RECIPE), "--annotations", *annotations,
                        "--videos", str(dataset.video_dir), "--output", str(shards), "--no-progress",
                        "preprocess.rows_per_shard=64", "preprocess.videos_per_task=2"], timeout, log, runner)
    result.seconds["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    train_dir = out / "train"
    _run("train", [py, "jobs/train.py", "--config", str(RECIPE), *standins.overrides(), *CPU_OVERRIDES,
                   f"train.max_steps={max_steps}", f"train.output_dir={train_dir}", f"data.shards={shards}"],
         timeout, log, runner)
    result.seconds["train"] = time.perf_counter() - start
    progress = train_dir / "epochs.jsonl"
    result.train_epochs = [json.loads(line) for line in progress.read_text().splitlines() if line.strip()]

    start = time.perf_counter()
    eval_dir = out / "eval"
    _run("evaluate", [py, "jobs/evaluate.py", "--config", str(RECIPE), "--checkpoint", str(train_dir / "best"),
                      "--data", str(shards), "--output", str(eval_dir), *CPU_OVERRIDES, "evaluate.num_actors=1",
                      "evaluate.metric_workers=1", f"evaluate.batch_size={split_sizes['test']}",
                      f"evaluate.metrics=[{','.join(metrics)}]"], timeout, log, runner)
    result.seconds["evaluate"] = time.perf_counter() - start
    result.eval_metrics = json.loads((eval_dir / "metrics.json").read_text())

    start = time.perf_counter()
    test_video = dataset.video_path(dataset.video_ids("test")[0])
    result.served = serve_one_request(train_dir / "best", test_video, timeout, log, serve_env)
    result.seconds["serve"] = time.perf_counter() - start
    (out / "rehearsal.json").write_text(json.dumps({
        "encoder_layers": encoder_layers, "decoder_layers": decoder_layers, "max_steps": max_steps,
        "seconds": result.seconds, "train_epochs": result.train_epochs, "eval": result.eval_metrics,
        "served": result.served}, indent=1, default=str) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="outputs/rehearsal")
    parser.add_argument("--encoder-layers", type=int, default=12)
    parser.add_argument("--decoder-layers", type=int, default=12)
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--videos", type=int, default=4,
                        help="training videos (half as many for validation and test; at least 2 and 1)")
    args = parser.parse_args(argv)
    try:
        done = rehearse(args.out_dir, args.encoder_layers, args.decoder_layers, args.max_steps, args.videos)
    except RehearsalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"seconds": done.seconds, "caption": done.served.get("caption")}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
