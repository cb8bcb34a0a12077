"""Scoring speed: stgpt.metrics on Ray against single-process pycocoevalcap, on the real VATEX predictions.

    python benchmarks/eval_bench.py              # writes section "eval" of benchmarks/RESULTS.md
    python benchmarks/eval_bench.py --no-write   # print only

Scores SpaceTimeGPT's 5,295 VATEX test captions (shared/vatex) four ways, one run each, on this machine:

1. pycocoevalcap as its users run it: PTB-tokenise references and predictions, then Cider, Bleu(4), Meteor and
   Rouge in one process (the baseline);
2. `score_captions(num_workers=1)`: the same code path without Ray;
3. `score_captions(num_workers=2)` on a local Ray started with `ray.init(num_cpus=2)`;
4. `score_captions(num_workers=2)` on a simulated three-node cluster (`ray.cluster_utils.Cluster`, one CPU each).

Starting Ray is not timed (a cluster is up before an evaluation job runs): it is reported apart, and Ray gets
SETTLE_SECONDS after starting to finish booting its workers and agents before the clock starts. Ray starts its
workers at nice 15 by default, and the METEOR jars they start inherit that: on a machine shared with other
work they would lose the CPU to it while the baseline, at nice 0, would not. So Ray starts here with
RAY_worker_niceness=0 and the section records the niceness the workers had. Every run's scores must equal the
baseline's (corpus and per video, to 1e-9) or the benchmark fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._results import machine_info  # noqa: E402
from stgpt.metrics import CIDER, METRICS, MetricsReport, score_captions  # noqa: E402

DATA = ROOT.parent / "shared" / "vatex"
TOLERANCE = 1e-9
SETTLE_SECONDS = 10


def load(data: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    references = {r["videoID"]: r["enCap"] for r in json.loads((data / "vatex_test.json").read_text("utf-8"))}
    results = json.loads((data / "spacetimegpt_generated_captions.json").read_text("utf-8"))
    return {r["image_id"]: r["caption"] for r in results}, references


def pycocoevalcap_baseline(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """What a pycocoevalcap user runs; returns corpus and per-video scores under stgpt's metric names."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = [vid for vid in predictions if vid in references]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({vid: [{"caption": c} for c in references[vid]] for vid in ids})
    res = tokenizer.tokenize({vid: [{"caption": predictions[vid]}] for vid in ids})
    corpus, per_metric = {}, {}
    corpus["CIDEr-D"], per_metric["CIDEr-D"] = Cider().compute_score(gts, res)
    bleu, bleu_per_video = Bleu(4).compute_score(gts, res, verbose=0)
    for k in range(4):
        corpus[f"BLEU-{k + 1}"], per_metric[f"BLEU-{k + 1}"] = bleu[k], bleu_per_video[k]
    corpus["METEOR"], per_metric["METEOR"] = Meteor().compute_score(gts, res)
    corpus["ROUGE-L"], per_metric["ROUGE-L"] = Rouge().compute_score(gts, res)
    per_video = {vid: {m: float(scores[i]) for m, scores in per_metric.items()} for i, vid in enumerate(ids)}
    return {"corpus": corpus, "per_video": per_video}


def largest_difference(report: MetricsReport, expected: dict) -> float:
    """Largest absolute difference to the baseline over corpus and per-video scores of every metric."""
    differences = [abs(report.corpus[m] - value) for m, value in expected["corpus"].items()]
    for vid, scores in expected["per_video"].items():
        differences += [abs(report.per_video[vid][m] - value) for m, value in scores.items()]
    return max(differences)


