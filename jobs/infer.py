"""Bulk inference as a Ray job: `ray job submit --working-dir . -- python jobs/infer.py --checkpoint CKPT
--input ARCHIVE --output OUT [--config configs/x.yaml] [--set infer.replicas=4] [--tta | --no-tta]
[--postprocess lcc]`.

Calls the same `raysegm.infer.infer` as `raysegm infer`; under `ray job submit` (RAY_ADDRESS is set) it
joins the cluster, otherwise it starts a local Ray. With `--working-dir` the driver starts in a temporary
copy of that directory, so `--output` must be an absolute path every node can reach, or a URI.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working directory's raysegm, uninstalled

from raysegm.config import POSTPROCESS, load_config  # noqa: E402
from raysegm.infer import infer, saved_infer_choices  # noqa: E402
from raysegm.storage import check_job_inputs, check_job_outputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--input", required=True, help="archive: local path or URI (kaggle_3m, images, NIfTI)")
    parser.add_argument("--output", required=True, help="Parquet folder: local path or URI")
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="horizontal-flip test-time augmentation (default: the config's infer.tta "
                             "where --config or --set gives one, else the checkpoint's)")
    parser.add_argument("--postprocess", choices=POSTPROCESS, default=None,
                        help="default: the config's infer.postprocess where given, else the checkpoint's")
    parser.add_argument("--address", default="auto" if os.environ.get("RAY_ADDRESS") else None)
    args = parser.parse_args(argv)
    try:
        check_job_inputs(**{"--checkpoint": args.checkpoint, "--input": args.input})
        config = load_config(args.config, args.overrides, base={"infer": saved_infer_choices(args.checkpoint)})
        check_job_outputs(**{"--output": args.output})
        infer(args.checkpoint, args.input, args.output, config.infer, tta=args.tta, postprocess=args.postprocess,
              ray_address=args.address)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"jobs/infer.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
