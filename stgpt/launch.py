"""One entry path for every job: the shared argument parser, `connect(cfg)` to Ray, and the exit statuses.

A job is parse (`job_parser` + `parse`), connect, call the library, print, exit status. `connect` joins the
cluster of `RAY_ADDRESS` (`ray job submit` sets it; `auto` joins a `ray start` cluster on this machine) or of
`cluster.address`, else starts a private local Ray sized for the job's plan; the library never starts Ray.
`exits` turns the library's errors into the statuses every job documents: 2 when nothing was done (bad
arguments, inputs or config, or the job cannot fit its cluster), 1 when it ran but failed or stalled.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import socket
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import ray

from stgpt.annotations import AnnotationError
from stgpt.config import CONFIG_DIR, Config, ConfigError, load_config
from stgpt.resources import Plan, ResourceError

DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"
# Errors that mean nothing was done: the job says why and exits 2.
USAGE_ERRORS: tuple[type[BaseException], ...] = (AnnotationError, ConfigError, ResourceError, FileNotFoundError,
                                                 NotADirectoryError)


def job_parser(doc: Optional[str], config: Optional[str] = str(DEFAULT_CONFIG)) -> argparse.ArgumentParser:
    """The parser every job starts from: its docstring as help, `--config` and `key=value` overrides."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=config, help="YAML config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (section.key=value)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, Config]:
    """The flags and the config they name, overrides applied (before or after the options); ConfigError if bad."""
    args = parser.parse_intermixed_args(argv)
    return args, load_config(args.config, args.overrides)


def cluster_address(cfg: Config) -> Optional[str]:
    """The cluster a job joins: `RAY_ADDRESS`, else `cluster.address`; None: a new local Ray."""
    return os.environ.get("RAY_ADDRESS") or cfg.cluster.address


def local_cpus(plan: Optional[Plan]) -> int:
    """A local Ray's CPUs: the machine's, or as many as the plan asks for at once if that is more (an `auto`
    group counts one bundle: it shrinks to what there is)."""
    needed = 0.0
    if plan is not None:
        needed = plan.spare_cpus + sum((1 if group.auto else group.count) * group.bundle.get("CPU", 0.0)
                                       for group in plan.groups)
    return max(os.cpu_count() or 1, math.ceil(needed))


@contextmanager
def connect(cfg: Config, plan: Optional[Plan] = None, **init_kwargs) -> Iterator[None]:
    """Connect this process to Ray for the job's duration (a no-op when it already is, as in tests)."""
    if ray.is_initialized():
        yield
        return
    address = cluster_address(cfg)
    if address:
        ray.init(address=address, **init_kwargs)
    else:
        start_local_ray(local_cpus(plan), **init_kwargs)
    try:
        yield
    finally:
        ray.shutdown()  # stop our workers before exit, rather than have them killed mid-teardown


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """A private local Ray (never another user's `ray start` cluster) whose dashboard is on a free port named in
    the job's environment: Ray Train's placement-group cleaner asks the state API whether the run's controller is
    alive, and given no address the state API picks the newest Ray on the machine, which may be another one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = {"include_dashboard": True, "dashboard_port": port,
               "runtime_env": {"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}, **init_kwargs}
    ray.init(address="local", num_cpus=num_cpus, **options)


def exits(usage: tuple[type[BaseException], ...] = (), failed: tuple[type[BaseException], ...] = ()
          ) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a job's `main`: its own status, else 2 for a usage error (`USAGE_ERRORS` + `usage`: nothing was
    done) and 1 for one of `failed` (it ran, but failed), each with one line on stderr saying why."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except USAGE_ERRORS + usage as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except failed as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        return run
    return decorate
