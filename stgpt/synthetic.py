"""A synthetic video-captioning dataset: coloured shapes that move, with captions that need time to get right.

SpaceTimeGPT's real data (VATEX) lives on YouTube and cannot be fetched here, so the suite trains, serves and
evaluates on this instead. Each video shows one or two coloured shapes on a dark background; every shape
either translates (left, right, up, down) or changes size (grow, shrink). Each video has 10 captions that vary
in wording but always name colour, shape and motion of every object, written in the VATEX annotation format:

    <root>/
        videos/<videoID>.mp4           (or .webm)  H.264 (VP9/VP8 for webm), yuv420p
        annotations/train.json         [{"videoID", "enCap": [10 captions], "attributes": {"objects": [...]}}]
        annotations/validation.json
        annotations/test.json
        manifest.json                  parameters and video IDs; written last, so it marks a complete folder

The motion is the part a model must see over time: the start position and size of every object are drawn from
one distribution whatever its motion, so frame 0 alone says nothing about it. (On a bounded canvas later
frames cannot all be like that: a left mover ends, on average, left of a right mover. Travel is kept short
next to the room the objects have, so single late frames stay ambiguous for most videos.)

Generation is deterministic given the seed (same annotation bytes, same decoded frames), and idempotent: a
complete folder made with the same parameters is returned as is, an interrupted one is completed.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

# PyAV before decord: decord loads its own FFmpeg and libvpx with RTLD_GLOBAL, and a PyAV loaded after it
# cannot open its VP8/VP9 encoders (avcodec_open2 returns EINVAL). Importing av first avoids that; where
# decord came first anyway, `make_synthetic_dataset` writes webm from a fresh interpreter.
import av

from stgpt import storage
from stgpt.config import DataConfig

# --------------------------------------------------------------------------------------------------------
# The world: a few distinct colours, shapes and motions, so that a tiny model can learn them.

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "grow", "shrink")
BACKGROUND: tuple[int, int, int] = (24, 24, 24)

# Geometry, as fractions of the shorter side of the frame. "size" is an object's half-extent: a circle's radius,
# half a square's side, half a triangle's base (and height).
# Motion is made large enough to see after the tiny model's downscale (128 -> 48 px, 8 px patches): a quarter of
# the frame's side for translations, x1.8 in size for growth, while start positions still leave room for any motion.
# Objects span one to two patches of the tiny model's grid (at 0.06-0.12 shape stayed near chance in captioners).
SIZE_RANGE: tuple[float, float] = (0.10, 0.16)
TRAVEL: float = 0.25  # how far a translating object moves over the whole clip
GROWTH: float = 1.8  # how many times larger (grow) or smaller (shrink) an object ends than it starts

DEFAULT_NUM_VIDEOS: dict[str, int] = {"train": 192, "validation": 32, "test": 32}
DEFAULT_P_TWO_OBJECTS: float = 0.25
CAPTIONS_PER_VIDEO = 10
FORMAT_VERSION = 4  # bump when a change to the generator changes its output

# Encoders to try per container, best first.
_ENCODERS: dict[str, tuple[str, ...]] = {"mp4": ("libx264", "h264"), "webm": ("libvpx-vp9", "libvpx")}
_ENCODER_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"crf": "18", "preset": "fast"},
    "libvpx-vp9": {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4"},
    "libvpx": {"crf": "8", "b": "1M"},
}

# --------------------------------------------------------------------------------------------------------
# Captions. Every template names colour, shape and motion of each object in that order, so `parse_caption`
# can read them back.

SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "ball", "disc", "dot"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
}
# (third person singular, progressive) forms of each motion.
MOTION_PHRASES: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (
        ("moves to the left", "moving to the left"),
        ("slides left", "sliding left"),
        ("drifts leftward", "drifting leftward"),
        ("travels to the left", "travelling to the left"),
        ("glides toward the left", "gliding toward the left"),
        ("heads left", "heading left"),
    ),
    "right": (
        ("moves to the right", "moving to the right"),
        ("slides right", "sliding right"),
        ("drifts rightward", "drifting rightward"),
        ("travels to the right", "travelling to the right"),
        ("glides toward the right", "gliding toward the right"),
        ("heads right", "heading right"),
    ),
    "up": (
        ("moves up", "moving up"),
        ("rises", "rising"),
        ("floats upward", "floating upward"),
        ("climbs toward the top", "climbing toward the top"),
        ("drifts up", "drifting up"),
        ("travels upward", "travelling upward"),
    ),
    "down": (
        ("moves down", "moving down"),
        ("falls", "falling"),
        ("sinks", "sinking"),
        ("drops toward the bottom", "dropping toward the bottom"),
        ("slides downward", "sliding downward"),
        ("drifts down", "drifting down"),
    ),
    "grow": (
        ("grows", "growing"),
        ("gets bigger", "getting bigger"),
        ("expands", "expanding"),
        ("becomes larger", "becoming larger"),
        ("swells", "swelling"),
        ("increases in size", "increasing in size"),
    ),
    "shrink": (
        ("shrinks", "shrinking"),
        ("gets smaller", "getting smaller"),
        ("contracts", "contracting"),
        ("becomes smaller", "becoming smaller"),
        ("decreases in size", "decreasing in size"),
    ),
}
# {a}/{b}: "a red circle" / "the blue box"; {v1}/{v2}: "moves left"; {i1}/{i2}: "moving left".
ONE_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {v1}.",
    "There is {a} that {v1}.",
    "We see {a} that {v1}.",
    "In this video, {a} {v1}.",
    "{a} is {i1}.",
    "{a} {v1} on a dark background.",
    "A video of {a} {i1}.",
    "On a plain background, {a} {v1}.",
)
TWO_OBJECT_TEMPLATES: tuple[str, ...] = (
    "{a} {v1} and {b} {v2}.",
    "{a} {v1} while {b} {v2}.",
    "{a} is {i1} as {b} is {i2}.",
    "Two shapes: {a} {v1}, and {b} {v2}.",
    "In this video, {a} {v1} while {b} {v2}.",
    "There is {a} that {v1} and {b} that {v2}.",
)

# Words `parse_caption` maps back to attributes. Motion keywords cover the phrases above and common variants
# a model might produce ("moving leftwards", "ascends").
_COLOUR_PATTERNS = {colour: rf"\b{colour}\b" for colour in COLOURS}
_SHAPE_PATTERNS = {
    "circle": r"\b(circles?|balls?|discs?|disks?|dots?)\b",
    "square": r"\b(squares?|box(es)?|blocks?)\b",
    "triangle": r"\b(triangles?|triangular)\b",
}
_MOTION_PATTERNS = {
    "left": r"\bleft(wards?)?\b",
    "right": r"\bright(wards?)?\b",
    "up": r"\b(up|upwards?|rises|rise|rising|climbs?|climbing|ascends?|ascending|top)\b",
    "down": r"\b(down|downwards?|falls?|falling|sinks?|sinking|drops?|dropping|descends?|descending|bottom)\b",
    "grow": r"\b(grows?|growing|expands?|expanding|swells?|swelling|bigger|larger|enlarges?|enlarging"
    r"|increases?|increasing)\b",
    "shrink": r"\b(shrinks?|shrinking|contracts?|contracting|smaller|decreases?|decreasing)\b",
}
_KEYWORDS = re.compile(
    "|".join(
        f"(?P<{kind}_{value}>{pattern})"
        for kind, patterns in (("colour", _COLOUR_PATTERNS), ("shape", _SHAPE_PATTERNS), ("motion", _MOTION_PATTERNS))
        for value, pattern in patterns.items()
    ),
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ObjectSpec:
    """One shape in a video: what it is, how it moves, and where it starts (pixels, at frame 0)."""

    colour: str
    shape: str
    motion: str
    x: float  # centre
    y: float
    size: float  # half-extent

    def attributes(self) -> dict[str, str]:
        return {"colour": self.colour, "shape": self.shape, "motion": self.motion}


@dataclass(frozen=True)
class VideoSpec:
    """Everything needed to render one video and write its annotation entry."""

    video_id: str
    objects: tuple[ObjectSpec, ...]
    captions: tuple[str, ...]

    def annotation(self) -> dict:
        return {
            "videoID": self.video_id,
            "enCap": list(self.captions),
            "attributes": {"objects": [obj.attributes() for obj in self.objects]},
        }


@dataclass(frozen=True)
class SyntheticDataset:
    """A generated dataset folder: where its videos and per-split annotation files are."""

    root: Path
    video_dir: Path
    annotation_paths: dict[str, Path]
    container: str

    @classmethod
    def from_root(cls, root: str | os.PathLike) -> SyntheticDataset:
        """Open a folder that `make_synthetic_dataset` completed (it has a manifest)."""
        root = Path(root)
        manifest = _read_json(root / "manifest.json")
        if manifest is None:
            raise FileNotFoundError(f"{root} holds no complete synthetic dataset (no readable manifest.json)")
        return _dataset(root, manifest["splits"], manifest["params"]["container"])

    @property
    def splits(self) -> list[str]:
        return list(self.annotation_paths)

    def video_path(self, video_id: str) -> Path:
        return self.video_dir / f"{video_id}.{self.container}"

    def entries(self, split: str) -> list[dict]:
        """The split's annotation entries, as written (VATEX format plus "attributes")."""
        return json.loads(self.annotation_paths[split].read_text(encoding="utf-8"))

    def video_ids(self, split: str) -> list[str]:
        return [entry["videoID"] for entry in self.entries(split)]

    def attributes(self, split: str) -> dict[str, dict]:
        """videoID -> {"objects": [{"colour", "shape", "motion"}, ...]}, for `attribute_accuracy`."""
        return {entry["videoID"]: entry["attributes"] for entry in self.entries(split)}


