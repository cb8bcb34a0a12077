"""stgpt.metrics against single-process pycocoevalcap: random corpora, the real VATEX data, edge cases.

Every comparison is per video and for the corpus, to 1e-9. The reference side is pycocoevalcap used the way
coco-caption uses it: PTB-tokenise references and predictions, then Bleu, Meteor, Rouge and Cider. Plain CIDEr
has no pycocoevalcap class; its reference here is written from the definition on top of pycocoevalcap's own
n-gram counts and document frequencies.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from stgpt.metrics import BLEU, CIDER, CIDER_D, METEOR, METRICS, ROUGE_L, MetricsReport, score_captions

VATEX = Path(__file__).resolve().parents[1].parent / "shared" / "vatex"
TOLERANCE = 1e-9
NO_METEOR = tuple(m for m in METRICS if m != METEOR)

# Zipf-weighted so that n-grams repeat across videos and document frequencies matter; capitals and
# punctuation give the PTB tokenizer something to do.
VOCABULARY = (
    "a the man woman is are playing A The guitar dog runs on grass , while singing in room two people dance "
    "kitchen cooking food child rides bike street ball throws catches park water swims pool outside and with "
    "his her their young old red blue car drives road fast slowly 's n't - ( ) \" ; ?"
).split()


def random_corpus(seed: int, num_videos: int, words=VOCABULARY) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Predictions and 1-10 references per video, sentences of 1-15 Zipf-distributed words."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(words))]

    def sentence() -> str:
        text = " ".join(rng.choices(words, weights, k=rng.randint(1, 15)))
        return text + rng.choice(["", ".", " .", "!"])

    ids = [f"video{seed}_{i:04d}" for i in range(num_videos)]
    references = {vid: [sentence() for _ in range(rng.randint(1, 10))] for vid in ids}
    predictions = {vid: sentence() for vid in ids}
    return predictions, references


def pycocoevalcap_scores(
    predictions: dict[str, str], references: dict[str, list[str]], metrics=NO_METEOR
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus and per-video scores of single-process pycocoevalcap on the videos in both dicts."""
    ids = [vid for vid in predictions if vid in references]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({vid: [{"caption": c} for c in references[vid]] for vid in ids})
    res = tokenizer.tokenize({vid: [{"caption": predictions[vid]}] for vid in ids})
    corpus: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    if CIDER_D in metrics:
        corpus[CIDER_D], per_metric[CIDER_D] = Cider().compute_score(gts, res)
    if CIDER in metrics:
        corpus[CIDER], per_metric[CIDER] = plain_cider(gts, res)
    if any(b in metrics for b in BLEU):
        bleu, bleu_per_video = Bleu(4).compute_score(gts, res, verbose=0)
        for k, name in enumerate(BLEU):
            corpus[name], per_metric[name] = bleu[k], bleu_per_video[k]
    if METEOR in metrics:
        corpus[METEOR], per_metric[METEOR] = Meteor().compute_score(gts, res)
    if ROUGE_L in metrics:
        corpus[ROUGE_L], per_metric[ROUGE_L] = Rouge().compute_score(gts, res)
    per_video = {vid: {m: float(per_metric[m][i]) for m in corpus} for i, vid in enumerate(ids)}
    return corpus, per_video


