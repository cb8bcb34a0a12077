"""stgpt.storage: local paths and URIs, atomic writes; and that it is the one place that tells them apart."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from stgpt import storage

REPO = Path(__file__).resolve().parents[1]


def test_local_paths_and_file_uris_are_local_others_are_not(tmp_path):
    assert storage.local_path("data/x.mp4") == "data/x.mp4"
    assert storage.local_path(f"file://{tmp_path}/a%20b.mp4") == f"{tmp_path}/a b.mp4"
    assert storage.local_path("s3://bucket/x.mp4") is None
    assert storage.is_uri("gs://b/x") and storage.is_uri("file:///x") and not storage.is_uri("relative/x")
    assert storage.absolute("rel/x") == str(Path("rel/x").resolve()) and storage.absolute("s3://b/x") == "s3://b/x"


def test_child_of_a_uri_is_percent_encoded_and_keeps_the_query():
    assert storage.child("gs://bucket/some%20videos/", "clip one.mp4") == "gs://bucket/some%20videos/clip%20one.mp4"
    assert storage.child("s3://bucket/videos?region=eu-west-1", "v.webm") == "s3://bucket/videos/v.webm?region=eu-west-1"
    assert storage.child("/data/videos", "v.mp4") == "/data/videos/v.mp4"


def test_reads_and_writes_through_file_uris_and_plain_paths(tmp_path):
    storage.write_json(tmp_path / "sub" / "a.json", {"x": 1})  # parent folders are made
    assert storage.read_text(f"file://{tmp_path}/sub/a.json") == '{\n "x": 1\n}\n'
    assert storage.exists(tmp_path / "sub" / "a.json") and storage.is_dir(tmp_path / "sub")
    assert [info.base_name for info in storage.list_dir(tmp_path / "sub")] == ["a.json"]
    assert storage.video_source(tmp_path / "sub" / "a.json") == str(tmp_path / "sub" / "a.json")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        storage.list_dir(tmp_path / "nowhere")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    storage.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with storage.replacing(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "best"
    for version in ("one", "two"):
        with storage.replacing(target) as temporary:
            temporary.mkdir()
            (temporary / "weights").write_text(version)
    assert (target / "weights").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_no_module_but_storage_tells_uris_from_paths_and_no_module_but_launch_starts_ray():
    """One home each: a `"://"` test or a `FileSystem.from_uri` outside stgpt/storage.py, or a `ray.init(` in
    the library outside stgpt/launch.py, would be a second policy."""
    offenders = []
    for path in sorted((REPO / "stgpt").glob("*.py")):
        text = path.read_text()
        code = re.sub(r'"""(.|\n)*?"""', "", text)  # docstrings may name them
        if path.name != "storage.py" and ('"://"' in code or "FileSystem.from_uri(" in code):
            offenders.append(f"{path.name}: URI test")
        if path.name != "launch.py" and "ray.init(" in code:
            offenders.append(f"{path.name}: ray.init")
    assert offenders == []