# --------------------------------------------------------------------------------------------------------
# Planning: draw every video's objects and captions from a per-video random stream.


def video_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one video, keyed by (seed, split, index).

    So a split's videos do not change when another split's count does. crc32, not hash(): Python's string
    hash differs between processes.
    """
    return np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])


def plan_video(
    video_id: str,
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 128),
    p_two_objects: float = DEFAULT_P_TWO_OBJECTS,
) -> VideoSpec:
    """Draw one video's objects and captions.

    Start size and position are drawn before, and independently of, the motion, from ranges that leave room
    for any motion: that is what makes frame 0 uninformative about the motion.
    """
    width, height = size
    side = min(width, height)
    travel = TRAVEL * side
    num_objects = 2 if rng.random() < p_two_objects else 1
    colours = rng.choice(len(COLOURS), size=num_objects, replace=False)  # distinct, to tell objects apart
    placed: list[tuple[float, float, float]] = []
    attempts = 0
    while len(placed) < num_objects:
        attempts += 1
        if attempts % 100 == 0:  # a first object that leaves no room for the second: place both again
            placed = []
        half = rng.uniform(*SIZE_RANGE) * side
        margin = max(half + travel, half * GROWTH)  # room for every motion, whichever this object gets
        x = rng.uniform(margin, width - margin)
        y = rng.uniform(margin, height - margin)
        # Objects must not overlap at frame 0 (they may cross later). Depends on start geometry only.
        if all(max(abs(x - ox), abs(y - oy)) > half + ohalf + 2 for ox, oy, ohalf in placed):
            placed.append((x, y, half))
    objects = tuple(
        ObjectSpec(
            colour=list(COLOURS)[int(colour)],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
            motion=MOTIONS[int(rng.integers(len(MOTIONS)))],
            x=x,
            y=y,
            size=half,
        )
        for colour, (x, y, half) in zip(colours, placed)
    )
    return VideoSpec(video_id=video_id, objects=objects, captions=tuple(draw_captions(objects, rng)))


def plan_dataset(
    num_videos: Mapping[str, int],
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    p_two_objects: float = DEFAULT_P_TWO_OBJECTS,
) -> dict[str, list[VideoSpec]]:
    """Every split's video specs, without rendering anything. IDs are `synth_<split>_<index>`."""
    return {
        split: [
            plan_video(f"synth_{split}_{index:05d}", video_rng(seed, split, index), size, p_two_objects)
            for index in range(count)
        ]
        for split, count in num_videos.items()
    }


