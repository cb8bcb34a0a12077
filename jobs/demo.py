"""The whole suite on local Ray, with no flags and no downloads: the README's main job.

    python jobs/demo.py                       # about 11 minutes on a 2-core CPU
    python jobs/demo.py train.epochs=4        # any config override

Makes the synthetic dataset and its shards, evaluates the untrained demo checkpoint, trains the tiny model with
Ray Train, evaluates it again, serves it with Ray Serve and captions a test video over HTTP, then writes a report
(outputs/demo/report.json and captions.png). Every step resumes or reuses what an earlier run left: an
interrupted demo is simply run again. The steps are in stgpt/demo.py.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python jobs/demo.py` from a checkout

from ray import serve  # noqa: E402

from stgpt.config import ConfigError  # noqa: E402
from stgpt.demo import REPORT_FILE, print_report, run_demo  # noqa: E402
from stgpt.launch import connect, exits, job_parser, parse  # noqa: E402
from stgpt.resources import training_plan  # noqa: E402


@exits()
def main(argv: list[str] | None = None) -> int:
    args, cfg = parse(job_parser(__doc__), argv)
    if cfg.data.annotations is not None:
        raise ConfigError("the demo runs on the synthetic dataset: leave data.annotations unset")
    start = time.perf_counter()
    with connect(cfg, training_plan(cfg), log_to_driver=False):  # one local Ray for every step
        try:
            report = run_demo(cfg)
        finally:
            serve.shutdown()
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    REPORT_FILE.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
