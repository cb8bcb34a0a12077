"""The cluster/ deliverables: what can be checked without a cloud or a Kubernetes cluster.

* Every manifest and config parses; the KubeRay manifests have the kinds, Ray version, image, auth and storage they
  should; the cluster launcher config passes Ray's own schema and default-filling.
* Every RayJob's entry point names a job script and a config that exist, with overrides the config accepts, on a
  cluster the size the config asks for; every `jobs/...py` / `configs/...` named anywhere under cluster/ exists.
* The RayService's serveConfigV2 is configs/serve.yaml (cluster/render_rayservice.py keeps it so).
* cluster/local_cluster.sh starts a head plus a worker node, takes a `ray job submit` that sees both nodes, and
  stops leaving no process behind, even with a job still running that detached a process of its own.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = REPO / "configs" / "serve.yaml"
IMAGE_DIR = "/home/ray/stgpt"  # the repository in the stgpt image, and the working directory of its Ray processes

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(CLUSTER))


def ray_version() -> str:
    import ray

    return ray.__version__


def load(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


MANIFESTS = {
    "pvc.yaml": "PersistentVolumeClaim",
    "raycluster.yaml": "RayCluster",
    "rayjob-preprocess.yaml": "RayJob",
    "rayjob-train.yaml": "RayJob",
    "rayjob-evaluate.yaml": "RayJob",
    "rayservice.yaml": "RayService",
}


def cluster_specs() -> dict[str, dict]:
    """file name -> the RayClusterSpec inside it."""
    specs = {}
    for name, kind in MANIFESTS.items():
        doc = load(KUBERAY / name)
        spec = doc["spec"]
        if kind == "RayCluster":
            specs[name] = spec
        elif kind == "RayJob":
            specs[name] = spec["rayClusterSpec"]
        elif kind == "RayService":
            specs[name] = spec["rayClusterConfig"]
    return specs


def pod_templates(spec: dict):
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


# --------------------------------------------------------------------------------------------------------------
# Parsing and structure.


def test_every_yaml_file_under_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {p.name for p in files} >= set(MANIFESTS) | {"aws-gpu.yaml"}
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.parametrize("name,kind", sorted(MANIFESTS.items()))
def test_kuberay_manifest_kind_and_api(name, kind):
    doc = load(KUBERAY / name)
    assert doc["kind"] == kind
    assert doc["apiVersion"] == ("v1" if kind == "PersistentVolumeClaim" else "ray.io/v1")
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a DNS-1123 name"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-preprocess.yaml", "rayjob-train.yaml",
                                  "rayjob-evaluate.yaml", "rayservice.yaml"])
def test_ray_cluster_spec(name):
    """Ray pinned to the installed version, token auth, the stgpt image run in its repository directory with the
    shared volume on data/ and outputs/, string-valued ray start parameters, coherent worker group sizes."""
    spec = cluster_specs()[name]
    version = ray_version()
    claim = load(KUBERAY / "pvc.yaml")["metadata"]["name"]
    assert spec["rayVersion"] == version
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "the head should run drivers only"
    for group_name, group in pod_templates(spec):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group_name
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"].endswith(f"-ray{version}"), f"{group_name}: image not pinned to Ray {version}"
        assert container["workingDir"] == IMAGE_DIR
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for sub in ("data", "outputs"):
            assert mounts[f"{IMAGE_DIR}/{sub}"]["subPath"] == sub
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[f"{IMAGE_DIR}/data"]["name"]]["persistentVolumeClaim"]["claimName"] == claim
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, f"{group_name}: requests != limits"
        if group_name != "head":
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group_name
            if "gpu" in group_name:
                assert int(limits["nvidia.com/gpu"]) >= 1
    images = {g["template"]["spec"]["containers"][0]["image"] for _, g in pod_templates(spec)}
    assert len(images) == 1, f"one image for every pod, got {images}"


def test_all_manifests_share_one_image_and_the_dockerfile_pins_ray():
    version = ray_version()
    images = {c["template"]["spec"]["containers"][0]["image"]
              for spec in cluster_specs().values() for _, c in pod_templates(spec)}
    assert len(images) == 1, images
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert base.startswith(f"rayproject/ray:{version}-"), base
    assert f'"ray[train,data,serve]=={version}"' in dockerfile
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, flags=re.M):
        for item in source.split():
            assert (REPO / item).exists(), f"Dockerfile copies {item}, which is not in the repository"
    assert f"WORKDIR {IMAGE_DIR}" in dockerfile


def test_pvc_is_shared_between_pods():
    pvc = load(KUBERAY / "pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# --------------------------------------------------------------------------------------------------------------
# Entry points.

JOB_ENTRYPOINTS = {"rayjob-preprocess.yaml": "preprocess", "rayjob-train.yaml": "train",
                   "rayjob-evaluate.yaml": "evaluate"}
OVERRIDE = re.compile(r"^[a-z_]+\.[a-z_]+=")


def parse_entrypoint(entrypoint: str) -> tuple[str, str, list[str], list[str]]:
    """(script, config, overrides, all args) of `python jobs/x.py --config C ... key=value ...`."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", entrypoint
    script, args = argv[1], argv[2:]
    assert "--config" in args, f"{entrypoint}: no --config"
    config = args[args.index("--config") + 1]
    return script, config, [a for a in args if OVERRIDE.match(a)], args


