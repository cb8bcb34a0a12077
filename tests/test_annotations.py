"""Annotation readers and writers, on the real VATEX test-split captions and on small hand-made files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pyarrow import fs as pafs

from stgpt import storage
from stgpt.annotations import (
    MISSING_VIDEO,
    AnnotationError,
    VideoAnnotation,
    find_videos,
    load_annotations,
    load_predictions,
    load_references,
    save_annotations,
    save_predictions,
)

VATEX = Path(__file__).resolve().parents[1].parent / "shared" / "vatex"
needs_vatex = pytest.mark.skipif(
    not (VATEX / "vatex_test.csv").is_file(),
    reason=f"the VATEX test-split captions are not at {VATEX} (shared/ beside the repository)",
)


def write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# The real files


@needs_vatex
def test_vatex_csv_and_json_give_the_same_ids_and_captions():
    raw = (VATEX / "vatex_test.csv").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")  # so the reader's fallback is really exercised
    from_csv = load_references(VATEX / "vatex_test.csv")
    from_json = load_references(VATEX / "vatex_test.json")
    official = json.loads((VATEX / "vatex_test.json").read_text(encoding="utf-8"))
    assert list(from_json) == [entry["videoID"] for entry in official]
    assert list(from_csv) == list(from_json), "same IDs, same order"
    assert all(len(captions) == 10 for captions in from_csv.values())

    ascii_ids = [vid for vid, caps in from_json.items() if all(c.isascii() for c in caps)]
    other_ids = [vid for vid in from_json if vid not in set(ascii_ids)]
    assert ascii_ids and other_ids, "the file has both plain-ASCII and accented captions"
    for video_id in ascii_ids:
        assert from_csv[video_id] == from_json[video_id]
    # Where the CSV has latin-1 bytes, decoding them as latin-1 gives the JSON's text: "sautéing", "piñata".
    for video_id in other_ids:
        assert from_csv[video_id] == from_json[video_id]
        assert any(not caption.isascii() for caption in from_csv[video_id])


@needs_vatex
def test_csv_quotes_are_caption_text_as_in_the_official_json():
    from_csv = load_references(VATEX / "vatex_test.csv")
    from_json = load_references(VATEX / "vatex_test.json")
    quoted = [(vid, c) for vid, caps in from_csv.items() for c in caps if c.startswith('"')]
    assert quoted
    for video_id, caption in quoted:
        assert caption in from_json[video_id]


@needs_vatex
def test_spacetimegpt_predictions_load_one_caption_per_video():
    raw = json.loads((VATEX / "spacetimegpt_generated_captions.json").read_text(encoding="utf-8"))
    predictions = load_predictions(VATEX / "spacetimegpt_generated_captions.json")
    assert predictions == {entry["image_id"]: entry["caption"] for entry in raw}
    assert len(predictions) == len(raw)
    assert set(predictions) <= set(load_references(VATEX / "vatex_test.json"))


@needs_vatex
def test_vatex_json_reads_as_annotations(tmp_path):
    annotations = load_annotations(VATEX / "vatex_test.json")
    assert all(isinstance(a, VideoAnnotation) and a.extra == {} for a in annotations)
    # Written back and read again, unchanged (non-ASCII included).
    save_annotations(annotations, tmp_path / "copy.json")
    assert load_annotations(tmp_path / "copy.json") == annotations


# --------------------------------------------------------------------------------------------------------
# Formats


def test_vatex_extra_keys_are_kept(tmp_path):
    path = write(
        tmp_path,
        "a.json",
        [
            {"videoID": "v1", "enCap": ["a cat", "a kitten"], "chCap": ["一只猫"]},
            {"videoID": "v2", "enCap": ["a dog"], "attributes": {"objects": [{"colour": "red"}]}},
        ],
    )
    annotations = load_annotations(path)
    assert annotations == [
        VideoAnnotation("v1", ["a cat", "a kitten"], {"chCap": ["一只猫"]}),
        VideoAnnotation("v2", ["a dog"], {"attributes": {"objects": [{"colour": "red"}]}}),
    ]


def test_coco_references_group_captions_by_id_in_order(tmp_path):
    entries = [
        {"image_id": "b", "caption": "b one"},
        {"image_id": "a", "caption": "a one"},
        {"image_id": "b", "caption": "b two"},
        {"image_id": 7, "caption": "an integer id"},
    ]
    path = write(tmp_path, "refs.json", entries)
    assert load_references(path) == {"b": ["b one", "b two"], "a": ["a one"], "7": ["an integer id"]}
    wrapped = write(tmp_path, "coco.json", {"images": [], "annotations": entries})
    assert load_references(wrapped) == load_references(path)


def test_predictions_from_coco_mapping_and_one_caption_files(tmp_path):
    expected = {"x": "a man talks", "y": "a dog runs"}
    save_predictions(expected, tmp_path / "generated_captions.json")
    written = json.loads((tmp_path / "generated_captions.json").read_text())
    assert written == [{"image_id": "x", "caption": "a man talks"}, {"image_id": "y", "caption": "a dog runs"}]
    assert load_predictions(tmp_path / "generated_captions.json") == expected
    assert load_predictions(write(tmp_path, "map.json", expected)) == expected
    assert load_predictions(write(tmp_path, "p.csv", "x|a man talks\ny|a dog runs\n")) == expected
    vatex = write(
        tmp_path, "v.json", [{"videoID": "x", "enCap": ["a man talks"]}, {"videoID": "y", "enCap": ["a dog runs"]}]
    )
    assert load_predictions(vatex) == expected


def test_csv_lines_decode_as_utf8_where_valid_else_latin1(tmp_path):
    content = (
        b"videoID|caption\n"  # a header line is recognised and skipped
        + "utf|un café noir|a piñata\r\n".encode("utf-8")
        + "latin|un café noir|a piñata\n".encode("latin-1")
        + b"\n"  # blank lines are skipped
        + b"plain|a man|a woman\n"
    )
    references = load_references(write(tmp_path, "mixed.csv", content))
    assert references == {
        "utf": ["un café noir", "a piñata"],
        "latin": ["un café noir", "a piñata"],
        "plain": ["a man", "a woman"],
    }


def test_file_uri_reads_through_pyarrow(tmp_path):
    path = write(tmp_path, "a b.json", [{"videoID": "v", "enCap": ["c"]}])
    assert load_references(path.as_uri()) == {"v": ["c"]}


def test_save_annotations_from_a_mapping_and_with_extra(tmp_path):
    save_annotations({"v1": ["one", "two"]}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == [{"videoID": "v1", "enCap": ["one", "two"]}]
    annotations = [VideoAnnotation("v", ["é"], {"attributes": {"objects": []}})]
    save_annotations(annotations, tmp_path / "sub" / "a.json")
    assert load_annotations(tmp_path / "sub" / "a.json") == annotations
    assert not list(tmp_path.rglob("*.tmp"))


def test_writers_refuse_what_readers_would_reject(tmp_path):
    with pytest.raises(AnnotationError, match="'v'"):
        save_annotations([VideoAnnotation("v", ["a"]), VideoAnnotation("v", ["b"])], tmp_path / "dup.json")
    with pytest.raises(AnnotationError, match="empty"):
        save_annotations({"v": []}, tmp_path / "empty.json")
    with pytest.raises(ValueError, match="videoID"):
        save_annotations([VideoAnnotation("v", ["a"], {"videoID": "w"})], tmp_path / "clash.json")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------------
# Malformed files: one exception type, naming the file and the place


BAD_FILES = {
    "bad_json": ('[{"videoID": "v", "enCap": ["a"]},\n {"videoID": }]', r"line 2, column 14"),
    "not_a_list": ({"videoID": "v", "enCap": ["a"]}, r"expected a JSON list of entries, found a object"),
    "entry_not_object": ([["v", "a"]], r"entry 0 is a list"),
    "unknown_format": ([{"id": "v", "text": "a"}], r"neither 'videoID' \(VATEX\) nor 'image_id' \(COCO\)"),
    "missing_videoID": (
        [{"videoID": "v", "enCap": ["a"]}, {"videoID": "w", "enCap": ["b"]}, {"enCap": ["c"]}],
        r"entry 2 has no 'videoID' key",
    ),
    "missing_enCap": ([{"videoID": "v", "enCap": ["a"]}, {"videoID": "w"}], r"entry 1 has no 'enCap' key"),
    "empty_captions": ([{"videoID": "v", "enCap": []}], r"entry 0 \(video 'v'\): 'enCap' is empty"),
    "caption_not_string": ([{"videoID": "v", "enCap": ["a", 3]}], r"entry 0 \(video 'v'\): 'enCap'\[1\] is a int"),
    "captions_not_list": ([{"videoID": "v", "enCap": "a cat"}], r"'enCap' is a string, expected a list"),
    "id_not_string": ([{"videoID": None, "enCap": ["a"]}], r"entry 0: 'videoID' is a null"),
    "duplicate_ids": (
        [{"videoID": "v", "enCap": ["a"]}, {"videoID": "w", "enCap": ["b"]}, {"videoID": "v", "enCap": ["c"]}],
        r"1 video ID\(s\) listed more than once: 'v' \(entry 0 and entry 2\)",
    ),
    "coco_missing_caption": ([{"image_id": "v", "caption": "a"}, {"image_id": "w"}], r"entry 1 has no 'caption' key"),
    "coco_caption_not_string": ([{"image_id": "v", "caption": ["a"]}], r"'caption' is a list"),
    "not_utf8_json": (b'[{"videoID": "v", "enCap": ["caf\xe9"]}]', r"not valid UTF-8"),
    # Hostile text: escapes JSON allows that no UTF-8 file or Parquet shard can hold, and Python's own limits.
    "lone_surrogate_caption": ('[{"videoID": "v", "enCap": ["ok"]}, {"videoID": "w", "enCap": ["a", "b\\ud800"]}]',
                               r"entry 1, \['enCap'\]\[1\]: text is not valid Unicode"),
    "lone_surrogate_id": ('[{"videoID": "v\\udfff", "enCap": ["a"]}]', r"entry 0, \['videoID'\]: text is not valid"),
    "lone_surrogate_key": ('[{"videoID": "v", "enCap": ["a"], "x\\ud800": 1}]', r"entry 0: text is not valid Unicode"),
    "5000_digit_number": ('[{"videoID": "v", "enCap": ["a"], "n": ' + "7" * 5000 + "}]", r"unusable JSON value"),
    "deep_nesting": ('[{"videoID": "v", "enCap": ["a"], "x": ' + "[" * 100_000 + "]" * 100_000 + "}]",
                     r"nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_json_is_rejected_with_the_place(tmp_path, case):
    content, message = BAD_FILES[case]
    path = write(tmp_path, f"{case}.json", content)
    for reader in (load_annotations, load_references):
        with pytest.raises(AnnotationError, match=message) as raised:
            reader(path)
        assert str(raised.value).startswith(str(path))


BAD_CSV = {
    "no_captions": ("v|a|b\nw\n", r"line 2: video 'w' has no captions"),
    "empty_caption": ("v|a||b\n", r"line 1: video 'v': caption 2 is empty"),
    "empty_id": ("|a|b\n", r"line 1: empty video ID"),
    "duplicate_ids": ("v|a\nw|b\nv|c\n", r"'v' \(line 1 and line 3\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_malformed_csv_is_rejected_with_the_line(tmp_path, case):
    content, message = BAD_CSV[case]
    path = write(tmp_path, f"{case}.csv", content)
    with pytest.raises(AnnotationError, match=message) as raised:
        load_references(path)
    assert str(path) in str(raised.value)


def test_prediction_files_with_invalid_text_are_rejected(tmp_path):
    mapping = write(tmp_path, "mapping.json", '{"v": "fine", "w": "bad \\udc80"}')
    with pytest.raises(AnnotationError, match=r"\['w'\]: text is not valid Unicode"):
        load_predictions(mapping)
    with pytest.raises(AnnotationError, match="nested too deeply"):
        load_predictions(write(tmp_path, "deep.json", "[" * 100_000 + "]" * 100_000))


def test_prediction_errors_name_the_video(tmp_path):
    twice = write(tmp_path, "twice.json", [{"image_id": "a", "caption": "x"}, {"image_id": "b", "caption": "y"},
                                           {"image_id": "a", "caption": "z"}])
    with pytest.raises(AnnotationError, match=r"predicted more than once: 'a' \(entry 0 and entry 2\)"):
        load_predictions(twice)
    several = write(tmp_path, "several.json", [{"videoID": "v", "enCap": ["x", "y"]}])
    with pytest.raises(AnnotationError, match=r"video 'v'\) has 2 captions"):
        load_predictions(several)
    mapping = write(tmp_path, "mapping.json", {"v": ["x"]})
    with pytest.raises(AnnotationError, match=r"video 'v': caption is a list"):
        load_predictions(mapping)
    with pytest.raises(AnnotationError, match="line 1, column 2"):
        load_predictions(write(tmp_path, "broken.json", "{oops"))


# --------------------------------------------------------------------------------------------------------
# Finding videos


@pytest.fixture
def video_folder(tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a.mp4", "b.webm", "c.mp4", "c.webm", "notes.txt", ".a2.mp4.x.tmp", "A.MP4"):
        (folder / name).write_bytes(name.encode())
    (folder / "d.mp4").mkdir()  # a folder with a video's name is not a video
    return folder


def test_find_videos_maps_ids_and_reports_the_missing(video_folder):
    found, missing = find_videos(["a", "b", "c", "d", "e", "a", "a2", "notes", "A"], video_folder)
    assert found == {
        "a": str(video_folder / "a.mp4"),
        "b": str(video_folder / "b.webm"),
        "c": str(video_folder / "c.mp4"),  # mp4 preferred when both exist
        "A": str(video_folder / "A.MP4"),  # IDs are case-sensitive, extensions are not
    }
    assert missing == ["d", "e", "a2", "notes"]
    for path in found.values():  # paths reopen through pyarrow as the docstring promises
        filesystem, inner = pafs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as stream:
            assert stream.read() == Path(path).name.encode()


def test_find_videos_takes_relative_paths_and_file_uris(video_folder, monkeypatch):
    monkeypatch.chdir(video_folder.parent)
    assert find_videos(["a"], "videos")[0] == {"a": str(video_folder / "a.mp4")}
    assert find_videos(["a"], video_folder.as_uri())[0] == {"a": str(video_folder / "a.mp4")}


def test_find_videos_fails_for_a_folder_that_is_not_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_videos(["a"], tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        find_videos(["a"], tmp_path / "file")


class CountingLocalHandler(pafs.FileSystemHandler):
    """A local filesystem that records every metadata call, to see how find_videos uses it."""

    def __init__(self):
        self.local = pafs.LocalFileSystem()
        self.calls: list[tuple[str, object]] = []

    def get_type_name(self):
        return "counting"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        self.calls.append(("stat", list(paths)))
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self.calls.append(("list", selector.base_dir))
        return self.local.get_file_info(selector)

    def open_input_stream(self, path):
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        return self.local.open_input_file(path)

    def _read_only(self, *args, **kwargs):
        raise NotImplementedError("read-only in this test")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def test_find_videos_lists_the_folder_once_and_stats_nothing(video_folder):
    handler = CountingLocalHandler()
    filesystem = pafs.PyFileSystem(handler)
    ids = ["a", "b", "c", "missing"] + [f"x{i}" for i in range(50)]
    found, missing = find_videos(ids, str(video_folder), filesystem=filesystem)
    assert handler.calls == [("list", str(video_folder))]
    assert set(found) == {"a", "b", "c"} and len(missing) == 51
    with filesystem.open_input_stream(found["b"]) as stream:  # paths within the given filesystem
        assert stream.read() == b"b.webm"


def test_only_regular_files_inside_the_folder_are_videos(tmp_path):
    """Links count where they resolve to a regular file inside the folder; the rest is missing, with why."""
    import os

    from stgpt.annotations import find_video_files

    folder = tmp_path / "videos"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.mp4").write_bytes(b"outside")
    (folder / "real.mp4").write_bytes(b"inside")
    (folder / "sub" / "deep.mp4").write_bytes(b"deep")
    links = {"inlink.mp4": "real.mp4", "sublink.webm": str(folder / "sub" / "deep.mp4"), "out.mp4": "../secret.mp4",
             "abs.mkv": str(tmp_path / "secret.mp4"), "escape.mp4": "sub/../../secret.mp4",
             "dangling.mp4": "nothing.mp4", "loop.mp4": "loop.mp4", "dir.mp4": "sub"}
    for name, target in links.items():
        os.symlink(target, folder / name)
    os.mkfifo(folder / "fifo.mp4")
    (folder / "both.mp4").symlink_to(tmp_path / "secret.mp4")
    (folder / "both.webm").write_bytes(b"the real one")  # a refused .mp4 does not hide a good .webm

    ids = ["real", "inlink", "sublink", "out", "abs", "escape", "dangling", "loop", "dir", "fifo", "both"]
    listing = find_video_files(ids, folder)
    assert {v: f.path for v, f in listing.found.items()} == {
        "real": str(folder / "real.mp4"), "inlink": str(folder / "real.mp4"),  # resolved: what is checked is read
        "sublink": str(folder / "sub" / "deep.mp4"), "both": str(folder / "both.webm")}
    assert listing.found["real"].size == 6 and listing.found["real"].mtime_ns == (folder / "real.mp4").stat().st_mtime_ns
    assert listing.missing == ["out", "abs", "escape", "dangling", "loop", "dir", "fifo"]
    why = listing.rejected
    for video_id in ("out", "abs", "escape"):
        assert "outside the videos folder" in why[video_id] and str(tmp_path / "secret.mp4") in why[video_id]
    assert "does not exist" in why["dangling"] and "cannot be examined" in why["loop"]
    assert "not a regular file" in why["dir"] and "not a regular file" in why["fifo"]
    assert listing.reason("nope") == MISSING_VIDEO and listing.reason("out") == why["out"]
    assert find_videos(ids, folder)[1] == listing.missing  # the plain form agrees
    # a folder reached through a link is still that folder: its own files are inside it
    (tmp_path / "alias").symlink_to(folder)
    assert set(find_video_files(ids, tmp_path / "alias").found) == {"real", "inlink", "sublink", "both"}


def test_remote_paths_come_back_as_uris_that_pyarrow_reopens():
    uri = storage.child("gs://bucket/some%20videos/", "clip one.mp4")
    assert uri == "gs://bucket/some%20videos/clip%20one.mp4"
    _, path = pafs.FileSystem.from_uri(uri)
    assert path == "bucket/some videos/clip one.mp4"
    with_query = storage.child("s3://bucket/videos?region=eu-west-1", "v.webm")
    assert with_query == "s3://bucket/videos/v.webm?region=eu-west-1"
    filesystem, path = pafs.FileSystem.from_uri(with_query)
    assert path == "bucket/videos/v.webm" and filesystem.region == "eu-west-1"


def test_find_videos_knows_every_container_the_reader_decodes(tmp_path):
    """.mkv (what yt-dlp often writes), .avi, .mpg, .gif ... are found, in any case, one file per ID."""
    from stgpt.annotations import VIDEO_EXTENSIONS

    folder = tmp_path / "videos"
    folder.mkdir()
    for i, extension in enumerate(VIDEO_EXTENSIONS):
        (folder / f"v{i}{extension.upper() if i % 2 else extension}").write_bytes(b"x")
    # an ID with several files: the extension listed first wins, whatever order the folder lists them in
    for extension in reversed(VIDEO_EXTENSIONS):
        (folder / f"many{extension}").write_bytes(b"x")
    ids = [f"v{i}" for i in range(len(VIDEO_EXTENSIONS))] + ["many"]
    found, missing = find_videos(ids, folder)
    assert missing == []
    for i, extension in enumerate(VIDEO_EXTENSIONS):
        assert found[f"v{i}"].lower() == str(folder / f"v{i}{extension}").lower()
    assert found["many"] == str(folder / f"many{VIDEO_EXTENSIONS[0]}")
    assert {".mkv", ".avi", ".mpg", ".gif", ".mov", ".ts", ".flv", ".m4v"} <= set(VIDEO_EXTENSIONS)


# --------------------------------------------------------------------------------------------------------
# Hostile files: every job that reads annotations refuses them up front, naming the place (exit 2, not a traceback)

HOSTILE_FILES = {
    "digits.json": ('[{"videoID": "v", "enCap": ["a"], "n": ' + "7" * 5000 + "}]", "unusable JSON value"),
    "deep.json": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "surrogate.json": ('[{"videoID": "v", "enCap": ["a\\ud800"]}]', "entry 0, ['enCap'][0]: text is not valid"),
}


def _job(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_job", Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_job_reading_annotations_exits_2_naming_the_place(ray_cluster, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    good = write(tmp_path, "good.json", [{"image_id": "v", "caption": "a"}])
    for name, (content, message) in HOSTILE_FILES.items():
        bad = str(write(tmp_path, name, content))
        runs = {
            "preprocess": ["--annotations", bad, "--videos", str(videos), "--output", str(tmp_path / "out")],
            "download_vatex": ["--annotations", bad, "--videos", str(videos), "--yt-dlp", "/nonexistent/yt-dlp"],
            "evaluate": ["--predictions", str(good), "--references", bad, "--output", str(tmp_path / "eval")],
        }
        for job, args in runs.items():
            assert _job(job).main(args) == 2, (job, name)
            err = capsys.readouterr().err
            assert f"error: {bad}: " in err and message in err, (job, name, err[-500:])
            assert "Traceback" not in err
