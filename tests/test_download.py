"""VATEX acquisition against a stand-in yt-dlp: these machines cannot reach YouTube.

The stand-in is an executable script that reads the command line yt-dlp would get, logs it, and acts out a
per-video script of outcomes: save a real clip, fail as YouTube does for a removed video, or fail transiently.
"""
from __future__ import annotations

import importlib.util
import json
import stat
import sys
from collections import Counter
from pathlib import Path

import pytest

from stgpt.annotations import VideoAnnotation, save_annotations
from stgpt.download import DownloaderNotFound, download_clip, parse_video_id, read_records, yt_dlp_command
from stgpt.synthetic import make_synthetic_dataset
from stgpt.video import read_video

REPO = Path(__file__).resolve().parents[1]

FAKE_YT_DLP = r'''#!{python}
"""Stand-in for yt-dlp: outcome per YouTube ID and attempt from outcomes.json; every call logged."""
import json, os, shutil, sys
here = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
url = args[-1]
youtube_id = url.split("v=", 1)[1]
template = args[args.index("-o") + 1]
watch = os.path.join(here, "watch.txt")  # a file whose content each call records (what the job wrote so far)
watched = open(watch).read() if os.path.exists(watch) else None
seen = open(watched).read() if watched and os.path.exists(watched) else None
with open(os.path.join(here, "calls.jsonl"), "a") as log:
    log.write(json.dumps({{"youtube_id": youtube_id, "args": args, "seen": seen}}) + "\n")
calls = sum(1 for line in open(os.path.join(here, "calls.jsonl")) if json.loads(line)["youtube_id"] == youtube_id)
plan = json.load(open(os.path.join(here, "outcomes.json")))[youtube_id]
outcome = plan[min(calls, len(plan)) - 1]
if outcome == "ok":
    target = template.replace("%(ext)s", "mp4")
    shutil.copyfile(os.path.join(here, "clip.mp4"), target + ".part")  # like yt-dlp: .part, then rename
    os.replace(target + ".part", target)
    sys.exit(0)
if outcome == "gone":
    print(f"ERROR: [youtube] {{youtube_id}}: Video unavailable. This video has been removed by the uploader",
          file=sys.stderr)
    sys.exit(1)
# transient: a partial file left behind, then a network error
open(template.replace("%(ext)s", "mp4") + ".part", "wb").write(b"partial")
print(f"ERROR: [youtube] {{youtube_id}}: Unable to download webpage: <urlopen error timed out>", file=sys.stderr)
sys.exit(1)
'''

# VATEX-like IDs; YouTube IDs with "_" and "-" check that the ID is split from the right.
OUTCOMES = {
    "Ab_cd-Ef_12": ["ok"],
    "plainIdAAAA": ["ok"],
    "removed-vid": ["gone"],
    "flaky_flaky": ["transient", "transient", "ok"],
    "downNetwork": ["transient"],
    "alreadyHere": ["ok"],
}
IDS = {youtube_id: f"{youtube_id}_{100 + i:06d}_{110 + i:06d}" for i, youtube_id in enumerate(OUTCOMES)}


