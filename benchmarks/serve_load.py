"""Load test: the batched caption deployment against the same deployment with batching off, in one run.

    python benchmarks/serve_load.py                      # tiny demo checkpoint, concurrency 1, 4, 16
    python benchmarks/serve_load.py --checkpoint DIR --levels 1 8 --requests 64

Starts a fresh local Ray and Serve, deploys configs/serve.yaml's app twice, differing only in the user_config's
`max_batch_size` (the file's size vs 1), each on one replica (autoscaling off), and sends a bounded number of
POST /caption requests at each concurrency level from an asyncio client on localhost. Each level runs in rounds
that alternate between the two apps, so background load on a shared machine hits both alike. Reports requests per
second, p50/p95/p99 latency, failed requests, the mean batch size and the server's own time per request (decode +
batch wait and generation), and writes the table to benchmarks/RESULTS.md (section "serve_load").

    python benchmarks/serve_load.py --hostile             # section "serve_hostile"

With `--hostile`, one batched deployment takes good requests at concurrency 16 in rounds that alternate between
no other traffic and a second client sending one hostile upload a second (resolution, aspect and duration bombs,
a decoder that crashes, seeded mutations of small files). Target: no failed good request, good-request p99 within
1.5x of the clean rounds.
"""
import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._results import machine_info, write_section  # noqa: E402
from stgpt.checkpoints import choose  # noqa: E402

MODES = ("batched", "unbatched")


@dataclass
class Samples:
    """What one deployment did at one concurrency level, summed over rounds."""

    concurrency: int
    latencies: list[float] = field(default_factory=list)  # of successful requests, seconds
    failures: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    server: dict[str, list[float]] = field(default_factory=lambda: {"time_s": [], "decode_s": [], "generate_s": []})
    wall_s: float = 0.0

    def summary(self) -> dict:
        ok = len(self.latencies)
        return {"concurrency": self.concurrency, "requests": ok + len(self.failures), "failed": len(self.failures),
                "rps": ok / self.wall_s if self.wall_s else 0.0, "p50": percentile(self.latencies, 50),
                "p95": percentile(self.latencies, 95), "p99": percentile(self.latencies, 99),
                "mean_batch": statistics.fmean(self.batch_sizes) if self.batch_sizes else 0.0,
                "errors": self.failures[:3],
                **{f"server_{k}": statistics.fmean(v) if v else float("nan") for k, v in self.server.items()}}


async def run_round(url: str, videos: list[bytes], total: int, timeout_s: float, samples: Samples) -> None:
    """Send `total` requests, `samples.concurrency` at a time, adding what happened to `samples`."""
    next_index = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            index = next_index
            next_index += 1
            start = time.perf_counter()
            try:
                response = await client.post(url, files={"video": (f"v{index}.mp4", videos[index % len(videos)],
                                                                   "video/mp4")})
            except httpx.HTTPError as exc:
                samples.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if response.status_code != 200:
                samples.failures.append(f"{response.status_code}: {response.text[:200]}")
                continue
            samples.latencies.append(time.perf_counter() - start)
            answer = response.json()
            samples.batch_sizes.append(answer["batch_size"])
            for key, values in samples.server.items():
                values.append(answer["timings"].get(key, answer.get(key)))

    concurrency = samples.concurrency
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        samples.wall_s += time.perf_counter() - start


async def run_round_under_attack(url: str, videos: list[bytes], total: int, timeout_s: float, samples: Samples,
                                 hostile: list[tuple[str, bytes]], answers: dict[str, list[int]]) -> None:
    """`run_round` while a second client sends one hostile upload a second; their status codes go to `answers`."""
    done = asyncio.Event()

    async def send(client: httpx.AsyncClient, name: str, data: bytes) -> None:
        try:
            response = await client.post(url, content=data)
            answers.setdefault(name, []).append(response.status_code)
        except httpx.HTTPError as exc:
            answers.setdefault(name, []).append(-1)
            print("   hostile upload failed at the client:", type(exc).__name__, exc)

    async def attacker() -> None:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            sent = []
            while not done.is_set():  # one a second, whether or not the last one was answered
                index = sum(len(codes) for codes in answers.values()) + len(sent)  # rounds go on through the list
                sent.append(asyncio.create_task(send(client, *hostile[index % len(hostile)])))
                try:
                    await asyncio.wait_for(done.wait(), 1.0)
                except asyncio.TimeoutError:
                    pass
            await asyncio.gather(*sent)

    task = asyncio.create_task(attacker())
    await run_round(url, videos, total, timeout_s, samples)
    done.set()
    await task