def _noun_phrase(obj: ObjectSpec, determiner: str, shape_word: str) -> str:
    return f"{determiner} {obj.colour} {shape_word}"


def caption_variants(objects: Sequence[ObjectSpec]) -> Iterator[str]:
    """Every caption the templates can make for these objects (objects in the given order)."""
    templates = ONE_OBJECT_TEMPLATES if len(objects) == 1 else TWO_OBJECT_TEMPLATES
    choices = [
        list(itertools.product(("a", "the"), SHAPE_WORDS[obj.shape], MOTION_PHRASES[obj.motion])) for obj in objects
    ]
    for template in templates:
        for combo in itertools.product(*choices):
            yield _fill(template, objects, combo)


def _fill(template: str, objects: Sequence[ObjectSpec], combo: Sequence[tuple[str, str, tuple[str, str]]]) -> str:
    fields: dict[str, str] = {}
    for key, obj, (determiner, shape_word, (verb, progressive)) in zip("ab", objects, combo):
        fields[key] = _noun_phrase(obj, determiner, shape_word)
        fields["v1" if key == "a" else "v2"] = verb
        fields["i1" if key == "a" else "i2"] = progressive
    text = template.format(**fields)
    return text[0].upper() + text[1:]


def draw_captions(
    objects: Sequence[ObjectSpec], rng: np.random.Generator, count: int = CAPTIONS_PER_VIDEO
) -> list[str]:
    """`count` distinct captions for the objects, each from a random template, wording and object order."""
    templates = ONE_OBJECT_TEMPLATES if len(objects) == 1 else TWO_OBJECT_TEMPLATES
    captions: list[str] = []
    for _ in range(100 * count):  # the template space is far larger than count; the bound only guards a bug
        order = list(objects) if len(objects) == 1 or rng.random() < 0.5 else list(objects)[::-1]
        combo = []
        for obj in order:
            words = SHAPE_WORDS[obj.shape]
            phrases = MOTION_PHRASES[obj.motion]
            combo.append(
                (
                    ("a", "the")[int(rng.integers(2))],
                    words[int(rng.integers(len(words)))],
                    phrases[int(rng.integers(len(phrases)))],
                )
            )
        caption = _fill(templates[int(rng.integers(len(templates)))], order, combo)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could not draw {count} distinct captions for {objects}")


