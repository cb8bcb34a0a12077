"""What a job asks of its cluster, whether the cluster can give it, and a watchdog for a job that stops moving.

Ray queues a demand it cannot place and waits, so a job asking for more than its cluster holds hangs silently
(two training workers holding both CPUs of a 2-core node while Ray Data's read task waits for a third). Before
a job starts its workers it builds a `Plan` (groups of equal bundles: training workers, captioning actors,
replicas, plus the CPUs its data pipeline keeps beside them) and `ensure_fits` compares it with the alive nodes:
it fits, or it shrinks a group whose size is `auto`, or, on a cluster with an autoscaler, it waits (saying for
what) up to `cluster.wait_for_nodes_s`, or it raises `ResourceError` naming the numbers and the override that
fixes it (jobs exit 2). The CPUs left beside the workers are Ray Data's budget (Ray Train 2.60 gives Ray Data
what the cluster has outside the workers' placement group).
`Watchdog` watches a job's progress (`beat()`, or a probe such as a heartbeat file's mtime) and reports what Ray
has pending when nothing finished for `cluster.stall_warn_s`, failing past `cluster.stall_fail_s`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import ray

from stgpt.config import ClusterConfig, Config

AUTO = "auto"
AUTO_CEILING = 10_000  # an `auto` group grows to what the cluster holds, this at most
POLL_S = 5.0  # how often a job waiting for an autoscaler looks again


class ResourceError(RuntimeError):
    """The job cannot fit the cluster (jobs exit 2), or it stalled (the watchdog's report)."""


@dataclass
class Group:
    """`count` equal bundles the job asks for at once (training workers, a captioning pool, Serve replicas)."""

    name: str
    count: int
    bundle: dict[str, float]
    key: str  # the config key that sets `count`, named in messages
    auto: bool = False  # count is an upper bound: fit as many as the cluster holds, at least one
    minimum: int = 1


@dataclass
class Plan:
    job: str
    groups: list[Group]
    spare_cpus: float = 0.0  # CPUs that must stay free beside the groups (Ray Data's tasks)
    spare_key: str = "cluster.data_cpus"

    def describe(self) -> str:
        parts = [f"{g.count} {g.name} x {_fmt(g.bundle)}" for g in self.groups]
        if self.spare_cpus:
            parts.append(f"{self.spare_cpus:g} CPU for Ray Data beside them")
        total = _add(*[{k: v * g.count for k, v in g.bundle.items()} for g in self.groups], {"CPU": self.spare_cpus})
        return f"{self.job} asks for {' + '.join(parts)} = {_fmt(total)}"


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()) if v) or "nothing"


def _add(*dicts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


# ----------------------------------------------------------------------------------------------------------
# What the cluster has


@dataclass
class ClusterView:
    nodes: list[dict[str, float]]  # each alive node's total resources
    autoscaling: bool = False

    @property
    def total(self) -> dict[str, float]:
        return _add(*self.nodes)

    def describe(self) -> str:
        shapes = Counter(_fmt({k: v for k, v in n.items() if k in ("CPU", "GPU")}) for n in self.nodes)
        nodes = "; ".join(f"{c} x ({s})" if c > 1 else f"({s})" for s, c in shapes.items())
        return (f"the cluster has {_fmt({k: v for k, v in self.total.items() if k in ('CPU', 'GPU')})} "
                f"on {len(self.nodes)} node(s): {nodes}{' (autoscaling)' if self.autoscaling else ''}")


def cluster_view(autoscaling: Optional[bool] = None) -> ClusterView:
    """The connected cluster's alive nodes (logical resources, as the scheduler counts them)."""
    nodes = [{k: float(v) for k, v in n.get("Resources", {}).items() if not k.startswith(("node:", "memory",
                                                                                          "object_store"))}
             for n in ray.nodes() if n.get("Alive")]
    return ClusterView(nodes, autoscaler_running() if autoscaling is None else autoscaling)


def autoscaler_running() -> bool:
    """Whether an autoscaler that can add nodes watches this cluster. A plain `ray start` head runs Ray's monitor
    too, with a read-only provider whose node types are the nodes themselves (`node_<id>`); a real autoscaler
    names node types from its config (`cpu-worker`, `gpu-group`), or has launches pending."""
    import json

    types: set[str] = set()
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
        if report.get("pending_launches"):
            return True
        types.update(report.get("active_nodes") or {})
        types.update(p[1] for p in report.get("pending_nodes") or [] if len(p) > 1)
    except Exception:  # noqa: BLE001 - no report (autoscaler v2, or none): look at v2's status below
        pass
    if not types:
        try:
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            if status.pending_launches:
                return True
            types.update(n.ray_node_type_name for n in status.active_nodes if n.ray_node_type_name)
        except Exception:  # noqa: BLE001
            return False
    return any(not name.startswith("node_") for name in types)


def fits(plan: Plan, cluster: ClusterView) -> bool:
    """Whether every bundle of `plan` has a node to go on (largest first, first fit), with `spare_cpus` left
    in all, at least one whole CPU (or all of it, if less) on one node so a task of 1 CPU can run."""
    free = [dict(n) for n in cluster.nodes]
    bundles = sorted((g.bundle for g in plan.groups for _ in range(g.count)),
                     key=lambda b: (b.get("GPU", 0.0), b.get("CPU", 0.0)), reverse=True)
    for bundle in bundles:
        for node in sorted(free, key=lambda n: n.get("CPU", 0.0)):  # tightest node first, as PACK does
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items() if v):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    if plan.spare_cpus <= 0:
        return True
    left = [n.get("CPU", 0.0) for n in free]
    return sum(left) >= plan.spare_cpus - 1e-9 and max(left, default=0.0) >= min(1.0, plan.spare_cpus) - 1e-9