def hostile_uploads(folder: Path) -> list[tuple[str, bytes]]:
    """The tests' hostile corpus: bombs, a decoder that crashes, and seeded mutants of small real files that do
    not decode (mutants that still decode are only more good requests, and are left out)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import hostile_corpus as corpus

    from stgpt.config import VideoConfig
    from stgpt.isolation import CRASH, sample_video_isolated
    from stgpt.video import VideoDecodeError

    bombs = [("resolution bomb", corpus.resolution_bomb(folder / "big.mp4").read_bytes()),
             ("aspect bomb", corpus.aspect_bomb(folder / "thin.mp4").read_bytes()),
             ("duration bomb", corpus.duration_bomb(folder / "long.mkv").read_bytes()),
             ("resolution change", corpus.resolution_change(folder / "change.ts").read_bytes()),
             ("decoder crash", CRASH + corpus.aspect_bomb(folder / "thin.mp4").read_bytes())]
    broken = []
    for _, data in corpus.mutations(corpus.small_clips(folder / "seeds"), 24, seed=3):
        try:
            sample_video_isolated(data, VideoConfig(), timeout_s=30)
        except VideoDecodeError:
            broken.append(("undecodable mutant", data))
    mixed = []
    for i in range(max(len(bombs), len(broken))):
        mixed += [bombs[i % len(bombs)]] + ([broken[i % len(broken)]] if broken else [])
    return mixed


def hostile_markdown(clean: dict, attacked: dict, answers: dict[str, list[int]], meta: dict) -> str:
    ratio = attacked["p99"] / clean["p99"] if clean["p99"] else float("nan")
    met = attacked["failed"] == 0 and clean["failed"] == 0 and ratio <= 1.5
    lines = [
        "## Serving under hostile uploads (`python benchmarks/serve_load.py --hostile`)",
        "",
        f"{meta['host']}. Client, proxy and one replica ({meta['replica_cpus']} CPU, batches of "
        f"{meta['max_batch_size']}) on this machine; checkpoint `{meta['checkpoint']}`, generation "
        f"{meta['generation']}; good requests at concurrency {clean['concurrency']}, {meta['rounds']} alternating "
        "rounds of each kind.",
        "",
        "| good requests | requests | failed | req/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("clean", clean), ("with one hostile upload a second", attacked)):
        lines.append(f"| {name} | {row['requests']} | {row['failed']} | {row['rps']:.2f} | {row['p50'] * 1e3:.0f} | "
                     f"{row['p99'] * 1e3:.0f} |")
    lines += ["", "| hostile upload | sent | answers |", "|---|---:|---|"]
    for name, codes in sorted(answers.items()):
        tally = ", ".join(f"{code}: {codes.count(code)}" for code in sorted(set(codes)))
        lines.append(f"| {name} | {len(codes)} | {tally} |")
    lines += ["", f"- p99 under attack / clean: **{ratio:.2f}x**; failed good requests: "
                  f"{attacked['failed'] + clean['failed']}. Target (no failure, p99 within 1.5x): "
                  f"**{'met' if met else 'missed'}**.",
              "- Each hostile upload decodes in its own child process (`stgpt/isolation.py`), under the video limits: "
              "bombs are refused from the header or the first oversized frame (422), a crashing decoder costs its "
              "own request (422) and the replica goes on."]
    return "\n".join(lines) + "\n"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, in seconds (nan for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def markdown(results: dict[str, list[dict]], meta: dict) -> str:
    lines = [
        "## Serving under load (`python benchmarks/serve_load.py`)",
        "",
        f"{meta['host']} (at the end; {meta['load_before']:.1f} at the start: other work shares this machine). "
        f"Client, HTTP proxy and one replica on this machine (localhost).",
        f"Checkpoint `{meta['checkpoint']}` ({meta['origin']}), generation {meta['generation']}; "
        f"{meta['video']}; replica {meta['replica_cpus']} CPU, `max_batch_size` {meta['max_batch_size']} vs 1, "
        f"`batch_wait_timeout_s` {meta['batch_wait_timeout_s']}; {meta['rounds']} alternating rounds per level.",
        "",
        "| concurrency | deployment | requests | failed | req/s | p50 ms | p95 ms | p99 ms | mean batch "
        "| server ms (decode + generate) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for batched, unbatched in zip(results["batched"], results["unbatched"]):
        for mode, row in (("batched", batched), ("unbatched", unbatched)):
            lines.append(f"| {row['concurrency']} | {mode} | {row['requests']} | {row['failed']} | {row['rps']:.2f} | "
                         f"{row['p50'] * 1e3:.0f} | {row['p95'] * 1e3:.0f} | {row['p99'] * 1e3:.0f} | "
                         f"{row['mean_batch']:.2f} | {row['server_time_s'] * 1e3:.0f} "
                         f"({row['server_decode_s'] * 1e3:.0f} + {row['server_generate_s'] * 1e3:.0f}) |")
    lines += ["", "| concurrency | batched / unbatched req/s |", "|---:|---:|"]
    for batched, unbatched in zip(results["batched"], results["unbatched"]):
        ratio = batched["rps"] / unbatched["rps"] if unbatched["rps"] else float("nan")
        lines.append(f"| {batched['concurrency']} | {ratio:.2f}x |")
    lines += ["", "`mean batch` is the batch size `@serve.batch` formed for each request; `server ms` is the replica's own "
              "time (decode: body, decoding and preprocessing; generate: waiting for a batch and beam search), the rest "
              "of the latency is the HTTP proxy and the client. At concurrency 1 the batched deployment waits up to "
              "`batch_wait_timeout_s` for a batch that never fills, so it is slower there by design. The request rates "
              "move from run to run with the machine's other load; the alternating rounds keep the ratio fairer than "
              "the absolute figures."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="directory or hub id (default: the serving default)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level and deployment (default: max(16, 12 x concurrency))")
    parser.add_argument("--config", default="configs/serve.yaml", help="Serve config file of the deployment")
    parser.add_argument("--max-batch-size", type=int, help="override the max_batch_size the file gives")
    parser.add_argument("--batch-wait-timeout-s", type=float, help="override the batch_wait_timeout_s the file gives")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per level and deployment")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client timeout per request")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not touch RESULTS.md")
    parser.add_argument("--hostile", action="store_true", help="clean vs hostile rounds at concurrency 16")
    args = parser.parse_args(argv)
    if args.hostile:
        os.environ["STGPT_TEST_DECODER_FAULTS"] = "1"  # the crashing-decoder upload (stgpt/isolation.py)

    import ray
    from ray import serve

    from stgpt.model import load_checkpoint
    from stgpt.serving import AppArgs, build_app, load_serve_file
    from stgpt.serving_deployment import live_settings
    from stgpt.synthetic import make_synthetic_dataset

    spec = load_serve_file(args.config)
    deployment = {k: v for k, v in (spec.app_args.get("deployment") or {}).items() if k != "autoscaling_config"}
    deployment["num_replicas"] = 1
    # The live settings reach the replicas as user_config (over the file's own); `settings`: what they amount to.
    live = {**(deployment.get("user_config") or {}), "request_timeout_s": args.timeout_s,
            **{k: v for k, v in (("max_batch_size", args.max_batch_size),
                                 ("batch_wait_timeout_s", args.batch_wait_timeout_s)) if v is not None}}
    settings = dataclasses.asdict(live_settings(AppArgs.parse(spec.app_args).serve, live))
    choice = choose(args.checkpoint or spec.app_args.get("checkpoint"))
    checkpoint, origin = choice.path, choice.origin
    saved = load_checkpoint(checkpoint)
    generation = {k: getattr(saved.model.generation_config, k) for k in ("num_beams", "min_new_tokens",
                                                                          "max_new_tokens")}
    generation.update(spec.app_args.get("generation") or {})
    with tempfile.TemporaryDirectory() as folder:  # 8 small videos, remade each run (and kept in memory)
        dataset = make_synthetic_dataset(folder, num_videos={"test": 8})
        videos = [dataset.video_path(v).read_bytes() for v in dataset.video_ids("test")]

    load_before = os.getloadavg()[0]
    ray.init(address="local", log_to_driver=False)  # a fresh local Ray: never a cluster someone else runs
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    apps = {}
    for mode in (MODES[:1] if args.hostile else MODES):
        batch = settings["max_batch_size"] if mode == "batched" else 1
        app = build_app({**spec.app_args, "checkpoint": checkpoint,
                         "deployment": {**deployment, "user_config": {**live, "max_batch_size": batch}}})
        serve.run(app, name=f"bench-{mode}", route_prefix=f"/{mode}")
        apps[mode] = f"http://127.0.0.1:{args.port}/{mode}/caption"

    if args.hostile:
        return run_hostile(args, apps["batched"], videos, spec, settings, deployment, checkpoint, generation)
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # warm up both: first calls pay for lazy initialisation
            asyncio.run(run_round(apps[mode], videos, 16, args.timeout_s, Samples(8)))
        for level in args.levels:
            total = args.requests or max(16, 12 * level)
            samples = {mode: Samples(level) for mode in MODES}
            for round_ in range(args.rounds):  # alternate, so background load hits both deployments alike
                share = total // args.rounds + (round_ < total % args.rounds)
                for mode in MODES:
                    asyncio.run(run_round(apps[mode], videos, share, args.timeout_s, samples[mode]))
            for mode in MODES:
                row = samples[mode].summary()
                results[mode].append(row)
                print(f"{mode:9s} c={level:<3d} {row['rps']:6.2f} req/s  p50 {row['p50'] * 1e3:6.0f} ms  "
                      f"p95 {row['p95'] * 1e3:6.0f} ms  p99 {row['p99'] * 1e3:6.0f} ms  failed {row['failed']}  "
                      f"mean batch {row['mean_batch']:.2f}  server {row['server_time_s'] * 1e3:.0f} ms = decode "
                      f"{row['server_decode_s'] * 1e3:.0f} + generate {row['server_generate_s'] * 1e3:.0f}", flush=True)
                for error in row["errors"]:
                    print("   ", error)
    finally:
        serve.shutdown()
        ray.shutdown()

    meta = {"checkpoint": checkpoint, "origin": origin, "generation": generation,
            "video": f"{len(videos)} synthetic 128x128 mp4s of 32 frames",
            "replica_cpus": deployment.get("ray_actor_options", {}).get("num_cpus", 1),
            "max_batch_size": settings.get("max_batch_size"), "batch_wait_timeout_s": settings.get("batch_wait_timeout_s"),
            "host": machine_info(), "load_before": load_before,
            "rounds": args.rounds}
    table = markdown(results, meta)
    print(table)
    if not args.no_write:
        write_section("serve_load", table)
    failed = sum(row["failed"] for rows in results.values() for row in rows)
    return 1 if failed else 0


def run_hostile(args, url: str, videos: list[bytes], spec, settings: dict, deployment: dict, checkpoint: str,
                generation: dict) -> int:
    from ray import serve
    import ray

    level = 16
    total = args.requests or 12 * level
    clean, attacked, answers = Samples(level), Samples(level), {}
    try:
        with tempfile.TemporaryDirectory() as folder:
            hostile = hostile_uploads(Path(folder))
        asyncio.run(run_round(url, videos, 16, args.timeout_s, Samples(8)))  # warm up
        for round_ in range(args.rounds):
            share = total // args.rounds
            asyncio.run(run_round(url, videos, share, args.timeout_s, clean))
            asyncio.run(run_round_under_attack(url, videos, share, args.timeout_s, attacked, hostile, answers))
            print(f"round {round_ + 1}: clean p99 {percentile(clean.latencies, 99):.2f}s, under attack "
                  f"{percentile(attacked.latencies, 99):.2f}s, failed {len(clean.failures)}/{len(attacked.failures)}",
                  flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    meta = {"host": machine_info(), "checkpoint": checkpoint, "generation": generation, "rounds": args.rounds,
            "replica_cpus": deployment.get("ray_actor_options", {}).get("num_cpus", 1),
            "max_batch_size": settings.get("max_batch_size")}
    table = hostile_markdown(clean.summary(), attacked.summary(), answers, meta)
    print(table)
    for error in (clean.failures + attacked.failures)[:5]:
        print("   ", error)
    if not args.no_write:
        write_section("serve_hostile", table)
    return 1 if clean.failures or attacked.failures else 0


if __name__ == "__main__":
    sys.exit(main())