# --------------------------------------------------------------------------------------------------------
# Reading captions back: for per-attribute accuracy of generated captions.


def parse_caption(caption: str) -> dict:
    """Colour, shape and motion of each object a caption mentions: {"objects": [{"colour", "shape", "motion"}]}.

    Keywords (with the synonyms the templates use) are read left to right; a keyword whose slot the current
    object already holds starts a new object, unless it repeats the value ("climbs toward the top" is one
    motion). Slots a caption does not mention are None.
    """
    objects: list[dict[str, str | None]] = []
    for match in _KEYWORDS.finditer(caption):
        kind, value = match.lastgroup.split("_", 1)  # type: ignore[union-attr]
        if objects and objects[-1][kind] == value:
            continue
        if not objects or objects[-1][kind] is not None:
            objects.append({"colour": None, "shape": None, "motion": None})
        objects[-1][kind] = value
    return {"objects": objects}


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "motion")


def attribute_accuracy(predictions: Mapping[str, str], attributes: Mapping[str, Mapping]) -> dict[str, float]:
    """Per-attribute accuracy of generated captions against the recorded attributes.

    For each video with both a prediction and attributes, the parsed objects are matched to the true ones in
    the way that gets most attributes right (a caption may name the objects in either order). Returns the
    fraction of true objects whose colour / shape / motion was right, "object" (all three right), "video"
    (every object right and none extra) and "num_videos" (how many videos were scored).
    """
    video_ids = [video_id for video_id in predictions if video_id in attributes]
    if not video_ids:
        raise ValueError("no prediction has attributes: the two share no video ID")
    counts = dict.fromkeys((*ATTRIBUTES, "object"), 0)
    num_objects = 0
    exact_videos = 0
    for video_id in video_ids:
        truth = list(attributes[video_id]["objects"])
        guessed = parse_caption(predictions[video_id])["objects"][: len(truth) + 2]
        best = max(
            (_score(truth, assignment) for assignment in _assignments(guessed, len(truth))),
            key=lambda score: sum(score.values()),
        )
        for key in counts:
            counts[key] += best[key]
        num_objects += len(truth)
        exact_videos += best["object"] == len(truth) and len(guessed) == len(truth)
    result = {key: value / num_objects for key, value in counts.items()}
    result["video"] = exact_videos / len(video_ids)
    result["num_videos"] = float(len(video_ids))
    return result


