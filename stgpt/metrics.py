"""Caption metrics as coco-caption computes them (CIDEr-D, CIDEr, BLEU-1..4, METEOR, ROUGE-L), exact when spread
over Ray workers.

Three of them are corpus-level, so averaging per-shard scores would be wrong: CIDEr's document frequencies
are summed over shards into one global table, corpus BLEU's match counts are summed and scored once, and
METEOR's corpus score comes from statistics one jar evaluates after the shards' jars did the alignments. PTB
tokenisation is not split (the Stanford lexer looks across line ends): the driver tokenises references and
predictions in one Java run each. Workers are actors (`_NgramShard`, `_MeteorAligner`), since each keeps state
between phases; with `num_workers` 1, or no Ray connected, everything runs in this process.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import ray

CIDER_D = "CIDEr-D"
CIDER = "CIDEr"
BLEU = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METEOR = "METEOR"
ROUGE_L = "ROUGE-L"
METRICS: tuple[str, ...] = (CIDER_D, CIDER, *BLEU, METEOR, ROUGE_L)

# What each number is; printed under the table and stored in metrics.json so nobody mistakes the variant.
METRIC_NOTES = {
    CIDER_D: "CIDEr-D as pycocoevalcap's Cider computes it: clipped n-gram weights, Gaussian length penalty "
    "(sigma 6), document frequencies of the reference corpus; the headline metric",
    CIDER: "plain CIDEr: tf-idf cosine similarity of 1- to 4-grams, no clipping, no length penalty, document "
    "frequencies of the reference corpus, x10",
    "BLEU-n": "corpus BLEU of pycocoevalcap's Bleu (closest reference length)",
    METEOR: "METEOR 1.5 (-l en -norm) corpus score from summed segment statistics, as pycocoevalcap's Meteor",
    ROUGE_L: "ROUGE-L (beta 1.2) mean over videos, as pycocoevalcap's Rouge",
}

_NGRAM_ORDERS = 4  # CIDEr and BLEU both use 1- to 4-grams
_CIDER_SIGMA = 6.0  # CIDEr-D's length-penalty width, pycocoevalcap's default
# Characters the PTB tokenizer treats as line ends. pycocoevalcap only replaces "\n", so any of the others
# inside a caption shifts every later caption onto the wrong video; we replace them all with spaces.
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\u2028\u2029"})


@dataclass
class MetricsReport:
    """Scores of one evaluation, on the videos that have both a prediction and references.

    Scores keep pycocoevalcap's scale (BLEU, METEOR, ROUGE-L in 0..1, CIDEr in 0..10); `format_table` shows
    them x100 as papers do.
    """

    corpus: dict[str, float]
    per_video: dict[str, dict[str, float]]
    predictions_without_reference: list[str] = field(default_factory=list)
    references_without_prediction: list[str] = field(default_factory=list)
    empty_predictions: list[str] = field(default_factory=list)
    num_workers: int = 1
    meteor_jars: int = 0  # METEOR jars that aligned segments in parallel
    node_ids: list[str] = field(default_factory=list)  # Ray nodes the workers ran on; empty without Ray
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, for profiling

    @property
    def num_scored(self) -> int:
        """How many videos were scored (predictions that have references)."""
        return len(self.per_video)

    def worst(self, n: int = 10, metric: str = CIDER_D) -> list[tuple[str, float]]:
        """The `n` videos with the lowest `metric`, lowest first, for error analysis."""
        if metric not in self.corpus:
            raise ValueError(f"{metric!r} was not computed; available: {sorted(self.corpus)}")
        ranked = sorted(self.per_video.items(), key=lambda item: (item[1][metric], item[0]))
        return [(video_id, scores[metric]) for video_id, scores in ranked[:n]]

    def format_table(self, worst: int = 5) -> str:
        """A readable table for stdout: corpus scores x100, what was left out, and the worst videos."""
        lines = [f"Caption metrics on {self.num_scored:,} videos (x100; {self.num_workers} worker(s))", ""]
        lines += [f"  {'metric':<9} {'score':>7}", f"  {'-' * 9} {'-' * 7}"]
        lines += [f"  {name:<9} {100 * value:>7.2f}" for name, value in self.corpus.items()]
        lines.append("")
        lines += [f"  {name}: {note}" for name, note in METRIC_NOTES.items() if _note_applies(name, self.corpus)]
        lines += [
            "",
            f"Not scored: {len(self.predictions_without_reference):,} prediction(s) without references, "
            f"{len(self.references_without_prediction):,} reference video(s) without a prediction.",
        ]
        if self.empty_predictions:
            lines.append(f"Empty predictions (scored as they are): {len(self.empty_predictions):,}.")
        headline = CIDER_D if CIDER_D in self.corpus else next(iter(self.corpus))
        if worst and self.per_video:
            lines += ["", f"Worst {min(worst, self.num_scored)} by {headline}:"]
            lines += [f"  {100 * score:7.2f}  {video_id}" for video_id, score in self.worst(worst, headline)]
        return "\n".join(lines)

    def to_dict(self, per_video: bool = True) -> dict[str, Any]:
        """Everything as plain JSON types; `per_video=False` leaves the per-video scores out."""
        out: dict[str, Any] = {
            "num_scored": self.num_scored,
            "corpus": self.corpus,
            "notes": {name: note for name, note in METRIC_NOTES.items() if _note_applies(name, self.corpus)},
            "predictions_without_reference": self.predictions_without_reference,
            "references_without_prediction": self.references_without_prediction,
            "empty_predictions": self.empty_predictions,
            "num_workers": self.num_workers,
            "meteor_jars": self.meteor_jars,
            "node_ids": self.node_ids,
            "timings": self.timings,
        }
        if per_video:
            out["per_video"] = self.per_video
        return out

    def to_json(self, per_video: bool = True) -> str:
        """The report as JSON text, e.g. for a job's metrics.json."""
        return json.dumps(self.to_dict(per_video=per_video), indent=2)


