"""An ablation study (Ray Tune over Ray Train) as a Ray job.

    ray job submit --working-dir . -- python jobs/ablate.py --config configs/ablation-demo.yaml \
        --set run.storage_path=/mnt/shared/studies [--resume]

Under `ray job submit --working-dir` the driver starts in a temporary copy of the working
directory, so `run.storage_path` must be an absolute path every node can reach; a relative one is
refused, and so is a relative `data.data_dir` or `data.manifest` that is not in that copy (Ray uploads
the directory without what .gitignore lists). With RAY_ADDRESS set (as it is for a submitted job) the
study joins that cluster; otherwise it starts a local Ray, like `raysegm tune`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory's raysegm, uninstalled

from raysegm.config import load_config, replace  # noqa: E402
from raysegm.storage import check_job_data, check_job_outputs  # noqa: E402
from raysegm.tune import run_study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of the same name")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_job_outputs(**{"run.storage_path": config.run.storage_path})
        check_job_data(config.data)
        if os.environ.get("RAY_ADDRESS") and not config.scale.ray_address:
            config = replace(config, scale={"ray_address": "auto"})
        study_dir = run_study(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"jobs/ablate.py: error: {error}", file=sys.stderr)
        return 2
    print(f"study written to {study_dir} (results.md, report: raysegm report {study_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