def fit_plan(plan: Plan, cluster: ClusterView) -> Plan | None:
    """`plan` with its `auto` groups as large as fits (each at most its count, at least its minimum), or None."""
    plan = dataclasses.replace(plan, groups=[dataclasses.replace(g) for g in plan.groups])
    for group in plan.groups:
        if group.auto:
            ceiling = group.count
            group.count = group.minimum
            while group.count < ceiling and fits(_with(plan, group, group.count + 1), cluster):
                group.count += 1
    return plan if fits(plan, cluster) else None


def _with(plan: Plan, group: Group, count: int) -> Plan:
    return dataclasses.replace(plan, groups=[dataclasses.replace(g, count=count) if g is group else g
                                             for g in plan.groups])


def explain(plan: Plan, cluster: ClusterView) -> str:
    """Why `plan` does not fit, and the overrides that make it fit this cluster."""
    fixes = []
    for group in plan.groups:
        best = max((n for n in range(group.minimum, group.count) if fits(_with(plan, group, n), cluster)), default=0)
        if best:
            fixes.append(f"{group.key}={best}")
    if plan.spare_cpus and fits(dataclasses.replace(plan, spare_cpus=0.0), cluster):
        fixes.append(f"a cluster with {plan.spare_cpus:g} more CPU (Ray Data's reads need them; "
                     f"{plan.spare_key} sets how many)")
    fixes.append("a bigger cluster")
    return f"{plan.describe()}; {cluster.describe()}. It cannot fit: use {' or '.join(fixes)}"


def ensure_fits(plan: Plan, cfg: ClusterConfig, log: Callable[[str], None] = print,
                view: Callable[[], ClusterView] | None = None) -> Plan:
    """The plan fitted to the connected cluster (auto groups sized); raises ResourceError if it cannot fit.

    On an autoscaling cluster it waits up to `cfg.wait_for_nodes_s` for nodes, logging what it waits for."""
    view = view or (lambda: cluster_view(cfg.autoscaling))
    cluster = view()
    fitted = fit_plan(plan, cluster)
    if fitted is None and cluster.autoscaling:
        # Auto groups wait for their full size only as long as nothing fits; a fixed plan waits for its nodes.
        log(f"waiting up to {cfg.wait_for_nodes_s:g} s for the autoscaler: {plan.describe()}; "
            f"{cluster.describe()}")
        deadline = time.monotonic() + cfg.wait_for_nodes_s
        _request(plan)
        while fitted is None and time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            cluster = view()
            fitted = fit_plan(plan, cluster)
    if fitted is None:
        raise ResourceError(explain(plan, cluster))
    for before, after in zip(plan.groups, fitted.groups):
        if before.auto:
            log(f"{before.key}=auto: {after.count} {after.name} ({cluster.describe()})")
    return fitted


def _request(plan: Plan) -> None:
    """Ask an autoscaler for the plan's bundles up front (it would see them one at a time otherwise)."""
    try:
        from ray.autoscaler.sdk import request_resources

        bundles = [g.bundle for g in plan.groups for _ in range(g.count)]
        if plan.spare_cpus:
            bundles.append({"CPU": plan.spare_cpus})
        request_resources(bundles=bundles)
    except Exception:  # noqa: BLE001 - best effort: the demands themselves reach the autoscaler anyway
        pass


# ----------------------------------------------------------------------------------------------------------
# The jobs' plans


def training_plan(cfg: Config) -> Plan:
    t = cfg.train
    return _pool_plan("training", "training worker(s)", "train.num_workers", t.num_workers, t.cpus_per_worker,
                      t.use_gpu, cfg.cluster.data_cpus)


