"""The caption service on the simulated 3-node cluster: parity with offline generation, batching, every kind of
bad input (each followed by a good request), the request timeout, autoscaling up and back down, and the client.

Three small apps are deployed once for the module: the main one (batches of up to 4, a 1 MB upload limit, 4 s
videos at most), one whose timeout is shorter than any generation, and one that autoscales between 1 and 2
replicas with short delays.
"""
import asyncio
import json
import socket
import time

import httpx
import pytest

import yaml

from stgpt.checkpoints import choose, ensure_demo_checkpoint
from stgpt.config import CONFIG_DIR, ConfigError, ServeConfig
from stgpt.inference import Captioner
from stgpt.serving import AppArgs, ServiceError, build_app, load_serve_file, load_service, serving
from stgpt.synthetic import encode_video, make_synthetic_dataset, plan_dataset, render_video, write_damaged_videos

TOKEN = "test-token-0123456789"
CHEAP = {"num_beams": 2, "max_new_tokens": 4}  # quick generation for requests that only check the plumbing
MAX_VIDEO_SECONDS = 4.0
MAIN_SETTINGS = {"max_batch_size": 4, "batch_wait_timeout_s": 0.2, "max_upload_mb": 1,
                 "max_video_seconds": MAX_VIDEO_SECONDS, "max_beams": 8, "max_new_tokens_limit": 32,
                 "request_timeout_s": 60}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny checkpoint, four 2 s videos, one 6 s video and damaged files."""
    root = tmp_path_factory.mktemp("serving")
    dataset = make_synthetic_dataset(root / "data", num_videos={"test": 4}, size=(64, 64), num_frames=16, fps=8)
    videos = [dataset.video_path(video_id) for video_id in dataset.video_ids("test")]
    long_video = root / "long.mp4"
    spec = plan_dataset({"long": 1}, seed=1, size=(64, 64))["long"][0]
    encode_video(render_video(spec, (64, 64), num_frames=48), long_video, fps=8)  # 6 s
    return {"checkpoint": ensure_demo_checkpoint(root / "tiny"), "videos": videos, "long": long_video,
            "damaged": write_damaged_videos(root / "damaged", videos[0])}


@pytest.fixture(scope="module")
def offline(assets):
    """The same checkpoint, captioning offline in this process."""
    return Captioner.from_pretrained(assets["checkpoint"], use_gpu=False)


@pytest.fixture(scope="module")
def server(ray_cluster, assets):
    """Base URLs of the three apps; Serve is shut down (not Ray) at the end of the module."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    small = {"ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_wait_loop_s": 0.5,
             "graceful_shutdown_timeout_s": 5}
    checkpoint = str(assets["checkpoint"])
    apps = {
        "main": build_app({"checkpoint": checkpoint, "serve": MAIN_SETTINGS,
                           "deployment": {**small, "num_replicas": 1}}),
        "timeout": build_app({"checkpoint": checkpoint,
                              "serve": {"request_timeout_s": 0.2, "max_new_tokens_limit": 128},
                              "deployment": {**small, "num_replicas": 1}}),
        "guarded": build_app({"checkpoint": checkpoint, "serve": {"auth_token": TOKEN},
                              "deployment": {**small, "num_replicas": 1}}),
        "autoscale": build_app({"checkpoint": checkpoint, "serve": {"max_batch_size": 2},
                                "deployment": {**small, "max_ongoing_requests": 4, "autoscaling_config": {
                                    "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                                    "target_ongoing_requests": 1, "metrics_interval_s": 0.5,
                                    "look_back_period_s": 1.0, "upscale_delay_s": 0.5, "downscale_delay_s": 2.0}}}),
    }
    serve.run_many([serve.api.RunTarget(app, name=f"stgpt-{key}", route_prefix=f"/{key}")
                    for key, app in apps.items()])
    yield {key: f"http://127.0.0.1:{port}/{key}" for key in apps}
    for key in apps:
        serve.delete(f"stgpt-{key}")
    serve.shutdown()


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=60) as http:
        yield http


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_serves(client: httpx.Client, url: str, video) -> None:
    response = client.post(f"{url}/caption", params=CHEAP, files={"video": video.read_bytes()})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["caption"], str)


