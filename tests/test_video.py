"""Decoding and sampling real generated videos, and every kind of bad input."""
import numpy as np
import pytest

from stgpt.video import VideoDecodeError, read_video, sample_indices


def frame_levels(frames: np.ndarray) -> np.ndarray:
    """The grey level of each frame, which the test videos set to 4 * frame index."""
    return frames.reshape(frames.shape[0], -1).mean(axis=1)


def test_sample_indices_follows_the_original_rule():
    for n in (1, 3, 8, 9, 40, 301):
        expected = np.linspace(0, n, 8, endpoint=False).astype(np.int64)
        assert np.array_equal(sample_indices(n, 8), expected)
    assert sample_indices(40, 8).tolist() == [0, 5, 10, 15, 20, 25, 30, 35]


def test_sample_indices_rejects_nonsense():
    with pytest.raises(ValueError):
        sample_indices(0, 8)
    with pytest.raises(ValueError):
        sample_indices(10, 0)


@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_reads_the_sampled_frames(make_video, container):
    path = make_video(f"v.{container}", num_frames=40, container=container)
    video = read_video(path)
    assert video.frames.shape == (8, 120, 160, 3) and video.frames.dtype == np.uint8
    assert video.num_source_frames == 40
    assert video.indices.tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    # each decoded frame is the one its index names (grey level 4*i, allowing codec error)
    assert np.allclose(frame_levels(video.frames), 4 * video.indices, atol=3)


def test_bytes_and_path_give_the_same_frames(make_video):
    path = make_video(num_frames=24)
    from_path = read_video(path)
    from_bytes = read_video(path.read_bytes())
    assert np.array_equal(from_path.frames, from_bytes.frames)
    assert from_bytes.indices.tolist() == from_path.indices.tolist()


def test_short_video_repeats_frames_deterministically(make_video):
    path = make_video(num_frames=3)
    video = read_video(path, num_frames=8)
    assert video.indices.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert np.allclose(frame_levels(video.frames), 4 * video.indices, atol=3)
    assert np.array_equal(read_video(path, num_frames=8).frames, video.frames)


def test_more_samples_than_frames_never_reads_past_the_end(make_video):
    path = make_video(num_frames=10)
    video = read_video(path, num_frames=32)
    assert video.indices.max() < 10 and video.frames.shape[0] == 32


def test_short_side_scales_during_decoding(make_video):
    video = read_video(make_video(num_frames=16, width=160, height=120), short_side=60)
    assert video.frames.shape == (8, 60, 80, 3)


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4_is_rejected(make_video, tmp_path, faststart):
    data = make_video(num_frames=60, faststart=faststart).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="truncated|corrupt") as info:
        read_video(cut)
    assert info.value.source == str(cut)


def test_webm_cut_short_after_its_header_is_rejected(make_video, tmp_path):
    data = make_video("v.webm", num_frames=60, container="webm").read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(VideoDecodeError, match="truncated"):
        read_video(cut)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"),
    (b"this is a text file, not a video\n" * 20, "not a video"),
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not a video"),
])
def test_bad_bytes_raise_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(VideoDecodeError, match=reason) as info:
        read_video(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(VideoDecodeError, match="not found") as info:
        read_video(tmp_path / "nope.mp4")
    assert "nope.mp4" in str(info.value)


def test_bytes_errors_use_the_given_name():
    with pytest.raises(VideoDecodeError, match="upload.mp4: empty"):
        read_video(b"", name="upload.mp4")


def test_audio_only_file_has_no_video_stream(tmp_path):
    import av

    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for _ in range(10):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        read_video(path)


def test_undecodable_tail_is_counted_and_sampled_within(make_video, tmp_path):
    """Packets that demux but do not decode: the count falls back to what decodes; no garbage frames."""
    data = bytearray(make_video(num_frames=60, faststart=True).read_bytes())
    start = data.find(b"mdat")
    damaged_from = start + (len(data) - start) // 2
    data[damaged_from:] = bytes(len(data) - damaged_from)
    path = tmp_path / "tail.mp4"
    path.write_bytes(bytes(data))
    video = read_video(path)
    assert 0 < video.num_source_frames < 60
    assert video.indices.max() < video.num_source_frames
    assert video.indices.tolist() == sample_indices(video.num_source_frames, 8).tolist()
    assert np.allclose(frame_levels(video.frames), 4 * video.indices, atol=3)


def test_zero_decodable_frames(make_video, tmp_path):
    """A container whose index is intact but whose every frame is damaged."""
    data = bytearray(make_video(num_frames=30, faststart=True).read_bytes())
    payload = data.find(b"mdat") + 4
    data[payload:] = bytes(len(data) - payload)
    path = tmp_path / "zeroed.mp4"
    path.write_bytes(bytes(data))
    with pytest.raises(VideoDecodeError, match="no decodable frames"):
        read_video(path)


# --------------------------------------------------------------------------------------------------------
# Exactness on a generated corpus: every container, codec, bit depth and quirk the reader must handle.

from video_corpus import CASES, picture, sequential_frames, upright, write_case  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return {name: write_case(folder / name, case) for name, case in CASES.items()}


@pytest.fixture(scope="session")
def truth(corpus):
    return {name: sequential_frames(path) for name, path in corpus.items()}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("num_frames", [8, 13])
def test_frames_equal_a_full_sequential_decode(corpus, truth, name, num_frames):
    """Bit for bit, the frames a full decode of FFmpeg's best stream yields at the sampled indices."""
    expected = truth[name]
    video = read_video(corpus[name], num_frames)
    assert video.num_source_frames == len(expected)
    assert video.indices.tolist() == sample_indices(len(expected), num_frames).tolist()
    for frame, index in zip(video.frames, video.indices):
        assert np.array_equal(frame, expected[index]), f"{name}: frame {index} differs"


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "rotate90.mp4", "hevc_10bit.mkv"])
def test_scaling_in_the_conversion_call_is_exact_too(corpus, name):
    import av

    video = read_video(corpus[name], 8, short_side=40)
    assert min(video.frames.shape[1:3]) == 40
    with av.open(str(corpus[name])) as container:
        frames = list(container.decode(container.streams.best("video")))
    for got, index in zip(video.frames, video.indices):
        frame = frames[index]
        sideways = (round((frame.rotation or 0) / 90) % 2) == 1
        height, width = got.shape[:2]
        scale = {"width": height if sideways else width, "height": width if sideways else height,
                 "interpolation": "BILINEAR"}
        assert np.array_equal(got, upright(frame, **scale))