def _assignments(guessed: list[dict], count: int) -> Iterator[tuple[dict | None, ...]]:
    padded: list[dict | None] = [*guessed, *([None] * count)]
    yield from itertools.permutations(padded, count)


def _score(truth: list[Mapping], assignment: Sequence[dict | None]) -> dict[str, int]:
    score = dict.fromkeys((*ATTRIBUTES, "object"), 0)
    for true, guess in zip(truth, assignment):
        right = [guess is not None and guess[key] == true[key] for key in ATTRIBUTES]
        for key, ok in zip(ATTRIBUTES, right):
            score[key] += ok
        score["object"] += all(right)
    return score


# --------------------------------------------------------------------------------------------------------
# Time controls: what proves a model reads the frames in order.

OPPOSITE_MOTION = {"left": "right", "right": "left", "up": "down", "down": "up", "grow": "shrink", "shrink": "grow"}


def reverse_time(frames, axis: int = -4):
    """The clip played backwards: frames (a numpy array or torch tensor) in reverse order along the time axis,
    (..., T, H, W, C) by default."""
    if isinstance(frames, np.ndarray):
        return np.flip(frames, axis=axis).copy()
    return frames.flip(axis)


def flip_motion(attributes: Mapping[str, list]) -> dict[str, list]:
    """The attributes of a video played backwards: every motion becomes its opposite (left <-> right, up <->
    down, grow <-> shrink); colours and shapes stay."""
    return {**attributes, "objects": [{**obj, "motion": OPPOSITE_MOTION[obj["motion"]]}
                                      for obj in attributes["objects"]]}


def first_frame_only(frames, axis: int = -4):
    """The single-frame control: every frame (numpy array or torch tensor) replaced by the first, so nothing
    moves while colour, shape, size and position stay those of frame 0."""
    if isinstance(frames, np.ndarray):
        return np.broadcast_to(np.take(frames, [0], axis=axis), frames.shape).copy()
    return frames.narrow(axis, 0, 1).expand_as(frames).contiguous()


# --------------------------------------------------------------------------------------------------------
# Rendering.


def object_state(obj: ObjectSpec, progress: float, size: tuple[int, int]) -> tuple[float, float, float]:
    """Centre x, centre y and half-extent of an object `progress` (0..1) of the way through the clip."""
    travel = TRAVEL * min(size)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(obj.motion, (0, 0))
    scale = {"grow": GROWTH, "shrink": 1 / GROWTH}.get(obj.motion, 1.0) ** progress
    return obj.x + dx * travel * progress, obj.y + dy * travel * progress, obj.size * scale


def _coverage(shape: str, cx: float, cy: float, half: float, height: int, width: int, samples: int = 4):
    """Anti-aliased coverage (0..1) of a shape within its bounding box: (y0, x0, array)."""
    x0, x1 = max(int(np.floor(cx - half)) - 1, 0), min(int(np.ceil(cx + half)) + 2, width)
    y0, y1 = max(int(np.floor(cy - half)) - 1, 0), min(int(np.ceil(cy + half)) + 2, height)
    offsets = (np.arange(samples) + 0.5) / samples
    xs = (np.arange(x0, x1)[:, None] + offsets[None, :]).reshape(-1) - cx
    ys = (np.arange(y0, y1)[:, None] + offsets[None, :]).reshape(-1) - cy
    dx, dy = np.meshgrid(xs, ys)
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape == "triangle":  # apex up, base 2*half wide at the bottom
        inside = (dy >= -half) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cover = inside.reshape(y1 - y0, samples, x1 - x0, samples).sum(axis=(1, 3), dtype=np.float32) / samples**2
    return y0, x0, cover