# --------------------------------------------------------------------------------------------------------
# Without a server: the app builder, the default checkpoint and the config file.


def test_tiny_checkpoint_is_rebuilt_identically(tmp_path, assets):
    again = ensure_demo_checkpoint(tmp_path / "tiny")
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (again / name).read_bytes() == (assets["checkpoint"] / name).read_bytes(), name
    assert choose(again).path == str(again.resolve()) and choose(again).origin == "given"
    hub = choose("Neleac/timesformer-gpt2-video-captioning")
    assert (hub.path, hub.untrained) == ("Neleac/timesformer-gpt2-video-captioning", False)


def test_app_args_are_checked(assets):
    checkpoint = str(assets["checkpoint"])
    with pytest.raises(ValueError, match="unknown app arg.*max_batch_size.*known: checkpoint"):
        build_app({"checkpoint": checkpoint, "max_batch_size": 4})
    bad = {"serve.max_batch_size": {"serve": {"max_batch_size": "eight"}},
           "serve.max_batch": {"serve": {"max_batch": 8}},
           "generation.beams": {"generation": {"beams": 2}},
           "precision": {"precision": "fp8"},
           "cannot change on a running replica": {"deployment": {"user_config": {"decode_threads": 4}}},
           "user_config.max_batch_size": {"deployment": {"user_config": {"max_batch_size": "many"}}},
           "deployment options: .*num_replica": {"deployment": {"num_replica": 2}},
           "deployment options: .*max_replicas": {"deployment": {"autoscaling_config": {"min_replicas": 3,
                                                                                     "max_replicas": 1}}}}
    for words, args in bad.items():
        with pytest.raises(ConfigError, match=words):
            build_app({"checkpoint": checkpoint, **args})
    # Serve validates a config file's args into the builder's annotated type before calling it
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    with pytest.raises(ValueError, match="serve.max_batch_size"):
        call_user_app_builder_with_args_if_necessary(build_app, {"serve": {"max_batch_size": "eight"}})


def test_settings_reach_the_replica_through_user_config(assets):
    """Live settings go to Serve as user_config (defaults from ServeConfig, then args.serve, then the options' own
    user_config); generation defaults only for the keys given."""
    app = build_app({"checkpoint": str(assets["checkpoint"]), "serve": {"max_batch_size": 20, "max_beams": 4},
                     "generation": {"num_beams": 2},
                     "deployment": {"user_config": {"max_beams": 3}}})
    deployment = app._bound_deployment  # the Deployment of Serve's Application (which has no public getter)
    user_config = deployment.user_config
    assert user_config["max_batch_size"] == 20 and user_config["max_beams"] == 3
    assert user_config["batch_wait_timeout_s"] == ServeConfig.batch_wait_timeout_s
    assert deployment.max_ongoing_requests == 40  # room for the next batch beside one
    assert deployment.init_args[2] == {"num_beams": 2}


def test_serve_config_file_sets_only_what_it_changes():
    spec = load_serve_file(CONFIG_DIR / "serve.yaml")
    args = AppArgs.parse(spec.app_args)
    defaults = ServeConfig()
    for key, value in (spec.app_args.get("serve") or {}).items():  # no default restated
        assert value != getattr(defaults, key), f"configs/serve.yaml restates serve.{key}'s default"
    deployment = args.deployment
    scaling = deployment["autoscaling_config"]
    assert scaling["min_replicas"] < scaling["max_replicas"] and scaling["target_ongoing_requests"] > 0
    assert "num_cpus" in deployment["ray_actor_options"] and "num_gpus" in deployment["ray_actor_options"]
    assert "user_config" in deployment  # where `serve deploy` changes batching on running replicas
    assert spec.http_options["request_timeout_s"] > args.serve.request_timeout_s  # the proxy's is the backstop


