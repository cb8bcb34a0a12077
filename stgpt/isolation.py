"""Decode untrusted videos in a child process that may die: a crash, hang or bomb costs that one video.

`sample_video_isolated` runs `stgpt.video.sample_video` in a process forked from a small, single-threaded fork
server (started once per process, holding only PyAV and numpy), so a start costs milliseconds and no torch or
Ray state is copied. The child runs under `RLIMIT_AS` (`video.decode_memory_mb` above what it started with) and
`RLIMIT_CPU`, and is killed at the deadline (`video.decode_timeout_s`, or less when the caller has less time),
so a request timeout also stops its decode work. Whatever happens, the caller gets the frames or one
`VideoDecodeError` saying why (crashed with a signal, over a limit, out of memory, too slow); the calling
process and its other work carry on.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
from typing import Any, Iterator

from stgpt.config import VideoConfig

from stgpt.video import (SampledVideo, SampledWindow, VideoDecodeError, VideoLimitError, VideoSource,
                         describe_source, read_windows, sample_video)

# Fault injection for the tests of this isolation (never set in production): with this variable set to 1, a
# child given bytes that start with one of these markers crashes, hangs or exhausts its memory, as a hostile file
# can make a decoder do.
FAULTS_ENV = "STGPT_TEST_DECODER_FAULTS"
CRASH, HANG, MEMORY_BOMB = b"STGPT-TEST-CRASH", b"STGPT-TEST-HANG", b"STGPT-TEST-MEMORY"

_context_lock = threading.Lock()
_start_lock = threading.Lock()
_context: Any = None


def sample_video_isolated(source: VideoSource, video: VideoConfig, name: str | None = None,
                          timeout_s: float | None = None) -> SampledVideo:
    """`sample_video` in a child process; `timeout_s` (default `video.decode_timeout_s`) bounds its wall time."""
    label = name or describe_source(source)
    deadline = video.decode_timeout_s if timeout_s is None else min(timeout_s, video.decode_timeout_s)
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    elif not isinstance(source, bytes):
        source = os.fspath(source)
    receiver, sender = _fork_context().Pipe(duplex=False)
    child = _fork_context().Process(target=_child_main, args=(sender, source, video, label), daemon=True)
    _start_without_main(child)
    sender.close()
    try:
        if not receiver.poll(max(0.0, deadline)):
            raise VideoDecodeError(label, f"decoding took longer than {deadline:g}s (stopped)")
        try:
            status, value = receiver.recv()
        except (EOFError, OSError):
            child.join(5)
            raise VideoDecodeError(label, _death(child.exitcode)) from None
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)
    if status != "ok":
        _raise(label, status, value)
    return value


def read_windows_isolated(source: VideoSource, video: VideoConfig, window_s: float, stride_s: float | None = None,
                          name: str | None = None) -> Iterator[SampledWindow]:
    """`read_windows` in a child process, streamed: each window comes through the pipe as it is read, and the
    child waits (the pipe is full) until the caller takes it, so a long video never piles up in memory. Each
    window must arrive within `video.decode_timeout_s`; the CPU budget is per window (no RLIMIT_CPU here)."""
    label = name or describe_source(source)
    source = bytes(source) if isinstance(source, (bytearray, memoryview)) else (
        source if isinstance(source, bytes) else os.fspath(source))
    receiver, sender = _fork_context().Pipe(duplex=False)
    child = _fork_context().Process(target=_windows_child_main, args=(sender, source, video, label, window_s,
                                                                       stride_s), daemon=True)
    _start_without_main(child)
    sender.close()
    try:
        while True:
            if not receiver.poll(max(0.0, video.decode_timeout_s)):
                raise VideoDecodeError(label, f"the next window took longer than {video.decode_timeout_s:g}s "
                                              f"(stopped)")
            try:
                status, value = receiver.recv()
            except (EOFError, OSError):
                child.join(5)
                raise VideoDecodeError(label, _death(child.exitcode)) from None
            if status == "window":
                yield value
            elif status == "done":
                return
            else:
                _raise(label, status, value)
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()
        child.join(5)


def _windows_child_main(sender, source, video: VideoConfig, label: str, window_s: float,
                        stride_s: float | None) -> None:
    _limit_resources(video, cpu=False)
    try:
        if os.environ.get(FAULTS_ENV) == "1":
            _inject_fault(source)
        for window in read_windows(source, video, window_s, stride_s, name=label):
            sender.send(("window", window))
        result: tuple[str, Any] = ("done", None)
    except Exception as exc:
        result = _failure(exc, video)
    sender.send(result)


def _failure(exc: Exception, video: VideoConfig) -> tuple[str, Any]:
    """What a child sends back for an exception; `_raise` turns it into the caller's error."""
    if isinstance(exc, VideoLimitError):
        return "limit", (exc.limit, exc.reason.rsplit(" (limit: ", 1)[0])
    if isinstance(exc, VideoDecodeError):
        return "error", exc.reason
    if isinstance(exc, MemoryError):
        return "error", f"the decoder ran out of its memory limit (video.decode_memory_mb={video.decode_memory_mb})"
    return "error", f"unexpected {type(exc).__name__}: {exc}"[:500]