def render_video(spec: VideoSpec, size: tuple[int, int] = (128, 128), num_frames: int = 32) -> np.ndarray:
    """The video's RGB frames, (num_frames, height, width, 3) uint8, objects drawn in order."""
    width, height = size
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for t in range(num_frames):
        progress = t / (num_frames - 1) if num_frames > 1 else 0.0
        for obj in spec.objects:
            cx, cy, half = object_state(obj, progress, size)
            y0, x0, cover = _coverage(obj.shape, cx, cy, half, height, width)
            # Blend within the object's bounding box only: the rest of the frame stays as it is.
            box = (t, slice(y0, y0 + cover.shape[0]), slice(x0, x0 + cover.shape[1]))
            region = frames[box].astype(np.float32)
            region += cover[..., None] * (np.asarray(COLOURS[obj.colour], np.float32) - region)
            frames[box] = np.round(region).astype(np.uint8)
    return frames


# --------------------------------------------------------------------------------------------------------
# Encoding and the folder.


def available_encoder(container: str) -> str | None:
    """The encoder `container` ("mp4" or "webm") would use with this PyAV build, or None if it has none."""
    if container not in _ENCODERS:
        raise ValueError(f"container must be one of {sorted(_ENCODERS)}, not {container!r}")
    for name in _ENCODERS[container]:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # not built into this FFmpeg
            continue
        return name
    return None


_OPENS: dict[str, bool] = {}


def encoder_opens(codec: str) -> bool:
    """Whether `codec` can be opened in this process (False for VP8/VP9 once decord was imported before av)."""
    if codec not in _OPENS:
        context = av.CodecContext.create(codec, "w")
        context.width, context.height, context.pix_fmt = 32, 32, "yuv420p"
        context.time_base = Fraction(1, 8)
        try:
            context.open()
            _OPENS[codec] = True
        except av.error.FFmpegError:
            _OPENS[codec] = False
    return _OPENS[codec]


def encode_video(frames: np.ndarray, path: str | os.PathLike, fps: int = 8, container: str = "mp4") -> None:
    """Write RGB frames to `path` as yuv420p H.264 (mp4) or VP9/VP8 (webm), single-threaded for determinism."""
    codec = available_encoder(container)
    if codec is None:
        raise RuntimeError(f"this PyAV/FFmpeg build has none of the encoders {_ENCODERS[container]} for {container}")
    if not encoder_opens(codec):
        raise RuntimeError(
            f"{codec} cannot be opened in this process: decord was probably imported before av (it loads its own"
            " libvpx globally). Import av first, or use make_synthetic_dataset, which then encodes in a fresh process."
        )
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = dict(_ENCODER_OPTIONS.get(codec, {}))
        stream.codec_context.thread_count = 1  # the bitstream may depend on the thread count
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)