def test_serve_job_refuses_bad_settings_before_starting_anything(assets, capsys):
    """jobs/serve.py exits 2, naming the key, for a bad override or app arg (before it connects to Ray)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / "serve.py"
    spec = importlib.util.spec_from_file_location("serve_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    checkpoint = ["--checkpoint", str(assets["checkpoint"])]
    for argv, words in [(["serve.max_batch_size=eight"], "serve.max_batch_size"),
                        (["serve.batch_size=4"], "serve.batch_size"),
                        (["video.num_frames=4"], "SECTION.KEY=VALUE"),
                        (["cluster.stall_warn=1"], "cluster.stall_warn")]:
        assert job.main(checkpoint + argv) == 2
        assert words in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# The service.


def test_health_and_openapi_docs(server, client, assets):
    health = client.get(f"{server['main']}/healthz")
    assert health.status_code == 200
    body = health.json()
    assert {k: body[k] for k in ("status", "model", "device")} == {
        "status": "ok", "model": str(assets["checkpoint"].resolve()), "device": "cpu"}
    assert body["replica"] and body["pid"].isdigit()
    assert client.get(f"{server['main']}/docs").status_code == 200
    schema = client.get(f"{server['main']}/openapi.json").json()
    params = {p["name"] for p in schema["paths"]["/caption"]["post"]["parameters"]}
    assert params == {"num_beams", "min_new_tokens", "max_new_tokens"}


@pytest.mark.parametrize("generation", [{}, {"num_beams": 3, "min_new_tokens": 2, "max_new_tokens": 6}])
def test_caption_matches_offline_generation(server, client, assets, offline, generation):
    video = assets["videos"][1]
    expected = offline.caption_video(video, **generation)
    defaults = offline.model.generation_config
    upload = client.post(f"{server['main']}/caption", params=generation, files={"video": video.read_bytes()})
    raw = client.post(f"{server['main']}/caption", params=generation, content=video.read_bytes())
    for response in (upload, raw):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["caption"] == expected.caption
        assert answer["frame_indices"] == expected.frame_indices
        assert answer["num_source_frames"] == expected.num_source_frames == 16
        assert answer["model"] == str(assets["checkpoint"].resolve())
        assert answer["generation"] == {"num_beams": generation.get("num_beams", defaults.num_beams),
                                        "min_new_tokens": generation.get("min_new_tokens", defaults.min_new_tokens),
                                        "max_new_tokens": generation.get("max_new_tokens", defaults.max_new_tokens)}
        assert answer["time_s"] > 0 and set(answer["timings"]) == {"decode_s", "generate_s"}


def test_concurrent_requests_are_batched_and_match_offline(server, assets, offline):
    """Eight requests at once on one replica (batches of up to 4): batched, and each caption is still its own."""
    generation = {"num_beams": 3, "max_new_tokens": 8}
    videos = assets["videos"] * 2
    expected = [offline.caption_video(video, **generation).caption for video in videos]

    async def send_all():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{server['main']}/caption", params=generation,
                                                    files={"video": video.read_bytes()}) for video in videos))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(videos), [r.text for r in responses]
    answers = [r.json() for r in responses]
    assert [a["caption"] for a in answers] == expected
    assert max(a["batch_size"] for a in answers) > 1
    assert all(a["batch_size"] <= MAIN_SETTINGS["max_batch_size"] for a in answers)


def _chunks(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start:start + size]


BAD_REQUESTS = {
    # name: (request arguments given the assets, status, error code, words the detail must hold)
    "empty body": (lambda a: {"content": b""}, 400, "empty_body", "no body"),
    "empty upload": (lambda a: {"files": {"video": ("v.mp4", b"")}}, 400, "empty_body", "empty"),
    "random bytes": (lambda a: {"content": a["damaged"]["random_bytes"].read_bytes()}, 422, "invalid_video",
                     "not a video"),
    "text file uploaded": (lambda a: {"files": {"video": a["damaged"]["text"].read_bytes()}}, 422,
                           "invalid_video", "not a video"),
    "truncated mp4": (lambda a: {"content": a["damaged"]["truncated"].read_bytes()}, 422, "invalid_video",
                      "truncated"),
    "over the size limit": (lambda a: {"content": bytes(1_500_000)}, 413, "upload_too_large", "1 MB"),
    "over the size limit, chunked": (lambda a: {"content": _chunks(bytes(1_500_000))}, 413, "upload_too_large",
                                     "1 MB"),
    "video too long": (lambda a: {"content": a["long"].read_bytes()}, 422, "video_too_long", "over 4s long"),
    "zero beams": (lambda a: {"params": {"num_beams": 0}, "content": a["videos"][0].read_bytes()}, 422,
                   "invalid_parameter", "num_beams"),
    "too many beams": (lambda a: {"params": {"num_beams": 9}, "content": a["videos"][0].read_bytes()}, 422,
                       "invalid_parameter", "num_beams must be between 1 and 8"),
    "too many tokens": (lambda a: {"params": {"max_new_tokens": 33}, "content": a["videos"][0].read_bytes()},
                        422, "invalid_parameter", "max_new_tokens"),
    "min above max": (lambda a: {"params": {"min_new_tokens": 5, "max_new_tokens": 3},
                                 "content": a["videos"][0].read_bytes()}, 422, "invalid_parameter", "min_new_tokens"),
    "not an integer": (lambda a: {"params": {"num_beams": "many"}, "content": a["videos"][0].read_bytes()}, 422,
                       "invalid_parameter", "num_beams"),
    "bad form parameter": (lambda a: {"data": {"max_new_tokens": "lots"}, "files": {"video": a["videos"][0].read_bytes()}},
                           422, "invalid_parameter", "max_new_tokens"),
    # No endpoint opens a server-side path: as the body, as a form field or as a query parameter.
    "path as the body": (lambda a: {"content": str(a["videos"][0]).encode()}, 422, "invalid_video", "not a video"),
    "unknown file field": (lambda a: {"data": {"video": str(a["videos"][0])}, "files": {"other": b"x"}}, 422,
                           "invalid_parameter", "other"),
    "malformed multipart": (lambda a: {"content": b"garbage", "headers": {"content-type": "multipart/form-data; "
                                                                                       "boundary=b"}},
                            400, None, "multipart"),
    "path as a query parameter": (lambda a: {"params": {"path": str(a["videos"][0])},
                                             "content": a["videos"][0].read_bytes()}, 422, "invalid_parameter",
                                  "unknown parameter"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_answers_4xx_json_and_the_replica_keeps_serving(server, client, assets, name):
    make_request, status, error, words = BAD_REQUESTS[name]
    response = client.post(f"{server['main']}/caption", **make_request(assets))
    assert response.status_code == status, response.text
    body = response.json()
    if error is not None:
        assert body["error"] == error
    assert words in body["detail"]
    assert_serves(client, server["main"], assets["videos"][0])


def test_hostile_uploads_cost_one_request_and_the_replica_stays(server, client, assets, tmp_path):
    """A decoder that crashes, and bombs by resolution and by duration: 422 each, answered by the same replica
    (same process), which captions the next good request."""
    import hostile_corpus as hostile
    from stgpt.isolation import CRASH

    good = assets["videos"][0].read_bytes()
    before = client.get(f"{server['main']}/healthz").json()
    hostile_uploads = [
        (CRASH + good, "invalid_video", "crashed"),
        (hostile.resolution_bomb(tmp_path / "big.mp4").read_bytes(), "video_over_limit", "max_pixels"),
        (hostile.aspect_bomb(tmp_path / "thin.mp4").read_bytes(), "video_over_limit", "max_aspect_ratio"),
        (hostile.duration_bomb(tmp_path / "long.mkv").read_bytes(), "video_too_long", "max_seconds"),
    ]
    for content, error, words in hostile_uploads:
        response = client.post(f"{server['main']}/caption", params=CHEAP, content=content)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == error and words in response.json()["detail"]
        assert_serves(client, server["main"], assets["videos"][1])
    after = client.get(f"{server['main']}/healthz").json()
    assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])


def test_sixty_four_concurrent_good_requests_all_answer(server, assets):
    async def send_all():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(f"{server['main']}/caption", params=CHEAP,
                                                    content=assets["videos"][i % 4].read_bytes()) for i in range(64)))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * 64, [r.text for r in responses if r.status_code != 200]


def test_token_is_required_when_set(server, client, assets):
    url, video = server["guarded"], assets["videos"][0].read_bytes()
    missing = client.post(f"{url}/caption", params=CHEAP, content=video)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = client.post(f"{url}/caption", params=CHEAP, content=video, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.get(f"{url}/healthz").status_code == 200  # health stays open for load balancers
    right = client.post(f"{url}/caption", params=CHEAP, content=video, headers={"authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200, right.text
    from stgpt.client import caption

    assert caption(video, url, token=TOKEN, **CHEAP)["caption"] == right.json()["caption"]


def test_text_video_field_is_never_read_as_a_path(server, client, assets):
    """A multipart body whose `video` is text (a path on the server) is refused without opening it."""
    path = str(assets["videos"][0])
    body = (f"--b\r\nContent-Disposition: form-data; name=\"video\"\r\n\r\n{path}\r\n--b--\r\n").encode()
    response = client.post(f"{server['main']}/caption", content=body,
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "missing_video" and "never opens paths" in response.json()["detail"]
    assert_serves(client, server["main"], assets["videos"][0])


def test_slow_request_gets_a_timeout_answer(server, client, assets):
    """Generation far longer than the app's 0.2 s timeout: a 504 JSON answer, and the replica still answers."""
    heavy = {"num_beams": 8, "min_new_tokens": 128, "max_new_tokens": 128}
    for _ in range(2):
        response = client.post(f"{server['timeout']}/caption", params=heavy,
                               files={"video": assets["videos"][0].read_bytes()})
        assert response.status_code == 504, response.text
        assert response.json()["error"] == "timeout" and "0.2s" in response.json()["detail"]
    assert client.get(f"{server['timeout']}/healthz").status_code == 200
    # a decoder that hangs is stopped at the request's deadline: 504, and the replica goes on answering
    from stgpt.isolation import HANG

    hung = client.post(f"{server['timeout']}/caption", content=HANG + assets["videos"][0].read_bytes())
    assert hung.status_code == 504 and hung.json()["error"] == "timeout"
    assert client.get(f"{server['timeout']}/healthz").status_code == 200


