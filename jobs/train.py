"""One Ray Train run as a Ray job.

    ray job submit --working-dir . -- python jobs/train.py --config configs/paper.yaml \
        --set data.data_dir=/mnt/shared/kaggle_3m \
        --set run.storage_path=/mnt/shared/runs --set run.name=paper-1

Under `ray job submit --working-dir` the driver starts in a temporary copy of the working
directory, so `run.storage_path` must be an absolute path every node can reach; a relative one is
refused. So is a relative `data.data_dir` or `data.manifest` that is not in that copy (Ray uploads the
directory without what .gitignore lists, `data/` among it). With RAY_ADDRESS set (as it is for a
submitted job) the run joins that cluster; otherwise it starts a local Ray, like `raysegm train`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory's raysegm, uninstalled

from raysegm.config import load_config, replace  # noqa: E402
from raysegm.storage import check_job_data, check_job_outputs  # noqa: E402
from raysegm.train import train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue the run of the same name")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        check_job_outputs(**{"run.storage_path": config.run.storage_path})
        check_job_data(config.data)
        if os.environ.get("RAY_ADDRESS") and not config.scale.ray_address:
            config = replace(config, scale={"ray_address": "auto"})
        summary = train(config, resume=args.resume)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"jobs/train.py: error: {error}", file=sys.stderr)
        return 2
    print(f"best checkpoint: {summary['best_checkpoint']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
