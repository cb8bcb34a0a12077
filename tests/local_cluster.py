"""A real local multi-node Ray cluster for tests that need one: `ray job submit`, separate `ray start` nodes.

Built on `cluster/local_cluster.sh`: a head plus `num_workers` worker nodes, each its own `ray start --block`
process with its own temp dir under a short private state dir in /tmp, on free ports. Stopping ends exactly this
cluster's processes (never `ray stop`, which would end every Ray instance on the machine, the session-wide
`ray_cluster` fixture of conftest.py included). A watcher stops the cluster if the test process dies without
leaving the `with` block.

    from local_cluster import local_ray_cluster      # tests/ is on sys.path under pytest

    def test_train_job(tmp_path):
        with local_ray_cluster(num_workers=1, cpus_per_node=2) as cluster:
            result = cluster.job_submit(["python", "jobs/train.py", "--config", "configs/tiny.yaml"],
                                        working_dir=REPO_ROOT, timeout=600)
            assert result.returncode == 0, result.stdout

`cluster.address` is the GCS address (for `ray.init(address=...)` in a subprocess), `cluster.dashboard_url` the
address for `ray job submit --address`. The nodes use Ray token authentication, so a client naming the address
must have RAY_AUTH_MODE=token in its environment: run subprocesses with `env=cluster.env` (or use `job_submit`).
Do not call `ray.init(address=cluster.address)` inside the pytest process: it is already connected to the session
cluster of conftest.py.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "cluster" / "local_cluster.sh"


def _proc_start_time(pid: int) -> str | None:
    """The start time of a live (non-zombie) process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class LocalRayCluster:
    address: str                     # GCS address, host:port
    dashboard_url: str               # http://127.0.0.1:PORT, for `ray job submit --address`
    state_dir: Path                  # logs: <state_dir>/node*.log, Ray session logs under <state_dir>/node*/
    num_nodes: int
    env: dict[str, str]              # environment for clients: this venv's `ray` first on PATH, RAY_AUTH_MODE
    processes: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (pid, start time)

    @property
    def ray_executable(self) -> str:
        return self.env.get("RAY") or shutil.which("ray", path=self.env.get("PATH")) or "ray"

    def alive_processes(self) -> list[int]:
        """PIDs of the recorded `ray start` processes (and the watcher) still running."""
        return [pid for pid, start in self.processes.values() if _proc_start_time(pid) == start]

    def job_submit(self, entrypoint: Sequence[str], working_dir: str | os.PathLike | None = None,
                   runtime_env_json: str | None = None, extra_args: Sequence[str] = (),
                   timeout: float = 600, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `ray job submit --address <dashboard> [--working-dir DIR] -- ENTRYPOINT...` and wait for the job.

        Returns the finished `ray job submit` (returncode 0 when the job succeeded; stdout holds the job's logs
        and stderr merged)."""
        cmd = [self.ray_executable, "job", "submit", "--address", self.dashboard_url]
        if working_dir is not None:
            cmd += ["--working-dir", str(working_dir)]
        if runtime_env_json is not None:
            cmd += ["--runtime-env-json", runtime_env_json]
        cmd += [*extra_args, "--", *entrypoint]
        return subprocess.run(cmd, env={**self.env, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _client_env() -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if (Path(bindir) / "ray").exists():
        env.setdefault("RAY", str(Path(bindir) / "ray"))
    env.pop("RAY_ADDRESS", None)
    return env


def _run_script(args: Sequence[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=dict(env), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


@contextlib.contextmanager
def local_ray_cluster(num_workers: int = 1, cpus_per_node: int = 1, object_store_mb: int = 256,
                      start_timeout: float = 240, keep_logs: bool | None = None) -> Iterator[LocalRayCluster]:
    """Start a head plus `num_workers` worker nodes (each with `cpus_per_node` CPUs); stop them on exit.

    Raises RuntimeError if the cluster does not start, or (when the body itself succeeded) if stopping leaves a
    process behind. The state dir (node logs) is removed afterwards unless `keep_logs` (default: the
    STGPT_KEEP_CLUSTER_LOGS environment variable) is set or the body failed.
    """
    if keep_logs is None:
        keep_logs = bool(os.environ.get("STGPT_KEEP_CLUSTER_LOGS"))
    env = _client_env()
    # A short path: Ray's unix sockets live under <temp dir>/session_.../sockets (at most 107 characters).
    state_dir = Path(tempfile.mkdtemp(prefix="stgpt-lc-", dir="/tmp"))
    started = _run_script(["start", "--workers", str(num_workers), "--cpus", str(cpus_per_node),
                           "--object-store-mb", str(object_store_mb), "--state-dir", str(state_dir),
                           "--owner-pid", str(os.getpid()), "--timeout", str(int(start_timeout))],
                          env, timeout=start_timeout + 60)
    if started.returncode != 0:
        _run_script(["stop", "--state-dir", str(state_dir)], env, timeout=90)
        raise RuntimeError(f"local Ray cluster did not start (logs in {state_dir}):\n{started.stdout}")
    values = dict(line.split("=", 1) for line in (state_dir / "cluster.env").read_text().splitlines()
                  if "=" in line and not line.startswith("#"))
    processes = {}
    for line in (state_dir / "pids").read_text().splitlines():
        name, pid, start = line.split()
        processes[name] = (int(pid), start)
    env["RAY_AUTH_MODE"] = values.get("RAY_AUTH_MODE", "token")
    cluster = LocalRayCluster(address=values["GCS_ADDRESS"], dashboard_url=values["DASHBOARD_URL"],
                              state_dir=state_dir, num_nodes=int(values["NUM_NODES"]), env=env,
                              processes=processes)
    body_failed = False
    try:
        yield cluster
    except BaseException:
        body_failed = True
        raise
    finally:
        stopped = _run_script(["stop", "--state-dir", str(state_dir)], env, timeout=90)
        left = cluster.alive_processes()
        if not body_failed and not keep_logs and not left and stopped.returncode == 0:
            shutil.rmtree(state_dir, ignore_errors=True)
        if not body_failed and (left or stopped.returncode != 0):
            raise RuntimeError(f"stopping the local Ray cluster left processes {left} running "
                               f"(logs in {state_dir}):\n{stopped.stdout}")