def _note_applies(name: str, corpus: Mapping[str, float]) -> bool:
    return name in corpus or (name == "BLEU-n" and any(b in corpus for b in BLEU))


def score_captions(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    num_workers: int | None = None,
    metrics: Iterable[str] = METRICS,
) -> MetricsReport:
    """Score predicted captions against references, as single-process pycocoevalcap would.

    `predictions` maps a video id to its caption, `references` a video id to its reference captions. Only
    videos in both are scored; the others are listed in the report. `num_workers` None or 1 scores in this
    process; more spreads the videos over that many Ray actors (capped at the cluster's CPUs), initialising a
    local Ray if none is. `metrics` picks a subset of `METRICS`.
    """
    wanted = _check_metrics(metrics)
    ids, without_reference, without_prediction = _pair_up(predictions, references)
    if not ids:
        raise ValueError(
            f"no video has both a prediction and references ({len(predictions)} prediction(s), "
            f"{len(references)} reference video(s)): check that both use the same video ids"
        )
    _check_java()
    pairs = [(predictions[vid], list(references[vid])) for vid in ids]

    workers = _worker_count(num_workers, len(pairs))
    num_aligners = max(1, workers // 2) if METEOR in wanted else 0
    num_shards = max(1, workers - num_aligners)
    results, meteor, node_ids, timings = _run_workers(pairs, wanted, num_shards, num_aligners, ray=workers > 1)

    corpus, per_video = _combine(ids, results, meteor, wanted)
    return MetricsReport(
        corpus=corpus,
        per_video=per_video,
        predictions_without_reference=without_reference,
        references_without_prediction=without_prediction,
        empty_predictions=[vid for vid in ids if not predictions[vid].strip()],
        num_workers=workers,
        meteor_jars=num_aligners,
        node_ids=node_ids,
        timings=timings,
    )


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _check_metrics(metrics: Iterable[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown or not wanted:
        raise ValueError(f"unknown or no metrics {unknown}; choose from {list(METRICS)}")
    return tuple(m for m in METRICS if m in wanted)  # canonical order


def _pair_up(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[list[str], list[str], list[str]]:
    """Ids to score (in prediction order), predictions without references, references without prediction."""
    if not predictions:
        raise ValueError("no predictions to score")
    if not references:
        raise ValueError("no references to score against")
    for vid, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"prediction for {vid!r} is {type(caption).__name__}, not a caption string")
    for vid, captions in references.items():
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"references for {vid!r} must be a list of caption strings, not {type(captions).__name__}")
        if not all(isinstance(c, str) for c in captions):
            raise TypeError(f"references for {vid!r} contain a non-string caption")
    empty = [vid for vid in predictions if vid in references and not references[vid]]
    if empty:
        raise ValueError(f"{len(empty)} video(s) have an empty reference list, e.g. {empty[:5]}")
    ids = [vid for vid in predictions if vid in references]
    without_reference = [vid for vid in predictions if vid not in references]
    without_prediction = [vid for vid in references if vid not in predictions]
    return ids, without_reference, without_prediction


def _check_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("PTB tokenisation and METEOR run Java (pycocoevalcap's jars): install a JRE")


def _worker_count(num_workers: int | None, num_videos: int) -> int:
    if num_workers is None or num_workers <= 1:
        return 1
    if not ray.is_initialized():  # the library never starts Ray: jobs connect (stgpt.launch), else one process
        return 1
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(num_workers, cpus, num_videos))


# ----------------------------------------------------------------------------------------------------------
# Running the workers: in this process or as Ray actors
# ----------------------------------------------------------------------------------------------------------


def _run_workers(
    pairs: list[tuple[str, list[str]]], wanted: tuple[str, ...], num_shards: int, num_aligners: int, ray: bool
) -> tuple[list["_ShardResult"], "_MeteorEval | None", list[str], dict[str, float]]:
    """Tokenise, then run the workers' phases with a barrier after each: in this process, or as Ray actors.

    Returns the shards' results, METEOR's evaluation, the Ray nodes used and seconds per phase.
    """
    if ray:
        import ray as ray_module

        def start(worker_class: type, count: int) -> list:
            actor_class = ray_module.remote(num_cpus=1, scheduling_strategy="SPREAD")(worker_class)
            return [actor_class.remote() for _ in range(count)]

        def call(workers: list, method: str, args: list[tuple]) -> list:
            return ray_module.get([getattr(w, method).remote(*a) for w, a in zip(workers, args, strict=True)])

        share = ray_module.put
    else:

        def start(worker_class: type, count: int) -> list:
            return [worker_class() for _ in range(count)]

        def call(workers: list, method: str, args: list[tuple]) -> list:
            return [getattr(w, method)(*a) for w, a in zip(workers, args, strict=True)]

        def share(value: Any) -> Any:
            return value

    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        timings[phase], clock = time.perf_counter() - clock, time.perf_counter()

    aligners = start(_MeteorAligner, num_aligners)  # their jars load from here on
    shards = start(_NgramShard, num_shards) if set(wanted) - {METEOR} else []
    try:
        hyps, refs = _tokenize(pairs)
        lap("tokenise")
        call(aligners, "align", [(hyps[s], refs[s]) for s in _slices(len(pairs), num_aligners)])  # returns at once
        shard_inputs = [(hyps[s], refs[s], wanted) for s in _slices(len(pairs), len(shards))]
        partial_counts = call(shards, "count_ngrams", shard_inputs)
        # Document frequencies of the whole reference corpus: the shards' counts add up exactly.
        document_frequency = share(_add_counts(partial_counts))
        lap("count n-grams")
        results = call(shards, "score", [(document_frequency, len(pairs))] * len(shards))
        lap("score")
        meteor = None
        if aligners:
            statistics = call(aligners, "statistics", [()] * len(aligners))
            lap("METEOR align (rest)")
            meteor = call(aligners[:1], "evaluate", [([stat for part in statistics for stat in part],)])[0]
            lap("METEOR EVAL")
        workers = aligners + shards
        node_ids = sorted(set(call(workers, "node_id", [()] * len(workers)))) if ray else []
    finally:
        with contextlib.suppress(Exception):  # an error while closing must not hide the one that got us here
            call(aligners, "close", [()] * len(aligners))
    return results, meteor, node_ids, timings


def _slices(length: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of nearly equal size covering range(length)."""
    bounds = np.linspace(0, length, parts + 1).astype(int)
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _add_counts(parts: list[Mapping[str, int]]) -> dict[str, int]:
    """The corpus's document frequencies from the shards', keeping only n-grams in two or more videos.

    CIDEr weighs an n-gram by log(max(1, df)), so a frequency of 1 weighs like an n-gram never seen: leaving
    those out (about five in six n-grams of VATEX) shrinks what every shard receives without changing a score.
    """
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return {ngram: count for ngram, count in total.items() if count > 1}


# ----------------------------------------------------------------------------------------------------------
# The two kinds of worker
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _ShardResult:
    """Per-video CIDEr and ROUGE-L scores and BLEU statistics of one shard, in the shard's video order."""

    cider_d: list[float]
    cider: list[float]
    rouge_l: list[float]
    bleu_stats: list[dict]  # pycocoevalcap's cook_test output per video


@dataclass
class _MeteorEval:
    corpus: float
    per_video: list[float]


class _NgramShard:
    """CIDEr, BLEU and ROUGE-L for a slice of the videos: count n-grams, then score once the corpus's counts
    are known."""

    def __init__(self) -> None:
        self._metrics: tuple[str, ...] = ()
        self._hyps: list[str] = []
        self._refs: list[list[str]] = []
        self._hyp_counts: list[list[dict[str, int]]] = []
        self._ref_counts: list[list[list[dict[str, int]]]] = []

    def count_ngrams(self, hyps: list[str], refs: list[list[str]], metrics: tuple[str, ...]) -> Mapping[str, int]:
        """Take this shard's tokenised captions and return their references' document frequencies."""
        self._hyps, self._refs, self._metrics = hyps, refs, metrics
        if not any(m in metrics for m in (CIDER_D, CIDER, *BLEU)):
            return {}
        self._hyp_counts = [_ngram_counts(h) for h in hyps]
        self._ref_counts = [[_ngram_counts(r) for r in group] for group in refs]
        if CIDER_D not in metrics and CIDER not in metrics:
            return {}
        frequency: Counter[str] = Counter()
        for group in self._ref_counts:
            frequency.update({ngram for ref in group for order in ref for ngram in order})
        return frequency

    def score(self, document_frequency: Mapping[str, int], num_videos: int) -> _ShardResult:
        """Score this shard's videos given the whole corpus's document frequencies and size."""
        cider_d: list[float] = []
        cider: list[float] = []
        if CIDER_D in self._metrics or CIDER in self._metrics:
            cider_d, cider = _cider(self._hyp_counts, self._ref_counts, document_frequency, num_videos)
        bleu_stats = []
        if any(b in self._metrics for b in BLEU):
            bleu_stats = [_bleu_stats(h, refs) for h, refs in zip(self._hyp_counts, self._ref_counts)]
        rouge_l = []
        if ROUGE_L in self._metrics:
            rouge_l = [_rouge_l(h, refs) for h, refs in zip(self._hyps, self._refs)]
        return _ShardResult(cider_d, cider, rouge_l, bleu_stats)

    def node_id(self) -> str:
        return _node_id()


class _MeteorAligner:
    """A METEOR jar (pycocoevalcap's wrapper) that aligns a slice of the segments in the background."""

    def __init__(self) -> None:
        self._meteor = _start_meteor()  # loads its paraphrase table while the driver tokenises
        self._thread: threading.Thread | None = None
        self._statistics: list[str] = []
        self._error: RuntimeError | None = None

    def align(self, hyps: list[str], refs: list[list[str]]) -> None:
        """Start aligning these tokenised segments; `statistics` returns the result."""
        self._thread = threading.Thread(target=self._align, args=(hyps, refs), daemon=True)
        self._thread.start()

    def statistics(self) -> list[str]:
        """The jar's sufficient statistics per segment, in order, once aligning is done."""
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._statistics

    def evaluate(self, statistics: list[str]) -> _MeteorEval:
        """Run the jar's EVAL over the statistics of *all* aligners: the corpus score and per video."""
        process = self._meteor.meteor_p
        with self._meteor.lock:
            process.stdin.write(("EVAL ||| " + " ||| ".join(statistics) + "\n").encode())
            process.stdin.flush()
            per_video = [float(_read_meteor_line(process)) for _ in statistics]
            corpus = float(_read_meteor_line(process))
        return _MeteorEval(corpus, per_video)

    def close(self) -> None:
        """Stop the jar (an actor that Ray kills would otherwise leave it running)."""
        self._meteor.meteor_p.kill()
        self._meteor.meteor_p.wait()

    def node_id(self) -> str:
        return _node_id()

    def _align(self, hyps: list[str], refs: list[list[str]]) -> None:
        """Send every SCORE line at once and read the statistics back, in order.

        pycocoevalcap's `_stat` waits for each answer before sending the next line, so the jar idles whenever
        the Python side is not scheduled; a writer thread keeps it fed instead. The lines are `_stat`'s.
        """
        process = self._meteor.meteor_p
        lines = "".join(_meteor_score_line(h, r) + "\n" for h, r in zip(hyps, refs))

        def write() -> None:
            with contextlib.suppress(BrokenPipeError):  # the jar died: the reader below says why
                process.stdin.write(lines.encode())
                process.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            self._statistics = [_read_meteor_line(process) for _ in hyps]
        except RuntimeError as error:
            self._error = error
        writer.join()


def _node_id() -> str:
    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # pragma: no cover - no Ray at all
        return ""


# ----------------------------------------------------------------------------------------------------------
# Metric kernels
# ----------------------------------------------------------------------------------------------------------


def _tokenize(pairs: list[tuple[str, list[str]]]) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenise as pycocoevalcap's users do: all references in one Java run, all predictions in another.

    The two runs go concurrently. Each sees exactly the lines it would see in coco-caption, which matters
    because the lexer looks across line ends.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    def captions(texts: Iterable[list[str]]) -> dict[int, list[dict[str, str]]]:
        return {i: [{"caption": c.translate(_LINE_BREAKS)} for c in group] for i, group in enumerate(texts)}

    with ThreadPoolExecutor(max_workers=2) as pool:
        refs = pool.submit(PTBTokenizer().tokenize, captions(refs for _, refs in pairs))
        hyps = pool.submit(PTBTokenizer().tokenize, captions([hyp] for hyp, _ in pairs))
        refs_by_video, hyps_by_video = refs.result(), hyps.result()
    return [hyps_by_video[i][0] for i in range(len(pairs))], [refs_by_video[i] for i in range(len(pairs))]


def _ngram_counts(sentence: str) -> list[dict[str, int]]:
    """Counts of the 1- to 4-grams of a tokenised sentence, one dict per order, n-grams as space-joined text."""
    words = sentence.split()
    counts = [Counter(words)]
    grams = words
    for _ in range(1, _NGRAM_ORDERS):
        grams = [g + " " + w for g, w in zip(grams, words[len(words) - len(grams) + 1 :])]
        counts.append(Counter(grams))
    return counts


def _cider(
    hyp_counts: list[list[dict[str, int]]],
    ref_counts: list[list[list[dict[str, int]]]],
    document_frequency: Mapping[str, int],
    num_videos: int,
) -> tuple[list[float], list[float]]:
    """Per-video CIDEr-D (as pycocoevalcap's CiderScorer) and plain CIDEr, sharing the tf-idf weights.

    Both weigh an n-gram by term frequency x log(corpus size / max(1, document frequency)) and average, over
    the 1- to 4-gram orders and over references, the cosine similarity of prediction and reference, x10.
    CIDEr-D clips the prediction's weights at the reference's and multiplies by exp(-(length difference)^2 /
    2 sigma^2), lengths counted as pycocoevalcap counts them (number of bigrams). Sums run in the order
    pycocoevalcap's run, so the floats agree to the last bits or nearly.
    """
    log_corpus = math.log(float(num_videos))
    idf_cache: dict[str, float] = {}

    def idf(gram: str) -> float:
        weight = idf_cache.get(gram)
        if weight is None:
            weight = idf_cache[gram] = log_corpus - math.log(max(1.0, document_frequency.get(gram, 0.0)))
        return weight

    penalty_denominator = 2 * _CIDER_SIGMA**2
    cider_d, cider = [], []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_weights = [{gram: tf * idf(gram) for gram, tf in order.items()} for order in hyp]
        hyp_norms = [math.sqrt(sum([w * w for w in weights.values()])) for weights in hyp_weights]
        hyp_len = sum(hyp[1].values())
        clipped_sum = [0.0] * _NGRAM_ORDERS
        plain_sum = [0.0] * _NGRAM_ORDERS
        for ref in refs:
            penalty = math.exp(-((hyp_len - sum(ref[1].values())) ** 2) / penalty_denominator)
            for n, ref_order in enumerate(ref):
                ref_norm = math.sqrt(sum([(tf * idf(gram)) ** 2 for gram, tf in ref_order.items()]))
                clipped = plain = 0.0
                for gram, weight in hyp_weights[n].items():
                    ref_tf = ref_order.get(gram)
                    if ref_tf is not None:
                        ref_weight = ref_tf * idf(gram)
                        clipped += min(weight, ref_weight) * ref_weight
                        plain += weight * ref_weight
                if hyp_norms[n] != 0 and ref_norm != 0:
                    clipped /= hyp_norms[n] * ref_norm
                    plain /= hyp_norms[n] * ref_norm
                clipped_sum[n] += clipped * penalty
                plain_sum[n] += plain
        cider_d.append(sum(clipped_sum) / _NGRAM_ORDERS / len(refs) * 10.0)
        cider.append(sum(plain_sum) / _NGRAM_ORDERS / len(refs) * 10.0)
    return cider_d, cider


def _bleu_stats(hyp: list[dict[str, int]], refs: list[list[dict[str, int]]]) -> dict:
    """pycocoevalcap's `cook_test(hyp, cook_refs(refs))`, from the n-gram counts already made for CIDEr.

    Lengths of the references, the prediction's length, its n-gram count per order ("guess") and how many of
    them the references support, clipped at the most any one reference has ("correct").
    """
    length = sum(hyp[0].values())
    return {
        "reflen": [sum(ref[0].values()) for ref in refs],
        "testlen": length,
        "guess": [max(0, length - k) for k in range(_NGRAM_ORDERS)],
        "correct": [
            sum(min(count, max(ref[k].get(gram, 0) for ref in refs)) for gram, count in hyp[k].items())
            for k in range(_NGRAM_ORDERS)
        ],
    }


def _corpus_bleu(stats: list[dict]) -> tuple[list[float], list[list[float]]]:
    """Corpus and per-video BLEU-1..4 from all videos' statistics, by pycocoevalcap's BleuScorer."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    scorer.ctest = list(stats)
    scorer.crefs = [None] * len(stats)  # only its length is used once the statistics are cooked
    return scorer.compute_score(option="closest", verbose=0)


def _rouge_l(hyp: str, refs: list[str], beta: float = 1.2) -> float:
    """pycocoevalcap's `Rouge().calc_score([hyp], refs)`, with a bit-parallel longest common subsequence.

    pycocoevalcap fills an n x m table in Python; the bit-vector algorithm (Allison & Dix 1986) gives the same
    lengths about fifteen times faster. Tokens are split on single spaces, as pycocoevalcap splits them.
    """
    hyp_tokens = hyp.split(" ")
    positions: dict[str, int] = {}  # token -> bit mask of where it occurs in the prediction
    for i, token in enumerate(hyp_tokens):
        positions[token] = positions.get(token, 0) | (1 << i)
    all_ones = (1 << len(hyp_tokens)) - 1
    best_precision = best_recall = 0.0
    for ref in refs:
        ref_tokens = ref.split(" ")
        row = all_ones
        for token in ref_tokens:
            matches = row & positions.get(token, 0)
            row = ((row + matches) | (row - matches)) & all_ones
        lcs = len(hyp_tokens) - row.bit_count()
        best_precision = max(best_precision, lcs / float(len(hyp_tokens)))
        best_recall = max(best_recall, lcs / float(len(ref_tokens)))
    if best_precision != 0 and best_recall != 0:
        return ((1 + beta**2) * best_precision * best_recall) / float(best_recall + beta**2 * best_precision)
    return 0.0


def _read_meteor_line(process: Any) -> str:
    """One answer line from the METEOR jar, or an error with what the jar printed if it has stopped."""
    line = process.stdout.readline()
    if not line:
        message = process.stderr.read().decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"the METEOR jar stopped (exit code {process.wait()}): {message or 'no message'}")
    return line.decode().strip()


def _meteor_score_line(hyp: str, refs: list[str]) -> str:
    """The line pycocoevalcap's `Meteor._stat` sends: SCORE ||| reference ||| ... ||| prediction."""
    hyp = hyp.replace("|||", "").replace("  ", " ")
    return " ||| ".join(("SCORE", " ||| ".join(refs), hyp))


def _start_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


# ----------------------------------------------------------------------------------------------------------
# Combining the workers' results
# ----------------------------------------------------------------------------------------------------------


def _combine(
    ids: list[str], results: list[_ShardResult], meteor: _MeteorEval | None, wanted: tuple[str, ...]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus and per-video scores from the shards' results, which are in `ids` order."""
    per_metric: dict[str, list[float]] = {}
    corpus: dict[str, float] = {}
    for name, attribute in ((CIDER_D, "cider_d"), (CIDER, "cider"), (ROUGE_L, "rouge_l")):
        if name in wanted:
            per_metric[name] = [score for r in results for score in getattr(r, attribute)]
            corpus[name] = float(np.mean(np.array(per_metric[name])))
    bleu_names = [b for b in BLEU if b in wanted]
    if bleu_names:
        bleu, bleu_per_video = _corpus_bleu([s for r in results for s in r.bleu_stats])
        for k, name in enumerate(BLEU):
            if name in wanted:
                corpus[name], per_metric[name] = float(bleu[k]), bleu_per_video[k]
    if meteor is not None:
        corpus[METEOR], per_metric[METEOR] = meteor.corpus, meteor.per_video
    corpus = {name: corpus[name] for name in METRICS if name in corpus}
    per_video = {vid: {name: float(per_metric[name][i]) for name in corpus} for i, vid in enumerate(ids)}
    return corpus, per_video
