"""The README's main job, `python jobs/demo.py`, end to end on a small scale: interrupted with Ctrl-C during training,
then run again with no clean-up, it finishes every step and leaves the report, the outputs and the picture."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The demo's own steps and defaults, on a model and dataset that take seconds.
SMALL = ["video.num_frames=8", "video.short_side=32", "video.crop_size=32", "model.hidden_size=32", "model.num_layers=1",
         "model.patch_size=16", "model.vocab_size=256", "generation.num_beams=2", "generation.max_new_tokens=12",
         "data.synthetic_train=16", "data.synthetic_validation=4", "data.synthetic_test=4", "train.epochs=6",
         "train.lr=5e-3", "evaluate.metrics=[CIDEr-D,ROUGE-L]", "pretrain.encoder_epochs=1", "pretrain.decoder_epochs=1",
         "pretrain.encoder_batch_size=4", "pretrain.decoder_batch_size=16"]


COMMAND = [sys.executable, str(REPO / "jobs" / "demo.py"), *SMALL]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> tuple[list[str], bool]:
    """The demo's lines until one starts with `marker` (True) or it exits or times out (False)."""
    lines: list[str] = []
    found = threading.Event()

    def reader():
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(marker):
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(timeout)
    return lines, found.is_set()


@pytest.mark.slow
def test_demo_interrupted_then_run_again_finishes_every_step(tmp_path):
    # First run: Ctrl-C once training has shown its second epoch (so the first one's checkpoint is registered).
    first = subprocess.Popen(COMMAND, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, found = read_until(first, "epoch 2/6", timeout=600)
        assert found, "\n".join(lines[-60:])
        first.send_signal(signal.SIGINT)
        rest, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode != 0
    assert "=== [3/6] train" in "\n".join(lines) and "=== [4/6]" not in rest, rest[-3000:]
    assert not (tmp_path / "outputs" / "demo" / "report.json").exists()

    # Second run, nothing cleaned: the dataset and shards are reused, training resumes after its checkpoint.
    started = time.monotonic()
    second = subprocess.run(COMMAND, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    for number in range(1, 7):
        assert f"=== [{number}/6]" in second.stdout  # progress, step by step
    shown = [line.split(":")[0] for line in second.stdout.splitlines() if line.startswith("epoch ")]
    assert shown and "epoch 1/6" not in shown and shown[-1] == "epoch 6/6", shown  # resumed, not restarted
    assert "[encoder] epoch 1/1" in "\n".join(lines)  # the first run pretrained the encoder ...
    assert "pretraining stage encoder: done already" in second.stdout  # ... which the second one keeps

    report = json.loads((tmp_path / "outputs" / "demo" / "report.json").read_text())
    assert set(report["before"]) >= {"CIDEr-D", "colour", "shape", "motion"}
    assert set(report["after"]) >= {"CIDEr-D", "colour", "shape", "motion"}
    for when in ("before", "after"):  # the report's figures are the evaluation job's own
        metrics = json.loads((tmp_path / "outputs" / "demo" / f"eval_{when}" / "metrics.json").read_text())
        assert report[when]["CIDEr-D"] == round(100 * metrics["corpus"]["CIDEr-D"], 2)
        assert report[when]["motion"] == round(100 * metrics["attribute_accuracy"]["motion"], 1)
    predictions = {p["image_id"]: p["caption"] for p in
                   json.loads((tmp_path / "outputs" / "demo" / "eval_after" / "generated_captions.json").read_text())}
    assert len(predictions) == 4 and len(report["examples"]) == 4
    for example in report["examples"]:
        assert example["generated"] == predictions[example["video_id"]] and example["reference"]
    served = report["served"]  # over HTTP, the same caption the evaluation job generated for that video
    assert served["caption"] == predictions[served["video_id"]], served
    reversal = json.loads((tmp_path / "outputs" / "demo" / "eval_after" / "metrics.json").read_text())["time_reversal"]
    assert report["time_reversal"]["motion"] == round(100 * reversal["motion"], 1)
    assert "time reversal (test videos played backwards" in second.stdout
    assert set(report["training_seconds"]) == {"encoder", "decoder", "caption"}
    picture = Path(report["outputs"]["picture"])
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    assert Path(report["outputs"]["checkpoint"], "model.safetensors").exists()
    assert "stgpt demo report" in second.stdout and "done in" in second.stdout
    assert report["wall_seconds"] <= time.monotonic() - started