def worker_niceness() -> int:
    """The niceness of a Ray worker process, as the shards' METEOR jars inherit it."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder with vatex_test.json and the predictions")
    parser.add_argument("--no-write", action="store_true", help="print, do not update benchmarks/RESULTS.md")
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_worker_niceness"] = "0"  # as the baseline runs; see the module docstring
    predictions, references = load(args.data)
    host = machine_info()
    runs: list[tuple[str, float, float, MetricsReport | None]] = []  # name, seconds, Ray start seconds, report

    expected, seconds = timed(pycocoevalcap_baseline, predictions, references)
    runs.append(("pycocoevalcap, single process (baseline)", seconds, 0.0, None))
    print(f"baseline: {seconds:.1f} s", flush=True)

    report, seconds = timed(score_captions, predictions, references, num_workers=1)
    runs.append(("stgpt.metrics, num_workers=1 (no Ray)", seconds, 0.0, report))
    print(f"stgpt, 1 worker: {seconds:.1f} s", flush=True)

    niceness = {os.nice(0)}

    def on_ray(name: str, start_ray, stop_ray) -> None:
        """Start Ray (untimed), let it settle, score with two workers (timed), stop Ray."""
        _, start_seconds = timed(start_ray)
        niceness.add(worker_niceness())
        time.sleep(SETTLE_SECONDS)
        try:
            report, seconds = timed(score_captions, predictions, references, num_workers=2)
        finally:
            stop_ray()
        runs.append((name, seconds, start_seconds, report))
        print(f"{name}: {seconds:.1f} s on {len(report.node_ids)} node(s)", flush=True)

    # address="local": a fresh Ray of our own even if another one runs on this machine.
    on_ray(
        "stgpt.metrics, num_workers=2, local Ray `ray.init(num_cpus=2)`",
        lambda: ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False),
        ray.shutdown,
    )
    clusters: list[Cluster] = []

    def start_cluster() -> None:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        clusters.append(cluster)

    def stop_cluster() -> None:
        ray.shutdown()
        clusters.pop().shutdown()

    on_ray("stgpt.metrics, num_workers=2, simulated 3-node cluster (1 CPU per node)", start_cluster, stop_cluster)
    end_load = os.getloadavg()[0]

    baseline_seconds = runs[0][1]
    rows = []
    for name, seconds, start_seconds, run_report in runs:
        if run_report is None:
            difference, nodes = "(reference)", "1"
        else:
            worst = largest_difference(run_report, expected)
            if worst >= TOLERANCE:
                print(f"FAIL: {name} differs from pycocoevalcap by {worst:.3g}", file=sys.stderr)
                return 1
            difference, nodes = f"{worst:.1e}", str(max(1, len(run_report.node_ids)))
        start_note = f"{start_seconds:.1f}" if start_seconds else "-"
        speed_up = baseline_seconds / seconds
        rows.append(f"| {name} | {seconds:.1f} | {speed_up:.2f}x | {nodes} | {difference} | {start_note} |")
    phases = [
        f"- {name}: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in r.timings.items())
        for name, _, _, r in runs
        if r is not None
    ]
    plain = {r.corpus[CIDER] for _, _, _, r in runs if r is not None}
    scores = ", ".join(f"{m} {100 * report.corpus[m]:.2f}" for m in METRICS)

    table = "\n".join([
        "## Evaluation: scoring 5,295 VATEX test captions",
        "",
        f"Host: {host} at the start, {end_load:.1f} at the end (a machine shared with other work, so figures",
        "move between runs). One run of each; `benchmarks/eval_bench.py`. Niceness of the driver and Ray workers: "
        f"{', '.join(map(str, sorted(niceness)))}.",
        "",
        "| run | seconds | speed-up | nodes used | largest score difference to pycocoevalcap "
        f"| Ray start (s, not timed; then {SETTLE_SECONDS} s to settle) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Scores (x100, every stgpt run): {scores}. Plain CIDEr, which pycocoevalcap lacks, was "
        f"{'identical in all runs' if len(plain) == 1 else 'different between runs: ' + str(sorted(plain))}.",
        "The baseline is PTB tokenisation + Cider + Bleu(4) + Meteor + Rouge; stgpt also computes plain CIDEr.",
        "Differences compare all corpus and per-video scores of CIDEr-D, BLEU-1..4, METEOR and ROUGE-L.",
        "",
        "Where the time went (wall-clock per phase; the METEOR jars load during tokenising and counting, and",
        "align during counting and scoring):",
        "",
        *phases,
    ])
    print(table)
    if not args.no_write:
        from benchmarks._results import write_section

        write_section("eval", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
