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