@pytest.mark.parametrize("manifest,job", sorted(JOB_ENTRYPOINTS.items()))
def test_rayjob_entrypoint_names_existing_script_and_config(manifest, job):
    from stgpt.config import load_config

    spec = load(KUBERAY / manifest)["spec"]
    script, config, overrides, _ = parse_entrypoint(spec["entrypoint"])
    assert script == f"jobs/{job}.py"
    assert (REPO / script).is_file(), f"{manifest}: entry point {script} does not exist (yet)"
    assert config == "configs/vatex.yaml"
    assert (REPO / config).is_file(), f"{manifest}: config {config} does not exist"
    cfg = load_config(REPO / config, overrides)  # raises on an unknown key or a wrong type
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert "working_dir" not in yaml.safe_load(spec["runtimeEnvYAML"]), "the image holds the code"
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    gpus = groups.get("gpu-workers", {})
    if job == "train":  # one GPU node per DDP worker, all of them up at once
        assert cfg.train.use_gpu and gpus["minReplicas"] == gpus["maxReplicas"] == cfg.train.num_workers
        per_node_cpus = float(gpus["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert per_node_cpus >= cfg.train.cpus_per_worker + 1, "no CPU left for Ray Data beside a train worker"
    elif job == "evaluate":
        assert cfg.evaluate.use_gpu and gpus["maxReplicas"] >= cfg.evaluate.num_actors
    else:
        assert "gpu-workers" not in groups, "preprocessing needs no GPU"


def test_train_output_is_where_serving_and_evaluation_look():
    """rayjob-train writes outputs/train/best, what Serve loads with `checkpoint: null` and rayjob-evaluate reads."""
    from stgpt.config import load_config

    _, config, overrides, _ = parse_entrypoint(load(KUBERAY / "rayjob-train.yaml")["spec"]["entrypoint"])
    best = Path(load_config(REPO / config, overrides).train.output_dir) / "best"
    _, _, _, args = parse_entrypoint(load(KUBERAY / "rayjob-evaluate.yaml")["spec"]["entrypoint"])
    assert Path(args[args.index("--checkpoint") + 1]) == best
    from stgpt.checkpoints import best_checkpoint  # what `checkpoint: null` loads, relative to the working dir
    from stgpt.config import Config

    assert best_checkpoint(Config()) == best


def test_every_job_and_config_named_under_cluster_exists():
    """Commands in comments and manifests (`python jobs/x.py --config configs/y.yaml`) name real files."""
    named = set()
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".sh", ".py", ""}:
            named |= set(re.findall(r"(?<![\w/])((?:jobs|configs)/[\w.-]+\.(?:py|yaml))", path.read_text()))
    assert {"jobs/preprocess.py", "jobs/train.py", "jobs/evaluate.py", "configs/vatex.yaml"} <= named
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"named under cluster/ but not in the repository: {missing}"


# --------------------------------------------------------------------------------------------------------------
# The RayService's Serve config.


def serve_text() -> str:
    if not SERVE_CONFIG.exists():
        pytest.skip("configs/serve.yaml does not exist yet (the serving work adds it)")
    return SERVE_CONFIG.read_text()


def test_rayservice_serve_config_is_configs_serve_yaml():
    import render_rayservice

    text = serve_text()
    spec = load(KUBERAY / "rayservice.yaml")["spec"]
    assert spec["serveConfigV2"] == render_rayservice.normalized(text), (
        "cluster/kuberay/rayservice.yaml is out of date with configs/serve.yaml: "
        "run python cluster/render_rayservice.py")
    embedded, local = yaml.safe_load(spec["serveConfigV2"]), yaml.safe_load(text)
    assert local["http_options"]["host"] == "127.0.0.1" and embedded["http_options"]["host"] == "0.0.0.0"
    embedded["http_options"]["host"] = local["http_options"]["host"]
    assert embedded == local  # the same application and settings; only the address the proxies listen on differs
    assert render_rayservice.main(["--check"]) == 0


def test_rayservice_application_and_ports_exist():
    config = yaml.safe_load(serve_text())
    for app in config["applications"]:
        module, _, attr = app["import_path"].partition(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.is_file(), f"import_path {app['import_path']}: no {source.relative_to(REPO)}"
        body = ast.parse(source.read_text()).body
        names = {n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names |= {t.id for n in body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert attr in names, f"{source.name} defines no {attr}"
    port = config.get("http_options", {}).get("port", 8000)
    head = load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]["headGroupSpec"]
    ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert ports.get("serve") == port, "the head pod must expose the Serve HTTP port as 'serve'"


def test_render_rayservice_replaces_only_the_serve_block(tmp_path):
    import render_rayservice

    manifest = (KUBERAY / "rayservice.yaml").read_text()
    variant = "# a comment\nproxy_location: HeadOnly\napplications:\n  - name: x\n    import_path: m:app\n\n\n"
    rendered = render_rayservice.render(manifest, variant)
    doc = yaml.safe_load(rendered)
    assert doc["spec"]["serveConfigV2"] == "# a comment\nproxy_location: HeadOnly\napplications:\n" \
                                          "  - name: x\n    import_path: m:app\n"
    assert doc["spec"]["rayClusterConfig"] == yaml.safe_load(manifest)["spec"]["rayClusterConfig"]
    assert render_rayservice.render(rendered, variant) == rendered  # idempotent
    assert rendered.split("serveConfigV2:")[0] == manifest.split("serveConfigV2:")[0]  # header comments kept
    serve, out = tmp_path / "serve.yaml", tmp_path / "rayservice.yaml"
    serve.write_text(variant)
    out.write_text(manifest)
    assert render_rayservice.main(["--serve-config", str(serve), "--manifest", str(out), "--check"]) == 1
    assert render_rayservice.main(["--serve-config", str(serve), "--manifest", str(out)]) == 0
    assert out.read_text() == rendered
    with pytest.raises(yaml.YAMLError):
        render_rayservice.render(manifest, "applications: [\n")


# --------------------------------------------------------------------------------------------------------------
# The cluster launcher config.


def test_cluster_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load(CLUSTER / "aws-gpu.yaml")
    validate_config(prepare_config(config))  # Ray's schema, after filling the AWS defaults
    version = ray_version()
    assert config["docker"]["image"].startswith(f"rayproject/ray:{version}-")
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0, "the head should run drivers only"
    gpu = [t for name, t in types.items() if "gpu" in name]
    assert gpu and all(t["node_config"]["InstanceType"][0] in "gp" for t in gpu), "a GPU instance worker type"
    assert all(t["min_workers"] < t["max_workers"] for t in gpu), "GPU workers should autoscale"
    local = config["file_mounts"][IMAGE_DIR]
    assert (REPO / local / "pyproject.toml").is_file(), "file_mounts should sync the repository (ray up from it)"
    setup = " ".join(config["setup_commands"])
    assert f"pip install -q -e {IMAGE_DIR}" in setup and f"ray[train,data,serve]=={version}" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = config[key][-1]
        assert f"cd {IMAGE_DIR}" in start and "RAY_AUTH_MODE=token" in start and "ray start" in start


# --------------------------------------------------------------------------------------------------------------
# The local multi-node cluster.

SCRIPT = CLUSTER / "local_cluster.sh"


def test_local_cluster_script_never_runs_a_global_ray_stop():
    """`ray stop` ends every Ray instance on the machine; the script must end its own processes only."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    code = [line.split("#", 1)[0] for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    offending = [line for line in code if re.search(r"(\bray\b|RAY_BIN\"?)\s+stop\b", line)]
    assert not offending, offending
    assert os.access(SCRIPT, os.X_OK)


NODES_SCRIPT = """\
import ray
ray.init()
print("NODES", len([n for n in ray.nodes() if n["Alive"]]), flush=True)

@ray.remote(num_cpus=1)
def where():
    import time
    time.sleep(1)
    return ray.get_runtime_context().get_node_id()

print("TASK_NODES", len(set(ray.get([where.remote() for _ in range(4)]))), flush=True)
"""

LINGER_SCRIPT = """\
import subprocess, sys, time
# A process in a session of its own, as a job may leave behind; it must not outlive the cluster.
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", sys.argv[1]], start_new_session=True)
print("LINGERING", flush=True)
time.sleep(3600)
"""


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state not in ("Z", "X"):
            found.append(int(entry))
    return found


def session_members(session_ids: set[int]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in session_ids and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_local_cluster_runs_a_submitted_job_and_stops_cleanly(tmp_path):
    from local_cluster import local_ray_cluster

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "nodes.py").write_text(NODES_SCRIPT)
    (job_dir / "linger.py").write_text(LINGER_SCRIPT)
    marker = f"stgpt-test-linger-{os.getpid()}-{time.monotonic_ns()}"
    started = time.monotonic()
    with local_ray_cluster(num_workers=1, cpus_per_node=1) as cluster:
        recorded = {name: pid for name, (pid, _) in cluster.processes.items()}
        assert {"node0", "node1", "watcher"} <= set(recorded)
        assert cluster.num_nodes == 2 and cluster.dashboard_url.startswith("http://127.0.0.1:")
        assert cluster.address.rsplit(":", 1)[1] not in ("6379",) and not cluster.dashboard_url.endswith(":8265")

        status = subprocess.run(["bash", str(SCRIPT), "status", "--state-dir", str(cluster.state_dir)],
                                env=cluster.env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "cluster: 2 nodes alive" in status.stdout, status.stdout + status.stderr

        result = cluster.job_submit(["python", "nodes.py"], working_dir=job_dir, timeout=180)
        assert result.returncode == 0, result.stdout[-3000:]
        assert "NODES 2" in result.stdout, result.stdout[-3000:]
        assert "TASK_NODES 2" in result.stdout, "tasks should run on both nodes"

        # A job still running at stop time, with a process that left the job's session.
        submitted = cluster.job_submit(["python", "linger.py", marker], working_dir=job_dir,
                                       extra_args=["--no-wait"], timeout=120)
        assert submitted.returncode == 0, submitted.stdout[-3000:]
        deadline = time.monotonic() + 60
        while len(processes_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(processes_with(marker)) >= 2, "the lingering job did not start"
    # local_ray_cluster stopped the cluster (and raises if a recorded process survived); check independently.
    assert cluster.alive_processes() == []
    assert session_members(set(recorded.values())) == [], "a process of a node's session survived stop"
    assert processes_with(marker) == [], "a process started by a job survived stop"
    assert processes_with(str(cluster.state_dir)) == [], "a process using the cluster's temp dir survived"
    assert not cluster.state_dir.exists(), "the state dir should be removed after a clean stop"
    print(f"local cluster test took {time.monotonic() - started:.0f}s")