@pytest.mark.parametrize("name, corner", [("rotate90.mp4", "bottom-left"), ("rotate180.mov", "bottom-right"),
                                          ("rotate270.mp4", "top-right"), ("h264.mkv", "top-left")])
def test_rotation_metadata_turns_frames_upright(corpus, name, corner):
    """The white marker drawn top-left ends where a player shows it (-90 in the matrix: turn clockwise)."""
    frame = read_video(corpus[name], 1).frames[0].astype(int)
    height, width = frame.shape[:2]
    corners = {"top-left": frame[:6, :6], "top-right": frame[:6, width - 6:],
               "bottom-left": frame[height - 6:, :6], "bottom-right": frame[height - 6:, width - 6:]}
    assert min(corners, key=lambda c: 255 - corners[c].mean()) == corner
    case = CASES[name]
    assert frame.shape[:2] == ((case.width, case.height) if case.rotation in (90, -90) else (case.height, case.width))


def test_discarded_packets_are_not_counted(corpus, truth):
    case = CASES["discard.mp4"]
    assert len(truth["discard.mp4"]) == case.frames + case.first_pts  # the 7 frames before the edit are gone
    video = read_video(corpus["discard.mp4"], 8)
    assert video.num_source_frames == case.frames + case.first_pts
    # frame 0 is the first frame shown: the picture drawn for pts 0, not for pts -7
    drawn = picture(-case.first_pts, case.height, case.width).astype(int)
    assert np.abs(video.frames[0].astype(int) - drawn).mean() < np.abs(video.frames[0].astype(int)
                                                                      - picture(0, case.height, case.width)).mean()


@pytest.mark.parametrize("name", ["h264_bframes.mp4", "hevc_bframes.mp4", "av1.mp4", "vp9.webm", "mpeg2.ts"])
def test_only_what_the_targets_need_is_decoded(corpus, name):
    """Seeking to the keyframe before each group of targets decodes well under the whole stream."""
    video = read_video(corpus[name], 4)
    assert 0 < video.frames_decoded < 0.8 * video.num_source_frames


def test_mpeg_program_streams_and_avi_without_reorder_timestamps_decode_sequentially(corpus):
    """Their timestamps cannot place a seek exactly: the whole stream is decoded, and the frames stay exact."""
    for name in ("mpeg1.mpg", "h264.avi"):
        video = read_video(corpus[name], 4)
        assert video.frames_decoded >= video.num_source_frames


def test_unknown_decoder_is_an_error(corpus):
    with pytest.raises(ValueError, match="decoder"):
        read_video(corpus["h264.mkv"], 8, decoder="opencv")


def test_decord_stays_selectable(corpus, truth):
    pytest.importorskip("decord", reason="decord is an optional extra (no wheels on ARM Linux or macOS)")
    video = read_video(corpus["vp8.webm"], 8, decoder="decord")  # no B-frames: decord is exact here
    assert video.indices.tolist() == sample_indices(len(truth["vp8.webm"]), 8).tolist()
    assert video.frames.shape == (8, 64, 96, 3)