def running_replicas(app: str) -> dict[str, int]:
    from ray import serve

    states = serve.status().applications[app].deployments["CaptionDeployment"].replica_states
    return {str(getattr(state, "value", state)): count for state, count in states.items()}


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server, assets):
    """Six clients keep requests in flight (target: 1 per replica) until a second replica runs, then stop."""
    url = f"{server['autoscale']}/caption"
    generation = {"num_beams": 4, "min_new_tokens": 16, "max_new_tokens": 16}
    video = assets["videos"][2].read_bytes()
    assert running_replicas("stgpt-autoscale") == {"RUNNING": 1}

    async def load(deadline: float) -> tuple[int, list[int]]:
        """Keep six requests in flight until two replicas run (or the deadline); the peak and every status."""
        statuses, peak, stop = [], 0, asyncio.Event()

        async def watch():
            nonlocal peak
            while time.monotonic() < deadline and peak < 2:
                peak = max(peak, running_replicas("stgpt-autoscale").get("RUNNING", 0))
                await asyncio.sleep(0.5)
            stop.set()

        async def client_loop(http):
            while not stop.is_set():
                response = await http.post(url, params=generation, files={"video": video})
                statuses.append(response.status_code)

        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(watch(), *(client_loop(http) for _ in range(6)))
        return peak, statuses

    peak, statuses = asyncio.run(load(time.monotonic() + 120))
    assert peak >= 2, f"no second replica after {len(statuses)} requests"
    assert statuses and set(statuses) == {200}

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and running_replicas("stgpt-autoscale") != {"RUNNING": 1}:
        time.sleep(0.5)
    assert running_replicas("stgpt-autoscale") == {"RUNNING": 1}
    with httpx.Client(timeout=60) as http:  # and the one left still serves
        assert_serves(http, server["autoscale"], assets["videos"][2])


