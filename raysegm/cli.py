"""`raysegm` command line: parses arguments and calls one plain function per sub-command.

No logic lives here; each function below is importable from a notebook, a test or a job script.
Heavy imports (torch, ray) happen inside the handlers so `raysegm --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML preset (see configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set train.epochs=3 (repeatable)",
    )


def _config(args):
    from raysegm.config import load_config

    return load_config(args.config, args.overrides)


def _synth(args) -> int:
    from raysegm.data.synth import generate_dataset

    out = generate_dataset(args.out, patients=args.patients, slices=args.slices, size=args.size, seed=args.seed)
    print(f"synthetic kaggle_3m dataset written to {out}")
    return 0


def _prepare(args) -> int:
    from raysegm.data.discover import prepare

    prepare(args.data_dir, args.out, split_seed=args.seed, val_fraction=args.val_fraction,
            test_fraction=args.test_fraction, folds=args.folds, fold=args.fold, strict=args.strict)
    return 0  # strict: any reject is a ValueError, exit 2


def _train(args) -> int:
    from raysegm.train import train

    train(_config(args), resume=args.resume)
    return 0


def _tune(args) -> int:
    from raysegm.tune import run_study

    run_study(_config(args), resume=args.resume)
    return 0


def _cv(args) -> int:
    from raysegm.cv import run_cv

    run_cv(_config(args), folds=args.folds, only=args.fold, resume=args.resume)
    return 0


def _evaluate(args) -> int:
    from raysegm.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(args.checkpoint, manifest=args.manifest, data_dir=args.data_dir,
                                  split=args.split, out=args.out, tta=args.tta, postprocess=args.postprocess)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _infer(args) -> int:
    from raysegm.config import load_config
    from raysegm.infer import infer, saved_infer_choices

    # tta and postprocess: the flags, else --config/--set, else the checkpoint's own
    config = load_config(args.config, args.overrides, base={"infer": saved_infer_choices(args.checkpoint)})
    infer(args.checkpoint, args.input, args.output, config.infer, tta=args.tta,
          postprocess=args.postprocess, ray_address=args.address)
    return 0


def _export(args) -> int:
    from raysegm.export import export

    export(args.parquet, to=args.to, out=args.out, source_root=args.source_root)
    return 0


def _report(args) -> int:
    from raysegm.report import write_report

    path = write_report(args.study_dir)
    print(f"report written to {path}")
    return 0


def _demo(args) -> int:
    from raysegm.demo import run_demo

    run_demo(args.out, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from raysegm.config import POSTPROCESS, DataSettings

    parser = argparse.ArgumentParser(
        prog="raysegm", description="Brain-MRI tumor segmentation on Ray: train, tune, cross-validate, segment archives into Parquet.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic dataset in the kaggle_3m layout")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=DataSettings.synthetic_patients)
    p.add_argument("--slices", type=int, default=DataSettings.synthetic_slices, help="slices per patient")
    p.add_argument("--size", type=int, default=128, help="side of the written slices in pixels")
    p.add_argument("--seed", type=int, default=DataSettings.split_seed)
    p.set_defaults(handler=_synth)

    p = sub.add_parser("prepare", help="find slices, validate them, split by patient, write the manifest")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True, help="manifest Parquet file")
    p.add_argument("--seed", type=int, default=DataSettings.split_seed, help="split seed")
    p.add_argument("--val-fraction", type=float, default=DataSettings.val_fraction)
    p.add_argument("--test-fraction", type=float, default=DataSettings.test_fraction)
    p.add_argument("--folds", type=int, default=DataSettings.folds, help="k for k-fold (0: plain split)")
    p.add_argument("--fold", type=int, default=DataSettings.fold, help="validation fold when --folds > 0")
    p.add_argument("--strict", action="store_true", help="exit with an error if any file is rejected")
    p.set_defaults(handler=_prepare)

    p = sub.add_parser("train", help="one Ray Train run")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue the run of the same name")
    p.set_defaults(handler=_train)

    p = sub.add_parser("tune", help="an ablation study with Ray Tune")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.set_defaults(handler=_tune)

    p = sub.add_parser("cv", help="patient-level k-fold cross-validation, scored on every out-of-fold patient")
    _add_config_args(p)
    p.add_argument("--folds", type=int, default=None,
                   help="k (default: data.folds where set, else the k a --resume started with, else 5)")
    p.add_argument("--fold", type=int, action="append", default=None,
                   help="train only this fold (repeatable; default: every fold); every finished fold is scored")
    p.add_argument("--resume", action="store_true", help="continue a cross-validation of the same name")
    p.set_defaults(handler=_cv)

    p = sub.add_parser("evaluate", help="score a checkpoint on a split with the metric contract")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a checkpoint or run folder; repeat it to score an ensemble (probabilities averaged)")
    p.add_argument("--manifest")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="write the summary and per-patient table here")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the checkpoint's infer.tta)")
    p.add_argument("--postprocess", choices=POSTPROCESS, default=None,
                   help="default: the checkpoint's infer.postprocess; none: the raw masks; lcc: keep the "
                        "largest 3D connected component per volume (lcc_slices: the one spanning the most "
                        "slices); fill_holes: fill the holes of each slice's mask; "
                        "lcc+fill_holes, lcc_slices+fill_holes: both, in that order")
    p.set_defaults(handler=_evaluate)

    p = sub.add_parser("infer", help="segment every slice of an archive into Parquet")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its best checkpoint)")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="horizontal-flip test-time augmentation (default: the config's infer.tta where "
                        "--config or --set gives one, else the checkpoint's)")
    p.add_argument("--postprocess", choices=POSTPROCESS, default=None,
                   help="default: the config's infer.postprocess where given, else the checkpoint's")
    p.add_argument("--address", default=None, help="Ray address (default: local or RAY_ADDRESS)")
    p.set_defaults(handler=_infer)

    p = sub.add_parser("export", help="turn inference Parquet into PNG masks, overlays or NIfTI")
    p.add_argument("parquet")
    p.add_argument("--to", choices=["png", "overlay", "nifti"], required=True)
    p.add_argument("out")
    p.add_argument("--source-root", default=None, help="where the sources are, if moved since inference")
    p.set_defaults(handler=_export)

    p = sub.add_parser("report", help="HTML and Markdown report of a study")
    p.add_argument("study_dir")
    p.set_defaults(handler=_report)

    p = sub.add_parser("demo", help="the whole path on synthetic data, on any laptop")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--quick", action="store_true", help="smallest settings (used by the tests)")
    p.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"raysegm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