def _raise(label: str, status: str, value: Any) -> None:
    if status == "limit":
        raise VideoLimitError(label, value[0], value[1])
    raise VideoDecodeError(label, value)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        signum = -exitcode
        if signum == signal.SIGXCPU:
            return "the decoder ran over its CPU time limit (video.decode_cpu_seconds) and was stopped"
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else str(signum)
        return f"the decoder crashed on this file (killed by {name})"
    return f"the decoder crashed on this file (exit status {exitcode})"


def _start_without_main(child) -> None:
    """Start `child` without re-running the parent's `__main__` in it.

    multiprocessing's spawn-family start methods re-import the parent's main script in every child so that
    functions defined there unpickle; the child here runs only `_child_main`, and re-running a job script (torch,
    Ray, its own start-up) would cost seconds and could have side effects. So the main-module entries are left
    out of the preparation data while this child starts (a lock keeps two starts from interleaving).
    """
    from multiprocessing import spawn

    with _start_lock:
        original = spawn.get_preparation_data

        def without_main(name):
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        spawn.get_preparation_data = without_main
        try:
            child.start()
        finally:
            spawn.get_preparation_data = original


def _fork_context():
    """The fork server context, its server preloaded with this module (PyAV and numpy; never torch)."""
    global _context
    with _context_lock:
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["stgpt.isolation"])
            _context = context
        return _context


def _child_main(sender, source: str | bytes, video: VideoConfig, label: str) -> None:
    _limit_resources(video)
    try:
        if os.environ.get(FAULTS_ENV) == "1":
            _inject_fault(source)
        result: tuple[str, Any] = ("ok", sample_video(source, video, name=label))
    except Exception as exc:  # a decoder bug surfacing as an exception too: this video's error, not the caller's
        result = _failure(exc, video)
    try:
        sender.send(result)
    except MemoryError:
        sender.send(("error", "the decoded frames did not fit the decoder's memory limit"))


def _inject_fault(source: str | bytes) -> None:
    if isinstance(source, str):
        with open(source, "rb") as handle:
            source = handle.read(32)
    if source.startswith(CRASH):
        os.kill(os.getpid(), signal.SIGSEGV)
    if source.startswith(HANG):
        while True:
            pass
    if source.startswith(MEMORY_BOMB):
        hog = [bytearray(64 * 1024 * 1024) for _ in range(1024)]  # 64 GiB: past any decode_memory_mb
        del hog


def _limit_resources(video: VideoConfig, cpu: bool = True) -> None:
    """Address space and CPU limits for this child (Linux and macOS; elsewhere only the deadline applies)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    if cpu:
        seconds = int(math.ceil(video.decode_cpu_seconds)) + 1  # the reader stops itself first, more clearly
        resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    try:
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        used = 0
    limit = used + video.decode_memory_mb * 1024 * 1024
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):  # pragma: no cover - a platform without RLIMIT_AS (macOS ignores it)
        pass