def evaluation_plan(cfg: Config) -> Plan:
    e = cfg.evaluate
    return _pool_plan("evaluation", "captioning actor(s)", "evaluate.num_actors", e.num_actors, e.cpus_per_actor,
                      e.use_gpu, cfg.cluster.data_cpus)


def _pool_plan(job: str, name: str, key: str, count: int | str, cpus: float, use_gpu: bool,
               data_cpus: float) -> Plan:
    """A pool of `count` equal workers (`auto`: as many as fit, up to AUTO_CEILING), Ray Data's CPUs beside it."""
    auto = count == AUTO
    bundle = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    return Plan(job, [Group(name, AUTO_CEILING if auto else int(count), bundle, key, auto=auto)],
                spare_cpus=data_cpus)


def preprocessing_plan(cfg: Config) -> Plan:
    """At least one decoding actor (its pool grows to what the cluster holds); merge tasks take no CPU."""
    p = cfg.preprocess
    bundle = {"CPU": p.num_cpus_per_task, **({"memory": p.memory_per_task_mb * 2**20} if p.memory_per_task_mb else {})}
    return Plan("preprocessing", [Group("decoding actor(s)", p.concurrency or 1, bundle, "preprocess.concurrency",
                                        auto=p.concurrency is None)], spare_cpus=0.0)


def serving_plan(min_replicas: int, ray_actor_options: dict[str, Any]) -> Plan:
    bundle = {"CPU": float(ray_actor_options.get("num_cpus", 1.0)), "GPU": float(ray_actor_options.get("num_gpus", 0))}
    return Plan("serving", [Group("replica(s)", max(1, min_replicas), bundle, "min_replicas")])


def fit_training(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """`cfg` with `train.num_workers` a number that fits the connected cluster beside Ray Data's CPUs."""
    fitted = ensure_fits(training_plan(cfg), cfg.cluster, log)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=fitted.groups[0].count))


def fit_evaluation(cfg: Config, log: Callable[[str], None] = print) -> Config:
    """`cfg` with `evaluate.num_actors` a number that fits the connected cluster beside Ray Data's reads."""
    fitted = ensure_fits(evaluation_plan(cfg), cfg.cluster, log)
    return dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, num_actors=fitted.groups[0].count))


# ----------------------------------------------------------------------------------------------------------
# Stall watchdog