@pytest.fixture()
def setup(tmp_path):
    clip = make_synthetic_dataset(tmp_path / "synthetic", {"train": 1}, size=(64, 48), num_frames=12)
    clip_path = clip.video_path(clip.video_ids("train")[0])
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "clip.mp4").write_bytes(clip_path.read_bytes())
    (tool / "outcomes.json").write_text(json.dumps(OUTCOMES))
    script = tool / "yt-dlp"
    script.write_text(FAKE_YT_DLP.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    annotations = tmp_path / "vatex.json"
    save_annotations([VideoAnnotation(video_id, [f"caption {i}" for i in range(10)]) for video_id in IDS.values()],
                     annotations)
    videos = tmp_path / "videos"
    videos.mkdir()
    # already there as .mkv (what yt-dlp writes for some formats): found, never downloaded again
    (videos / f"{IDS['alreadyHere']}.mkv").write_bytes(_as_mkv(clip_path))
    return {"script": script, "tool": tool, "annotations": annotations, "videos": videos, "clip": clip_path}


def _as_mkv(clip: Path) -> bytes:
    """The same clip remuxed into Matroska (no re-encoding)."""
    import io

    import av

    buffer = io.BytesIO()
    with av.open(str(clip)) as source, av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    return buffer.getvalue()


def calls(tool: Path) -> list[dict]:
    path = tool / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load_job():
    spec = importlib.util.spec_from_file_location("download_job", REPO / "jobs" / "download_vatex.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parse_video_id():
    clip = parse_video_id("Ptf_2VRj-V0_000122_000132")
    assert (clip.youtube_id, clip.start, clip.end) == ("Ptf_2VRj-V0", 122, 132)
    assert clip.url == "https://www.youtube.com/watch?v=Ptf_2VRj-V0"
    for bad in ("Ptf_2VRj-V0", "abc_000010_000005", "abc_0001x_000010", "_000001_000002", *HOSTILE):
        with pytest.raises(ValueError, match="not a VATEX video ID"):
            parse_video_id(bad)
        download = download_clip(bad, "/nonexistent/never-used", executable="/nonexistent/never-run")
        assert download.status == "invalid" and "not a VATEX video ID" in download.reason
        download.reason.encode("ascii")  # printable and recordable whatever the ID held


# IDs an annotation file may hold: none may name a path outside the folder, expand in yt-dlp's template, or abort.
HOSTILE = [
    "../../../../tmp/x&v=plainIdAAAA_000001_000005",
    "%(title)s_000001_000005",
    "plainIdAAA%_000001_000005",
    "plainIdAAAA\x00_000001_000005",
    "plainId\ud800AAA_000001_000005",
    "a" * 300 + "_000001_000005",
    "plainIdAAAA_000001_000005/../x",
    "plainIdAAAA_000001_000005\n",
    "plainIdAAAA_\u0661\u0662\u0663\u0664\u0665\u0666_000005",  # Arabic-Indic digits: \d would take them
]


def test_output_template_holds_only_the_validated_id(tmp_path):
    clip = parse_video_id("Ptf_2VRj-V0_000122_000132")
    command = yt_dlp_command("yt-dlp", clip, "/tmp/100%(title)s")
    assert command[command.index("-o") + 1] == "/tmp/100%%(title)s/Ptf_2VRj-V0_000122_000132.%(ext)s"


def test_download_job_skips_records_and_retries(ray_cluster, setup, capsys):
    job = load_job()
    args = ["--annotations", str(setup["annotations"]), "--videos", str(setup["videos"]),
            "--yt-dlp", str(setup["script"]), "--max-attempts", "3", "--backoff", "0.01", "--concurrency", "4"]
    assert job.main(args) == 1  # one clip still failing after its retries
    out = capsys.readouterr()
    assert "failed after retries: 1" in out.out and "failed.jsonl" in out.err

    names = sorted(p.name for p in setup["videos"].iterdir())
    expected = {IDS[y] for y in ("Ab_cd-Ef_12", "plainIdAAAA", "flaky_flaky", "alreadyHere")}
    suffix = {v: ".mkv" if v == IDS["alreadyHere"] else ".mp4" for v in expected}
    assert names == sorted([v + suffix[v] for v in expected] + ["failed.jsonl", "unavailable.jsonl"])  # no partials
    for video_id in expected:  # whole, decodable clips
        assert read_video(setup["videos"] / f"{video_id}{suffix[video_id]}", 8).num_source_frames == 12

    per_video = Counter(call["youtube_id"] for call in calls(setup["tool"]))
    assert per_video == {"Ab_cd-Ef_12": 1, "plainIdAAAA": 1, "removed-vid": 1, "flaky_flaky": 3, "downNetwork": 3}
    first = next(c["args"] for c in calls(setup["tool"]) if c["youtube_id"] == "Ab_cd-Ef_12")
    assert first[first.index("--download-sections") + 1] == "*100-110"
    assert "height>=224" in first[first.index("-f") + 1]
    assert first[-1] == "https://www.youtube.com/watch?v=Ab_cd-Ef_12"

    gone = read_records(str(setup["videos"]))
    assert [r["video_id"] for r in gone] == [IDS["removed-vid"]] and "Video unavailable" in gone[0]["reason"]
    failed = read_records(str(setup["videos"]), "failed.jsonl")
    assert [r["video_id"] for r in failed] == [IDS["downNetwork"]] and "timed out" in failed[0]["reason"]

    # A second run asks only for the one that failed transiently: clips there and known-gone videos are skipped.
    assert job.main(args) == 1
    per_video = Counter(call["youtube_id"] for call in calls(setup["tool"]))
    assert per_video["downNetwork"] == 6 and per_video["removed-vid"] == 1 and per_video["Ab_cd-Ef_12"] == 1


def test_missing_downloader_is_a_setup_error(setup):
    with pytest.raises(DownloaderNotFound, match="not found"):
        download_clip(IDS["plainIdAAAA"], str(setup["videos"]), executable=str(setup["tool"] / "no-such-tool"))
    assert not calls(setup["tool"])


def test_hostile_ids_are_recorded_and_the_rest_goes_on(ray_cluster, setup, tmp_path):
    """Path tricks, template fields, NUL, overlong IDs: each is a record in unavailable.jsonl; nothing is written
    outside the videos folder; the good clip is downloaded; records are on disk while the job still runs."""
    hostile = [h for h in HOSTILE if "\ud800" not in h]  # a lone surrogate is a malformed file (test below)
    annotations = tmp_path / "hostile.json"
    good = [IDS["removed-vid"], IDS["plainIdAAAA"]]
    save_annotations([VideoAnnotation(v, ["a caption"]) for v in [*hostile, *good]], annotations)
    (setup["tool"] / "watch.txt").write_text(str(setup["videos"] / "unavailable.jsonl"))
    before = sorted(p for p in tmp_path.rglob("*") if "videos" not in p.parts and p.name != "calls.jsonl")
    job = load_job()
    args = ["--annotations", str(annotations), "--videos", str(setup["videos"]), "--yt-dlp", str(setup["script"]),
            "--max-attempts", "1", "--concurrency", "1"]
    assert job.main(args) == 0  # every clip there or known unavailable

    assert [c["youtube_id"] for c in calls(setup["tool"])] == ["removed-vid", "plainIdAAAA"]  # only valid IDs
    # the second download started after the first results were recorded, not at the end of the run
    seen = [json.loads(line)["video_id"] for line in calls(setup["tool"])[1]["seen"].splitlines()]
    assert sorted(seen) == sorted([*hostile, IDS["removed-vid"]])
    records = {r["video_id"]: r["reason"] for r in read_records(str(setup["videos"]))}
    assert set(records) == {*hostile, IDS["removed-vid"]}
    assert all("not a VATEX video ID" in records[h] for h in hostile)
    assert (setup["videos"] / f"{IDS['plainIdAAAA']}.mp4").exists()
    after = sorted(p for p in tmp_path.rglob("*") if "videos" not in p.parts and p.name != "calls.jsonl")
    assert after == before  # nothing new outside the videos folder (the fake would have followed any template)
    assert not Path("/tmp/x&v=plainIdAAAA_000001_000005.mp4").exists()


def test_annotation_text_that_is_not_unicode_stops_the_job_before_any_download(ray_cluster, setup, tmp_path,
                                                                              capsys):
    annotations = tmp_path / "surrogate.json"
    annotations.write_text('[{"videoID": "plainIdAAAA_000001_000005", "enCap": ["a"]}, '
                           '{"videoID": "plainId\\ud800AAA_000001_000005", "enCap": ["b"]}]')
    args = ["--annotations", str(annotations), "--videos", str(setup["videos"]), "--yt-dlp", str(setup["script"])]
    assert load_job().main(args) == 2
    assert "entry 1, ['videoID']: text is not valid Unicode" in capsys.readouterr().err
    assert not calls(setup["tool"])