def make_synthetic_dataset(
    root: str | os.PathLike,
    num_videos: Mapping[str, int] | None = None,
    seed: int = 0,
    size: tuple[int, int] = (128, 128),
    num_frames: int = 32,
    fps: int = 8,
    container: str = "mp4",
    p_two_objects: float = DEFAULT_P_TWO_OBJECTS,
    single_frame: bool = False,
) -> SyntheticDataset:
    """Make the dataset in `root` if it is not there yet; return where its files are.

    `single_frame` makes the control dataset: the same videos and captions, but every frame is the video's
    frame 0 (`first_frame_only`), so nothing in it tells the motion.

    `size` is (width, height), both even (yuv420p). A complete folder made with the same arguments is returned
    untouched; one made with other arguments raises FileExistsError. A folder left half-written by an
    interrupted run is completed: videos are written under a temporary name and renamed, the manifest is
    written last, and concurrent calls on one folder wait for each other (a lock file).
    """
    num_videos = dict(DEFAULT_NUM_VIDEOS if num_videos is None else num_videos)
    width, height = size
    if width % 2 or height % 2 or min(width, height) < 32:
        raise ValueError(f"size must be (width, height), both even and at least 32, got {size}")
    if num_frames < 2 or fps < 1:
        raise ValueError(f"need num_frames >= 2 and fps >= 1, got {num_frames} and {fps}")
    if not num_videos or any(int(n) < 0 for n in num_videos.values()):
        raise ValueError(f"num_videos must map split names to counts >= 0, got {num_videos}")
    if not all(re.fullmatch(r"[A-Za-z0-9_-]+", split) for split in num_videos):
        raise ValueError(f"split names must be letters, digits, '_' or '-', got {list(num_videos)}")
    if not 0 <= p_two_objects <= 1:
        raise ValueError(f"p_two_objects must be in [0, 1], got {p_two_objects}")
    codec = available_encoder(container)
    if codec is None:
        raise RuntimeError(f"this PyAV/FFmpeg build cannot encode {container}: it has none of {_ENCODERS[container]}")
    if not encoder_opens(codec):
        return _make_in_fresh_process(
            root, num_videos=num_videos, seed=seed, size=size, num_frames=num_frames, fps=fps,
            container=container, p_two_objects=p_two_objects, single_frame=single_frame,
        )
    params = _normalise(
        {
            "format_version": FORMAT_VERSION,
            "num_videos": {split: int(n) for split, n in num_videos.items()},
            "seed": int(seed),
            "size": [width, height],
            "num_frames": int(num_frames),
            "fps": int(fps),
            "container": container,
            "p_two_objects": float(p_two_objects),
            "single_frame": bool(single_frame),
        }
    )
    root = Path(root)
    video_dir, annotation_dir = root / "videos", root / "annotations"
    video_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir.mkdir(parents=True, exist_ok=True)

    with _locked(root / ".lock"):
        manifest = _read_json(root / "manifest.json")
        if manifest is not None and manifest.get("params") != params:
            raise FileExistsError(
                f"{root} holds a synthetic dataset made with other parameters"
                f" ({_diff(manifest.get('params'), params)}); use another folder or delete this one"
            )
        plans = plan_dataset(num_videos, seed, (width, height), p_two_objects)
        splits = {split: [spec.video_id for spec in specs] for split, specs in plans.items()}
        if manifest is not None and _is_complete(root, splits, container):
            return _dataset(root, splits, container)

        # Videos already in the folder are kept only if a run with these very parameters wrote them.
        state_path = root / ".in_progress.json"
        trusted = manifest is not None or _read_json(state_path) == params
        (root / "manifest.json").unlink(missing_ok=True)
        _write_json_atomic(state_path, params)
        for stale in itertools.chain(video_dir.glob(".*.tmp"), annotation_dir.glob(".*.tmp"), root.glob(".*.tmp")):
            stale.unlink(missing_ok=True)  # partial files of an interrupted run; we hold the lock

        existing = set(os.listdir(video_dir)) if trusted else set()
        for spec in itertools.chain.from_iterable(plans.values()):
            name = f"{spec.video_id}.{container}"
            if name in existing:
                continue
            with storage.replacing(video_dir / name) as temporary:
                frames = render_video(spec, (width, height), num_frames)
                encode_video(first_frame_only(frames) if single_frame else frames, temporary, fps, container)
        for split, specs in plans.items():
            _write_json_atomic(annotation_dir / f"{split}.json", [spec.annotation() for spec in specs], indent=1)
        _write_json_atomic(root / "manifest.json", {"params": params, "splits": splits}, indent=1)
        state_path.unlink(missing_ok=True)
    return _dataset(root, splits, container)


