"""Preprocess videos + VATEX annotations into Parquet shards with Ray Data, on one machine or a cluster.

    python jobs/preprocess.py --annotations A.json [B.json ...] --videos DIR --output OUT [--config C] [key=value ...]
    python jobs/preprocess.py                       # the embedded default: the synthetic dataset, all its splits
    python jobs/preprocess.py --config configs/vatex.yaml   # data.annotations / data.videos / data.shards from it
    ray job submit --working-dir . -- python jobs/preprocess.py --videos s3://bucket/videos --output s3://bucket/shards ...

--videos and --output take local paths or URIs pyarrow understands (s3://, gs://). Re-running into the same
output resumes. Exit status: 0 done; 1 done, but more videos failed than --max-error-rate allows; 2 nothing
done (bad annotation file, bad settings, or an output made with other settings).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/preprocess.py` from a checkout

from stgpt.annotations import AnnotationError  # noqa: E402
from stgpt.config import CONFIG_DIR, ConfigError, load_config  # noqa: E402
from stgpt.preprocessing import PreprocessError, SplitInput, preprocess, split_name  # noqa: E402
from stgpt.resources import ResourceError, Watchdog, ensure_fits, exit_stalled, preprocessing_plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", nargs="+", help="VATEX-format annotation file(s), one split each")
    parser.add_argument("--videos", help="folder of <videoID>.mp4/.webm files (default: data.videos)")
    parser.add_argument("--output", help="folder for the shards (default: data.shards)")
    parser.add_argument("--config", default=str(CONFIG_DIR / "tiny.yaml"), help="YAML config (default: %(default)s)")
    parser.add_argument("--split", help="split name for a single annotation file (default: from its file name)")
    parser.add_argument("--max-error-rate", type=float, help="fail the run above this fraction of unusable videos "
                        "(default: preprocess.max_error_rate, 0.05)")
    parser.add_argument("--overwrite", action="store_true", help="replace splits made with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. preprocess.rows_per_shard=64")
    args = parser.parse_intermixed_args(argv)  # key=value overrides before or after the options

    try:
        cfg = load_config(args.config, args.overrides)
        if args.max_error_rate is not None:
            cfg.preprocess.max_error_rate = args.max_error_rate
        sources, output = _sources(args, cfg)
        import ray

        if not ray.is_initialized():
            ray.init()  # joins the cluster of RAY_ADDRESS or `ray job submit`, else starts a local one
        ensure_fits(preprocessing_plan(cfg), cfg.cluster)  # one decoding actor at least: else exit 2 now
        with Watchdog.from_config("video", cfg.cluster, on_fail=exit_stalled):
            summary = preprocess(sources, output, cfg, overwrite=args.overwrite, progress=not args.no_progress)
    except (AnnotationError, ConfigError, PreprocessError, ResourceError, FileNotFoundError,
            NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    if summary.too_many_errors:
        print(f"error: {summary.error_rate_message()}", file=sys.stderr)
        return 1
    return 0


def _sources(args: argparse.Namespace, cfg) -> tuple[list[SplitInput], str]:
    """The splits to preprocess and the output folder, from the flags, else the config, else the synthetic data."""
    data = cfg.data
    output = args.output or data.shards
    annotations = args.annotations or ([data.annotations] if data.annotations else None)
    if annotations is None:
        from stgpt.synthetic import make_synthetic_dataset

        dataset = make_synthetic_dataset(data.root, {"train": data.synthetic_train, "validation":
                                                     data.synthetic_validation, "test": data.synthetic_test},
                                         seed=data.synthetic_seed)
        videos = args.videos or str(dataset.video_dir)
        return [SplitInput(split, str(path), videos) for split, path in dataset.annotation_paths.items()], output
    videos = args.videos or data.videos
    if not videos:
        raise ConfigError("--videos (or data.videos) is required with --annotations")
    if args.split and len(annotations) > 1:
        raise ConfigError("--split names one annotation file's split; with several files, names come from them")
    return [SplitInput(args.split or split_name(a), os.fspath(a), videos) for a in annotations], output


if __name__ == "__main__":
    sys.exit(main())