def plain_cider(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    """CIDEr by its definition (tf-idf cosine of 1-4-grams averaged over references and orders, x10; no
    clipping, no length penalty), on pycocoevalcap's n-gram counts and corpus document frequencies."""
    scorer = CiderScorer(n=4)
    for vid in gts:
        scorer += (res[vid][0], gts[vid])
    scorer.compute_doc_freq()
    log_corpus = np.log(float(len(scorer.crefs)))

    def by_order(counts) -> list[dict]:
        vectors = [{} for _ in range(4)]
        for gram, tf in counts.items():
            vectors[len(gram) - 1][gram] = tf * (log_corpus - np.log(max(1.0, scorer.document_frequency[gram])))
        return vectors

    def cosine(a: dict, b: dict) -> float:
        norms = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
        return sum(v * b.get(g, 0.0) for g, v in a.items()) / norms if norms else 0.0

    scores = []
    for test, refs in zip(scorer.ctest, scorer.crefs):
        hyp = by_order(test)
        per_ref = [np.mean([cosine(hyp[n], ref[n]) for n in range(4)]) for ref in map(by_order, refs)]
        scores.append(10.0 * float(np.mean(per_ref)))
    return float(np.mean(scores)), scores


def assert_same_scores(report: MetricsReport, expected: tuple[dict, dict], metrics) -> None:
    corpus, per_video = expected
    assert set(metrics) <= set(report.corpus)
    assert report.per_video.keys() == per_video.keys()
    for metric in metrics:
        assert abs(report.corpus[metric] - corpus[metric]) < TOLERANCE, metric
        worst = max(abs(report.per_video[v][metric] - per_video[v][metric]) for v in per_video)
        assert worst < TOLERANCE, f"{metric}: per-video difference {worst}"


# ----------------------------------------------------------------------------------------------------------
# Exactness on random corpora
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parallel_equals_pycocoevalcap_on_random_corpora(ray_cluster, seed):
    predictions, references = random_corpus(seed, num_videos=120 + 50 * seed)
    expected = pycocoevalcap_scores(predictions, references)

    report = score_captions(predictions, references, num_workers=3, metrics=NO_METEOR)

    assert_same_scores(report, expected, NO_METEOR)
    assert report.num_workers == 3
    assert len(report.node_ids) > 1, "the shards should have been spread over several nodes"


def test_single_process_equals_pycocoevalcap():
    predictions, references = random_corpus(seed=3, num_videos=100)
    expected = pycocoevalcap_scores(predictions, references)

    report = score_captions(predictions, references, metrics=NO_METEOR)

    assert_same_scores(report, expected, NO_METEOR)
    assert report.num_workers == 1 and report.node_ids == []


def test_meteor_corpus_score_comes_from_summed_statistics(ray_cluster):
    """METEOR's corpus score is not the mean of segment scores; two jars' statistics are evaluated together."""
    predictions, references = random_corpus(seed=4, num_videos=150)
    expected = pycocoevalcap_scores(predictions, references, metrics=METRICS)

    report = score_captions(predictions, references, num_workers=4)

    assert_same_scores(report, expected, METRICS)
    assert report.meteor_jars == 2 and len(report.node_ids) > 1
    segment_mean = np.mean([scores[METEOR] for scores in report.per_video.values()])
    assert abs(segment_mean - report.corpus[METEOR]) > 1e-3  # so averaging shard scores would be wrong


def test_per_shard_document_frequencies_would_be_wrong(ray_cluster):
    """Two halves about different things: each half's own document frequencies give another CIDEr-D."""
    dogs = [w for w in VOCABULARY if w not in {"guitar", "singing", "dance"}] + ["dog", "barks"] * 3
    music = [w for w in VOCABULARY if w not in {"dog", "ball", "catches"}] + ["guitar", "drums"] * 3
    predictions, references = random_corpus(seed=5, num_videos=80, words=dogs)
    more_predictions, more_references = random_corpus(seed=6, num_videos=80, words=music)
    predictions.update(more_predictions)
    references.update(more_references)
    expected = pycocoevalcap_scores(predictions, references, metrics=(CIDER_D,))

    # The naive way: pycocoevalcap on each half, averaged (both halves have 80 videos).
    halves = [dict(list(predictions.items())[:80]), dict(list(predictions.items())[80:])]
    naive = np.mean([pycocoevalcap_scores(half, references, metrics=(CIDER_D,))[0][CIDER_D] for half in halves])
    report = score_captions(predictions, references, num_workers=2, metrics=(CIDER_D,))

    assert abs(naive - expected[0][CIDER_D]) > 1e-3
    assert_same_scores(report, expected, (CIDER_D,))


def test_rouge_and_bleu_kernels_equal_pycocoevalcap_on_random_sentences():
    """The faster ROUGE-L (bit-parallel LCS) and BLEU statistics (from shared n-gram counts) change nothing."""
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    from stgpt.metrics import _bleu_stats, _ngram_counts, _rouge_l

    rng = random.Random(11)
    words = ["a", "b", "c", "d", "e", "a b", "f"]  # few words: many repeats and long common subsequences
    for _ in range(500):
        hyp = " ".join(rng.choices(words, k=rng.randint(0, 70)))
        refs = [" ".join(rng.choices(words, k=rng.randint(0, 70))) for _ in range(rng.randint(1, 5))]
        assert _rouge_l(hyp, refs) == Rouge().calc_score([hyp], refs)
        hyp_counts, ref_counts = _ngram_counts(hyp), [_ngram_counts(r) for r in refs]
        assert _bleu_stats(hyp_counts, ref_counts) == cook_test(hyp, cook_refs(refs))


# ----------------------------------------------------------------------------------------------------------
# The real data
# ----------------------------------------------------------------------------------------------------------


def load_vatex() -> tuple[dict[str, str], dict[str, list[str]]]:
    if not VATEX.is_dir():
        pytest.skip(f"the VATEX reference data is not at {VATEX} (shared/ beside the repository)")
    references = {r["videoID"]: r["enCap"] for r in json.loads((VATEX / "vatex_test.json").read_text("utf-8"))}
    results = json.loads((VATEX / "spacetimegpt_generated_captions.json").read_text("utf-8"))
    return {r["image_id"]: r["caption"] for r in results}, references


def test_real_vatex_data(ray_cluster):
    """All 5,295 predictions: pycocoevalcap's scores, and the figures in shared/vatex/README.md."""
    predictions, references = load_vatex()
    report = score_captions(predictions, references, num_workers=2)

    assert report.num_scored == 5295 and report.meteor_jars == 1
    assert report.predictions_without_reference == []
    assert len(report.references_without_prediction) == 5336 - 5295
    readme = {CIDER_D: 51.68, CIDER: 63.65, "BLEU-4": 31.41, METEOR: 22.98, ROUGE_L: 48.93}
    assert {m: round(100 * report.corpus[m], 2) for m in readme} == readme

    assert_same_scores(report, pycocoevalcap_scores(predictions, references), NO_METEOR)
    # METEOR: pycocoevalcap on a subset (its segment scores do not depend on the other segments).
    subset = dict(list(predictions.items())[:300])
    _, meteor_per_video = pycocoevalcap_scores(subset, references, metrics=(METEOR,))
    assert max(abs(report.per_video[v][METEOR] - s[METEOR]) for v, s in meteor_per_video.items()) < TOLERANCE


# ----------------------------------------------------------------------------------------------------------
# Inputs that are not clean
# ----------------------------------------------------------------------------------------------------------


def test_mismatched_ids_are_reported_and_the_intersection_scored():
    predictions, references = random_corpus(seed=7, num_videos=60)
    extra_predictions = {"no_refs_1": "a man", "no_refs_2": "a dog"}
    dropped = list(references)[:5]
    partial_references = {vid: refs for vid, refs in references.items() if vid not in dropped}
    expected = pycocoevalcap_scores(predictions, partial_references, metrics=(CIDER_D, "BLEU-4"))

    report = score_captions({**predictions, **extra_predictions}, partial_references, metrics=(CIDER_D, "BLEU-4"))

    assert report.predictions_without_reference == [*dropped, "no_refs_1", "no_refs_2"]
    assert report.references_without_prediction == []
    assert report.num_scored == 55
    assert_same_scores(report, expected, (CIDER_D, "BLEU-4"))

    report = score_captions({vid: predictions[vid] for vid in list(predictions)[10:]}, references, metrics=(CIDER_D,))
    assert report.references_without_prediction == list(references)[:10]


def test_empty_and_punctuation_only_predictions_are_scored_like_pycocoevalcap():
    predictions, references = random_corpus(seed=8, num_videos=40)
    first, second, third = list(predictions)[:3]
    predictions.update({first: "", second: " ... ", third: "   "})
    expected = pycocoevalcap_scores(predictions, references)

    report = score_captions(predictions, references, metrics=NO_METEOR)

    assert_same_scores(report, expected, NO_METEOR)
    assert report.empty_predictions == [first, third]
    assert report.per_video[first][CIDER_D] == 0.0


def test_line_separators_inside_a_caption_do_not_shift_the_others():
    """pycocoevalcap only replaces "\\n"; a "\\r" makes its tokenizer misalign every later caption."""
    predictions, references = random_corpus(seed=9, num_videos=30)
    first = next(iter(predictions))
    clean = dict(predictions, **{first: "a man plays the guitar"})
    broken = dict(predictions, **{first: "a man\rplays the\u2028guitar"})

    second = list(predictions)[1]
    tokenize = PTBTokenizer().tokenize
    assert tokenize({v: [{"caption": c}] for v, c in broken.items()})[second] != tokenize(
        {v: [{"caption": c}] for v, c in clean.items()}
    )[second]

    assert score_captions(broken, references, metrics=(CIDER_D,)).per_video == score_captions(
        clean, references, metrics=(CIDER_D,)
    ).per_video


@pytest.mark.parametrize(
    "predictions, references, error, message",
    [
        ({}, {"v": ["a man"]}, ValueError, "no predictions"),
        ({"v": "a man"}, {}, ValueError, "no references"),
        ({"v": "a man"}, {"w": ["a man"]}, ValueError, "same video ids"),
        ({"v": "a man"}, {"v": []}, ValueError, "empty reference list"),
        ({"v": None}, {"v": ["a man"]}, TypeError, "not a caption string"),
        ({"v": "a man"}, {"v": "a man"}, TypeError, "list of caption strings"),
        ({"v": "a man"}, {"v": ["a man", 3]}, TypeError, "non-string caption"),
    ],
)
def test_bad_inputs_give_clear_errors(predictions, references, error, message):
    with pytest.raises(error, match=message):
        score_captions(predictions, references)


def test_a_dead_meteor_jar_gives_a_clear_error(monkeypatch):
    import subprocess
    import threading

    import stgpt.metrics

    class BrokenMeteor:  # what pycocoevalcap's Meteor holds, around a jar that cannot start
        def __init__(self):
            pipe = subprocess.PIPE
            self.meteor_p = subprocess.Popen(["java", "-jar", "missing.jar"], stdin=pipe, stdout=pipe, stderr=pipe)
            self.lock = threading.Lock()

    monkeypatch.setattr(stgpt.metrics, "_start_meteor", BrokenMeteor)
    with pytest.raises(RuntimeError, match="METEOR jar stopped .*missing.jar"):
        score_captions({"v": "a man"}, {"v": ["a man"]}, metrics=(METEOR,))


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="choose from"):
        score_captions({"v": "a man"}, {"v": ["a man"]}, metrics=("CIDEr-X",))


# ----------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------


def test_report_worst_table_and_json():
    predictions, references = random_corpus(seed=10, num_videos=50)
    report = score_captions(predictions, references, metrics=(CIDER_D, ROUGE_L))

    assert list(report.corpus) == [CIDER_D, ROUGE_L]
    worst = report.worst(5)
    assert len(worst) == 5
    assert [s for _, s in worst] == sorted(s for _, s in worst)
    assert worst[0][1] == min(scores[CIDER_D] for scores in report.per_video.values())
    assert report.worst(3, ROUGE_L)[0][1] == min(scores[ROUGE_L] for scores in report.per_video.values())
    with pytest.raises(ValueError, match="not computed"):
        report.worst(3, METEOR)

    table = report.format_table()
    assert "CIDEr-D" in table and f"{100 * report.corpus[CIDER_D]:.2f}" in table
    assert "50 videos" in table and worst[0][0] in table

    loaded = json.loads(report.to_json())
    assert loaded["corpus"] == report.corpus and loaded["num_scored"] == 50
    assert loaded["per_video"] == report.per_video
    assert "per_video" not in json.loads(report.to_json(per_video=False))
