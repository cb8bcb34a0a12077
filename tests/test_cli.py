"""The `stgpt caption` command offline and its failure paths (against a server: tests/test_serving.py)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stgpt.cli import main
from stgpt.inference import Captioner
from stgpt.checkpoints import ensure_demo_checkpoint
from stgpt.synthetic import make_synthetic_dataset, write_damaged_videos


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    dataset = make_synthetic_dataset(root / "data", num_videos={"test": 1}, size=(64, 64), num_frames=16)
    video = dataset.video_path(dataset.video_ids("test")[0])
    return {"checkpoint": ensure_demo_checkpoint(root / "tiny"), "video": video,
            "damaged": write_damaged_videos(root / "damaged", video)}


def test_offline_caption_is_the_captioners(assets, capsys):
    expected = Captioner.from_pretrained(assets["checkpoint"], use_gpu=False).caption_video(
        assets["video"], num_beams=3, max_new_tokens=6)
    args = ["caption", str(assets["video"]), "--checkpoint", str(assets["checkpoint"]), "--cpu",
            "--num-beams", "3", "--max-new-tokens", "6"]
    assert main(args) == 0
    assert capsys.readouterr().out == expected.caption + "\n"
    assert main(args + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["caption"] == expected.caption and answer["frame_indices"] == expected.frame_indices
    assert answer["model"] == str(assets["checkpoint"])


@pytest.mark.parametrize("kind", ["truncated", "empty", "text"])
def test_undecodable_video_fails_with_the_reason(assets, capsys, kind):
    path = assets["damaged"][kind]
    assert main(["caption", str(path), "--checkpoint", str(assets["checkpoint"]), "--cpu"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and str(path) in captured.err
    assert {"truncated": "truncated", "empty": "empty", "text": "not a video"}[kind] in captured.err


def test_missing_file_and_unreachable_server_fail_cleanly(assets, tmp_path, capsys):
    assert main(["caption", str(tmp_path / "nope.mp4"), "--url", "http://127.0.0.1:9"]) == 1
    assert "nope.mp4" in capsys.readouterr().err
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["caption", str(assets["video"]), "--url", f"http://127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert f"cannot reach http://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["caption"], ["caption", "v.mp4", "--url", "http://x", "--checkpoint", "c"],
                                  ["caption", "v.mp4", "--num-beams", "two"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert "usage: stgpt" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "stgpt"
    done = subprocess.run([str(script), "caption", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--url" in done.stdout and "--checkpoint" in done.stdout