def _make_in_fresh_process(root: str | os.PathLike, **arguments) -> SyntheticDataset:
    """Run make_synthetic_dataset in a new interpreter, where av is imported before decord."""
    package_parent = str(Path(__file__).resolve().parents[1])
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, environment.get("PYTHONPATH")]))
    arguments = {"root": os.fspath(root), **arguments, "size": list(arguments["size"])}
    code = (
        "import av, json, sys\n"
        "from stgpt.synthetic import make_synthetic_dataset\n"
        "arguments = json.loads(sys.argv[1])\n"
        "arguments['size'] = tuple(arguments['size'])\n"
        "make_synthetic_dataset(**arguments)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arguments)], env=environment, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"making the dataset in a fresh process failed:\n{result.stderr[-4000:]}")
    return SyntheticDataset.from_root(root)


def _dataset(root: Path, splits: Mapping[str, Sequence[str]], container: str) -> SyntheticDataset:
    return SyntheticDataset(
        root=root,
        video_dir=root / "videos",
        annotation_paths={split: root / "annotations" / f"{split}.json" for split in splits},
        container=container,
    )


def _is_complete(root: Path, splits: Mapping[str, Sequence[str]], container: str) -> bool:
    videos = set(os.listdir(root / "videos"))  # one listing, no stat per file
    annotations = set(os.listdir(root / "annotations"))
    return all(f"{split}.json" in annotations for split in splits) and all(
        f"{video_id}.{container}" in videos for ids in splits.values() for video_id in ids
    )


def _normalise(value):
    return json.loads(json.dumps(value))


def _diff(old: Mapping | None, new: Mapping) -> str:
    if not isinstance(old, Mapping):
        return "unreadable parameters"
    keys = sorted(set(old) | set(new))
    changed = [key for key in keys if old.get(key) != new.get(key)]
    return ", ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} asked" for key in changed)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, value, indent: int | None = None) -> None:
    storage.write_text(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def from_config(data: DataConfig) -> SyntheticDataset:
    """The synthetic dataset a config's `data` section describes, made under `data.root` if missing."""
    return make_synthetic_dataset(data.root, {"train": data.synthetic_train, "validation": data.synthetic_validation,
                                              "test": data.synthetic_test}, seed=data.synthetic_seed,
                                  single_frame=data.synthetic_single_frame)


# --------------------------------------------------------------------------------------------------------
# Damaged files, for the error paths of readers.

DAMAGED_KINDS: tuple[str, ...] = ("truncated", "empty", "random_bytes", "text")


def write_damaged_videos(folder: str | os.PathLike, source_video: str | os.PathLike) -> dict[str, Path]:
    """Write one unreadable video file per kind into `folder`: {kind: path}, named `damaged_<kind>.<ext>`.

    truncated: the first half of `source_video` (an mp4 loses its index, which PyAV writes at the end);
    empty: 0 bytes; random_bytes: 4 KiB of seeded random bytes; text: a text file named like a video.
    The extension is the source's (.mp4 or .webm).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(source_video).read_bytes()
    suffix = Path(source_video).suffix or ".mp4"
    contents = {
        "truncated": source[: len(source) // 2],
        "empty": b"",
        "random_bytes": np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes(),
        "text": b"This is a text file, not a video.\n",
    }
    paths = {}
    for kind in DAMAGED_KINDS:
        paths[kind] = folder / f"damaged_{kind}{suffix}"
        paths[kind].write_bytes(contents[kind])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m stgpt.synthetic ROOT`: make (or complete) a synthetic dataset and print where it is."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=DEFAULT_NUM_VIDEOS["train"])
    parser.add_argument("--validation", type=int, default=DEFAULT_NUM_VIDEOS["validation"])
    parser.add_argument("--test", type=int, default=DEFAULT_NUM_VIDEOS["test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--container", choices=sorted(_ENCODERS), default="mp4")
    args = parser.parse_args(argv)
    dataset = make_synthetic_dataset(
        args.root,
        {"train": args.train, "validation": args.validation, "test": args.test},
        seed=args.seed,
        size=(args.width, args.height),
        num_frames=args.num_frames,
        fps=args.fps,
        container=args.container,
    )
    annotations = {split: str(path) for split, path in dataset.annotation_paths.items()}
    print(json.dumps({"root": str(dataset.root), "annotations": annotations}))


if __name__ == "__main__":
    main()
