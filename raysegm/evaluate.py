"""Score a checkpoint on one split of a manifest with the metric contract (raysegm.metrics).

Each slice is read (with its neighbours for a 2.5D checkpoint, raysegm.data.context) and preprocessed
exactly as the checkpoint's own config.json says (raysegm.data.preprocess), predicted at the model's
size, and its probabilities are resized back to the slice's own resolution before thresholding, so
every metric, HD95 included, is measured against the original mask in the input's own pixels; NIfTI
volumes also get HD95 in mm from their headers' voxel sizes (`hd95_mm`, empty for the others).
Plain torch in one process: a split is small.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from raysegm.config import replace

BATCH_SLICES = 16  # slices per forward pass


def evaluate_checkpoint(checkpoint, manifest=None, data_dir=None, split: str = "test", out=None, *,
                        tta: bool | None = None, postprocess: str | None = None) -> dict:
    """Per-patient, pooled and per-slice numbers of `checkpoint` on `split`.

    checkpoint: a checkpoint folder, or a run folder (its result.json names the best checkpoint).
    The slices come from `manifest` (Parquet), else from `data_dir` prepared with the checkpoint's own
    split settings, else from the manifest the checkpoint was trained on. Unlabeled slices cannot be
    scored: they are counted in `unlabeled_slices` and left out. `tta` and `postprocess` (one of
    raysegm.config.POSTPROCESS) are the inference options of the same names (raysegm.infer). With
    `out`, writes out/per_patient.csv and out/summary.json.
    Returns the SegmentationMeter summary plus checkpoint, model_id, model_name, split, manifest,
    unlabeled_slices, tta, postprocess.
    """
    summary, meter = score_checkpoint(checkpoint, manifest, data_dir, split, tta=tta, postprocess=postprocess,
                                      work_dir=out)
    table = meter.per_patient_table()
    summary.update(meter.summary(table=table))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "per_patient.csv", index=False)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def score_checkpoint(checkpoint, manifest=None, data_dir=None, split: str = "test", *, tta: bool | None = None,
                     postprocess: str | None = None, work_dir=None):
    """(what was scored, a SegmentationMeter holding every labeled slice of `split` with its masks).

    `checkpoint` may be a list: an ensemble, whose members' probabilities are averaged before the
    threshold, p = mean_m p_m (each p_m with TTA when `tta`); a list of one scores as that checkpoint.
    Its members must share the data settings that shape what a slice looks like to the model
    (raysegm.checkpoint.INPUT_SETTINGS), so one preprocessing serves them all. The same average is one
    checkpoint with raysegm.checkpoint.save_ensemble.
    `tta`, `postprocess`: None takes the (first) checkpoint's infer.tta / infer.postprocess.
    A manifest prepared from `data_dir` is written to `work_dir` (a temporary folder when None). The
    meter can be merged with others (raysegm.cv pools the folds of a cross-validation).
    """
    from raysegm.checkpoint import input_settings_differ, load_model, model_id
    from raysegm.data.context import read_input, with_context
    from raysegm.data.io import PATH_SEPARATOR, is_missing, nifti_spacing, read_mask
    from raysegm.data.preprocess import preprocess_image
    from raysegm.infer import POSTPROCESS, postprocess_slices, probabilities
    from raysegm.metrics import SegmentationMeter
    from raysegm.models import model_name
    from raysegm.storage import best_checkpoint_of

    members = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not members:
        raise ValueError("checkpoint: an empty list of ensemble members")
    members = [Path(best_checkpoint_of(member)) for member in members]
    for member in members:
        if not member.is_dir():
            raise FileNotFoundError(f"checkpoint not found: {member}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, configs = zip(*(load_model(member, device=device) for member in members))  # in eval mode
    config = configs[0]
    tta = config.infer.tta if tta is None else tta
    postprocess = config.infer.postprocess if postprocess is None else postprocess
    if postprocess not in POSTPROCESS:
        raise ValueError(f"postprocess must be one of {list(POSTPROCESS)}, got {postprocess!r}")
    for member, other in zip(members[1:], configs[1:]):
        differ = input_settings_differ(config, other)
        if differ:
            raise ValueError(f"{member}: an ensemble's members must share their input settings; its "
                             f"{', '.join(differ)} differ from those of {members[0]}")
    with tempfile.TemporaryDirectory() as scratch:
        slices, manifest_source = _split_slices(config, manifest, data_dir, split, Path(work_dir or scratch))
    slices = with_context(slices, config.data.context_slices)  # neighbours from every slice, labeled or not
    labeled = slices[~slices["mask_path"].map(is_missing)]
    if labeled.empty:
        raise ValueError(f"{manifest_source}: split {split!r} has no labeled slices to score")
    if len(labeled) < len(slices):
        print(f"{manifest_source}: {len(slices) - len(labeled)} unlabeled slices of split {split!r} "
              "have no mask to score against and are left out")

    meter = SegmentationMeter(keep_masks=True)
    for volume_id, volume in labeled.groupby("volume_id", sort=True):
        records = volume.sort_values("slice_index").to_dict("records")
        spacing = (nifti_spacing(records[0]["image_path"].split(PATH_SEPARATOR)[0])
                   if records[0]["source_format"] == "nifti" else None)
        if spacing is not None:
            meter.set_spacing(volume_id, spacing)
        predicted, truths = [], []
        for start in range(0, len(records), BATCH_SLICES):
            batch = records[start:start + BATCH_SLICES]
            images = [read_input(record, config.data) for record in batch]
            inputs = torch.from_numpy(np.stack([preprocess_image(image, config.data, record)
                                                for image, record in zip(images, batch)])).to(device)
            with torch.no_grad():
                predictions = torch.stack([probabilities(model, inputs, tta=tta) for model in models]).mean(0).cpu()
            for record, image, probability in zip(batch, images, predictions):
                # Bilinear on probabilities, then the contract's threshold.
                native = F.interpolate(probability[None], size=image.shape[:2], mode="bilinear",
                                       align_corners=False)[0, 0]
                predicted.append(native.numpy() > meter.threshold)
                truths.append(read_mask(record))
        if postprocess != "none":
            predicted = postprocess_slices(predicted, postprocess)
        for record, mask, truth in zip(records, predicted, truths):
            meter.update([volume_id], [record["slice_index"]], mask[None], truth[None])

    scored = {
        "checkpoint": str(members[0]) if len(members) == 1 else [str(member) for member in members],
        "model_id": "+".join(model_id(member) for member in members),
        "model_name": " + ".join(dict.fromkeys(model_name(other.model) for other in configs)),
        "split": split,
        "manifest": manifest_source,
        "unlabeled_slices": int(len(slices) - len(labeled)),
        "tta": bool(tta),
        "postprocess": postprocess,
    }
    return scored, meter


def _split_slices(config, manifest, data_dir, split: str, work_dir: Path) -> tuple[pd.DataFrame, str]:
    from raysegm.data.discover import load_manifest, manifest_for

    if manifest:
        table, source = load_manifest(manifest), str(manifest)
    elif data_dir:
        table = manifest_for(replace(config, data={"data_dir": str(data_dir), "manifest": ""}).data, work_dir)
        source = str(data_dir)
    elif config.data.manifest and Path(config.data.manifest).is_file():
        table, source = load_manifest(config.data.manifest), config.data.manifest
    else:
        raise ValueError("no slices to score: give a manifest or a data_dir (the checkpoint's own "
                         f"manifest {config.data.manifest or '(none)'} is not available)")
    if split not in set(table["split"]):
        raise ValueError(f"{source}: no slices in split {split!r} (splits: {sorted(set(table['split']))})")
    return table[table["split"] == split], source