def pending_report(limit: int = 8) -> str:
    """What Ray is waiting to place: the scheduler's resource demands (what `ray status` shows), the tasks,
    actors and placement groups pending in the state API (their names say which Ray Data operator), free CPUs."""
    lines = []
    gcs = ray.get_runtime_context().gcs_address
    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        demands = get_cluster_status(gcs).resource_demands
        shapes = [f"{r.count} x {{{_fmt(r.bundle)}}}"
                  for d in demands.ray_task_actor_demand for r in d.bundles_by_count]
        shapes += [f"placement group {{{' + '.join(_fmt(r.bundle) for r in d.bundles_by_count)}}}"
                   for d in demands.placement_group_demand]
        lines.append(f"resource demands: {', '.join(shapes[:limit]) or 'none'}")
    except Exception as exc:  # noqa: BLE001 - best effort: the state API below may still answer
        lines.append(f"(no resource demands from the GCS: {type(exc).__name__}: {exc})")
    try:
        from ray.util.state import list_actors, list_placement_groups, list_tasks

        options = {"address": gcs, "limit": 500, "raise_on_missing_output": False}
        tasks = list_tasks(filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")], **options)
        counts = Counter((t.name, _fmt(t.required_resources)) for t in tasks if t.required_resources)
        for (name, needs), n in counts.most_common(limit):
            lines.append(f"{n} task(s) {name} waiting for {needs}")
        actors = list_actors(filters=[("state", "=", "PENDING_CREATION")], **options)
        for a in [a for a in actors if not a.class_name.startswith("_")][:limit]:  # not Ray Data's own helpers
            lines.append(f"actor {a.class_name} waiting to be placed")
        for pg in list_placement_groups(filters=[("state", "=", "PENDING")], **options)[:limit]:
            lines.append(f"placement group {pg.name or pg.placement_group_id[:8]} waiting for "
                         + " + ".join(_fmt(b.get("unit_resources", {})) for b in pg.bundles or []))
    except Exception as exc:  # noqa: BLE001 - the state API needs the dashboard; say so instead of failing
        lines.append(f"(Ray's state API did not answer: {type(exc).__name__}: {exc})")
    lines += _data_operators(limit)
    try:
        total, free = ray.cluster_resources(), ray.available_resources()
        lines.append(f"free: {_fmt({k: free.get(k, 0.0) for k in ('CPU', 'GPU') if k in total}) or '0 CPU'} of "
                     f"{_fmt({k: total[k] for k in ('CPU', 'GPU') if k in total})}")
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(lines)


def _data_operators(limit: int) -> list[str]:
    """Ray Data's running datasets of this job and their unfinished operators, from Ray Data's stats actor."""
    try:
        from ray.data._internal.stats import STATS_ACTOR_NAME, STATS_ACTOR_NAMESPACE

        actor = ray.get_actor(STATS_ACTOR_NAME, namespace=STATS_ACTOR_NAMESPACE)
        datasets = ray.get(actor.get_datasets.remote(ray.get_runtime_context().get_job_id()), timeout=10)
    except Exception:  # noqa: BLE001 - no dataset ran in this job, or an older Ray: nothing to add
        return []
    lines = []
    for tag, state in datasets.items():
        if state.get("state") in ("FINISHED", "FAILED"):
            continue
        ops = [f"{name} {op.get('state', '?').lower()} {op.get('progress', 0)}/{op.get('total', 0) or '?'} "
               f"blocks, {op.get('queued_blocks', 0)} queued" for name, op in (state.get("operators") or {}).items()
               if op.get("state") != "FINISHED"]
        lines.append(f"Ray Data {tag}: {'; '.join(ops[:limit]) or state.get('state')}")
    return lines[:limit]


_ACTIVE: list["Watchdog"] = []


def beat() -> None:
    """Tell every running watchdog of this process that something finished (a step, a row, a caption)."""
    for watchdog in list(_ACTIVE):
        watchdog.beat()


def exit_stalled(message: str) -> None:
    """A job's stall action: print the report and end the driver (Ray then ends its workers)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


@dataclass
class Watchdog:
    """Context manager: while it runs, a thread checks that `what` keeps finishing.

    Progress is `beat()` (or the module's `beat()`) or a change in `probe()`'s value (e.g. a heartbeat file's
    mtime written by workers). Idle for `warn_s`: logs the pending report (again every `warn_s`); idle for
    `fail_s` (0: never): calls `on_fail(message)`, by default raising nothing but logging; jobs pass
    `exit_stalled`."""

    what: str
    warn_s: float
    fail_s: float
    on_fail: Callable[[str], None] | None = None
    probe: Callable[[], Any] | None = None
    diagnose: Callable[[], str] = pending_report
    log: Callable[[str], None] = print
    interval_s: float | None = None
    failed: str | None = field(default=None, init=False)
    _last: float = field(default=0.0, init=False)
    _token: Any = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)

    @classmethod
    def from_config(cls, what: str, cfg: ClusterConfig, **kwargs) -> "Watchdog":
        return cls(what, cfg.stall_warn_s, cfg.stall_fail_s, **kwargs)

    def beat(self) -> None:
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        self._last = time.monotonic()
        self._token = self._read_probe()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        _ACTIVE.append(self)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def _read_probe(self) -> Any:
        try:
            return self.probe() if self.probe else None
        except Exception:  # noqa: BLE001 - e.g. the heartbeat file is not there yet
            return None

    def _run(self) -> None:
        interval = self.interval_s or max(0.2, min(10.0, self.warn_s / 5))
        warned_at = None
        while not self._stop.wait(interval):
            token = self._read_probe()
            if token != self._token:
                self._token = token
                self.beat()
            idle = time.monotonic() - self._last
            if idle < self.warn_s:
                warned_at = None
                continue
            if self.fail_s and idle >= self.fail_s:
                self.failed = (f"stalled: no {self.what} finished for {idle:.0f} s (cluster.stall_fail_s="
                               f"{self.fail_s:g}); pending: {self.diagnose()}")
                self.log(self.failed)
                if self.on_fail is not None:
                    self.on_fail(self.failed)
                return
            if warned_at is None or idle - warned_at >= self.warn_s:
                warned_at = idle
                self.log(f"no {self.what} finished for {idle:.0f} s (cluster.stall_warn_s={self.warn_s:g}); "
                         f"pending: {self.diagnose()}")


@dataclass
class Heartbeat:
    """A training hook: rank 0 touches `path` after an optimiser step (at most once a second), so the driver's
    watchdog sees steps finish in a worker process."""

    path: str
    _last: float = 0.0

    def __call__(self, progress: dict) -> None:
        if progress.get("rank", 0) != 0 or time.monotonic() - self._last < 1.0:
            return
        self._last = time.monotonic()
        Path(self.path).touch()


def heartbeat_probe(path: str | os.PathLike) -> Callable[[], float]:
    return lambda: os.stat(path).st_mtime_ns