def test_client_and_cli_against_the_server(server, assets, offline, capsys):
    from stgpt.cli import main
    from stgpt.client import CaptionRequestError, caption

    video = assets["videos"][3]
    expected = offline.caption_video(video, **CHEAP)
    answer = caption(video, server["main"], **CHEAP)
    assert answer["caption"] == expected.caption and answer["frame_indices"] == expected.frame_indices
    assert caption(video.read_bytes(), f"{server['main']}/caption", **CHEAP)["caption"] == expected.caption

    with pytest.raises(CaptionRequestError) as refused:
        caption(assets["damaged"]["truncated"], server["main"])
    assert refused.value.status_code == 422 and refused.value.error == "invalid_video"

    assert main(["caption", str(video), "--url", server["main"], "--num-beams", "2", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected.caption + "\n"
    assert main(["caption", str(video), "--url", server["main"], "--num-beams", "2", "--max-new-tokens", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["frame_indices"] == expected.frame_indices
    assert main(["caption", str(assets["long"]), "--url", server["main"]]) == 1
    assert "video_too_long" in capsys.readouterr().err


def _batch_sizes(url: str, video: bytes, count: int = 8) -> list[int]:
    """Send `count` requests at once; the batch size each answer reports."""
    async def send_all():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{url}/caption", params=CHEAP, content=video)
                                          for _ in range(count)))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * count, [r.text for r in responses]
    return [r.json()["batch_size"] for r in responses]


def test_a_changed_user_config_reconfigures_the_running_replica(server, client, assets):
    """The app deployed from a config (as `serve deploy` does), then again with only user_config changed: the
    same replica process takes the new bounds and batch size, without a restart."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    url = server["main"].rsplit("/", 1)[0] + "/live"
    video = assets["videos"][0].read_bytes()

    def deploy(user_config: dict) -> None:
        config = {"applications": [{
            "name": "stgpt-live", "route_prefix": "/live", "import_path": "stgpt.serving:build_app",
            "args": {"checkpoint": str(assets["checkpoint"]), "serve": MAIN_SETTINGS},
            "deployments": [{"name": "CaptionDeployment", "num_replicas": 1, "user_config": user_config,
                             "ray_actor_options": {"num_cpus": 0.5}, "graceful_shutdown_timeout_s": 5}]}]}
        # `serve deploy` PUTs the file to the dashboard, which hands it to this same call (serve_head.py)
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)

    def seven_beams() -> int:
        return client.post(f"{url}/caption", params={**CHEAP, "num_beams": 7}, content=video).status_code

    try:
        deploy({"max_batch_size": 1, "max_beams": 8})
        before = client.get(f"{url}/healthz").json()
        assert seven_beams() == 200
        assert set(_batch_sizes(url, video)) == {1}

        deploy({"max_batch_size": 4, "batch_wait_timeout_s": 0.5, "max_beams": 6})
        deadline = time.monotonic() + 60
        while seven_beams() == 200 and time.monotonic() < deadline:  # the update reaches the replica
            time.sleep(0.5)
        refused = client.post(f"{url}/caption", params={**CHEAP, "num_beams": 7}, content=video)
        assert refused.status_code == 422 and "between 1 and 6" in refused.json()["detail"]
        sizes = _batch_sizes(url, video)
        assert max(sizes) > 1 and max(sizes) <= 4, sizes
        after = client.get(f"{url}/healthz").json()
        assert (after["replica"], after["pid"]) == (before["replica"], before["pid"])
    finally:
        serve.delete("stgpt-live")


def test_replicas_that_cannot_be_placed_are_reported_then_fail(server, assets, tmp_path):
    """jobs/serve.py's start-up with a replica asking for a resource no node has: past cluster.stall_warn_s it
    says what Ray has pending, past cluster.stall_fail_s it fails (and takes its app down) instead of waiting."""
    from ray import serve

    raw = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    app = raw["applications"][0]
    app.update(name="stgpt-stalled", route_prefix="/stalled")
    app["deployments"][0].update(ray_actor_options={"num_cpus": 0.5, "resources": {"stgpt_missing_thing": 1}},
                                 graceful_shutdown_timeout_s=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(raw))
    port = int(server["main"].rsplit(":", 1)[1].split("/")[0])
    service = load_service(tmp_path / "serve.yaml", ["cluster.stall_warn_s=1", "cluster.stall_fail_s=4"],
                           checkpoint=str(assets["checkpoint"]), port=port, num_replicas=1)
    lines: list[str] = []
    with pytest.raises(ServiceError) as failed:
        with serving(service, log=lines.append):
            pytest.fail("a replica that cannot be placed started")
    warnings = [line for line in lines if line.startswith("no replica start finished")]
    assert warnings and "cluster.stall_warn_s=1" in warnings[0] and "stgpt_missing_thing" in warnings[0], lines
    assert "cluster.stall_fail_s=4" in str(failed.value) and "stgpt_missing_thing" in str(failed.value)
    deadline = time.monotonic() + 60  # the app is taken down (asynchronously: nothing in it ever ran)
    while "stgpt-stalled" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "stgpt-stalled" not in serve.status().applications
