"""The study report: report.md and report.html, with PNG figures, written into the study folder.

Everything is read from the files raysegm.tune wrote (config.json, results/summary/paired CSV and
Markdown, per_patient.csv, curves.csv, paper.md, launches.jsonl) and from the best trial's checkpoint:

    figures/learning_curves.png    train loss and validation per-patient Dice by epoch, one line per trial
    figures/per_patient_dice.png   test per-patient Dice per variant (the trial chosen by validation)
    figures/overlay_best.png       FLAIR with truth and prediction contours: the best trial's best
    figures/overlay_worst.png      and worst test patients, on their slices with the most tumor

The best trial is the one with the highest validation per-patient Dice; the test set never chooses.
The HTML is the Markdown rendered (headings, paragraphs, lists, tables, images), so both say the same.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FIGURES = "figures"
OVERLAY_SLICES = 3  # slices shown per patient
FLAIR = 1  # channel order: pre-contrast, FLAIR, post-contrast
RED = matplotlib.colors.ListedColormap(["red"])


def write_report(study_dir) -> Path:
    """Write report.md, report.html and figures/*.png into `study_dir`; returns the HTML's path."""
    study_dir = Path(study_dir)
    for name in ("config.json", "results.csv"):
        if not (study_dir / name).is_file():
            raise FileNotFoundError(f"{study_dir} is not a finished study: {name} is missing")
    figures = study_dir / FIGURES
    figures.mkdir(exist_ok=True)
    config = json.loads((study_dir / "config.json").read_text())
    results = pd.read_csv(study_dir / "results.csv", dtype={"trial_id": str})
    scored = results[results["dice_mean"].notna()] if "dice_mean" in results else results.iloc[0:0]

    sections = [f"# Ablation study: {config['run']['name']}\n", _overview(study_dir, config, results)]
    curves = _read_csv(study_dir / "curves.csv")
    if not curves.empty:
        plot_learning_curves(curves, figures / "learning_curves.png")
        sections.append("## Learning curves\n\n![Learning curves](figures/learning_curves.png)\n")
    sections.append(_section(study_dir / "results.md"))
    sections.append(_section(study_dir / "summary.md"))
    per_patient = _read_csv(study_dir / "per_patient.csv", dtype={"trial_id": str, "volume_id": str})
    summary = _read_csv(study_dir / "summary.csv", dtype={"chosen_trial": str})
    if not per_patient.empty and not summary.empty:
        plot_per_patient(per_patient, summary, figures / "per_patient_dice.png")
        sections.append("## Per-patient Dice by variant\n\nEach point is one test patient, scored with the "
                        "variant's trial chosen by validation.\n\n"
                        "![Per-patient Dice](figures/per_patient_dice.png)\n")
    sections.append(_section(study_dir / "paired.md"))
    if not scored.empty:
        sections.append(_overlays(study_dir, scored, per_patient, figures))
    sections.append(_section(study_dir / "paper.md"))

    markdown = "\n".join(sections)
    (study_dir / "report.md").write_text(markdown)
    page = markdown_to_html(markdown, title=f"Ablation study: {config['run']['name']}")
    (study_dir / "report.html").write_text(page)
    return study_dir / "report.html"


def _read_csv(path: Path, **kwargs) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _section(path: Path) -> str:
    """A table file of the study, its top heading demoted one level under the report's title."""
    if not path.is_file():
        return ""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", path.read_text(), flags=re.MULTILINE)


def _overview(study_dir: Path, config: dict, results: pd.DataFrame) -> str:
    from raysegm.data.discover import is_own_manifest
    from raysegm.tune import read_launches

    data, train, tune = config["data"], config["train"], config["tune"]
    manifest = pd.read_parquet(data["manifest"]) if data["manifest"] and Path(data["manifest"]).is_file() else None
    lines = ["## The study\n"]
    # the study's own manifest was prepared from data_dir or the synthetic set; a user's wins over data_dir
    if data["manifest"] and not is_own_manifest(data["manifest"], config["run"]["name"]):
        source = f"manifest `{data['manifest']}`"
    elif data["data_dir"]:
        source = f"`{data['data_dir']}`"
    else:
        source = f"synthetic, {data['synthetic_patients']} patients x {data['synthetic_slices']} slices"
    lines.append(f"- Data: {source}, resized to {data['size']} px, normalization "
                 f"`{data['normalize']}`, augmentation {'on' if data['augment'] else 'off'}.")
    if manifest is not None:
        counts = manifest.groupby("split")["volume_id"].nunique().to_dict()
        lines.append("- Patient-level split: " + ", ".join(f"{split} {counts.get(split, 0)} patients"
                                                            for split in ("train", "val", "test")) + ".")
    axes = {"variants": tune["variants"], "batch sizes": tune["batch_sizes"], "losses": tune["losses"],
            **tune["extra_axes"]}
    lines.append("- Grid: " + "; ".join(f"{name} {', '.join(map(str, values))}" for name, values in axes.items())
                 + f" ({len(results)} trials).")
    lines.append(f"- Training: {train['epochs']} epochs, optimizer {train['optimizer']} at lr {train['lr']}, "
                 f"{config['scale']['num_workers']} Ray Train workers per trial; early stopping (ASHA) "
                 f"{'on, grace ' + str(tune['asha_grace_epochs']) + ' epochs' if tune['asha'] else 'off'}.")
    statuses = results["status"].value_counts().to_dict()
    lines.append("- Trials: " + ", ".join(f"{count} {status}" for status, count in statuses.items()) + ".")
    launches = read_launches(study_dir)
    trained = launches[launches["action"] == "train"].groupby("trial_id").size()
    restarted = trained[trained > 1]
    if len(restarted):
        lines.append("- Continued after an interruption: " + ", ".join(
            f"{trial_id} ({count} starts)" for trial_id, count in restarted.items()) + ".")
    lines.append("- Configuration: `config.json`; tables: `results.csv`, `summary.csv`, `paired.csv`, "
                 "`per_patient.csv`, `curves.csv`; TensorBoard: `tune/`.\n")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# figures


def _trial_label(row) -> str:
    return f"{row['trial_id']} {row['model']} b{row['batch_size']} {row['loss']}"


def plot_learning_curves(curves: pd.DataFrame, path: Path) -> None:
    """Train loss and validation per-patient Dice by epoch, one line per trial (curves.csv)."""
    figure, (loss_axis, dice_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for _, trial in curves.groupby("trial_id", sort=True):
        trial = trial.sort_values("epoch")
        label = _trial_label(trial.iloc[0])
        loss_axis.plot(trial["epoch"], trial["train_loss"], marker="o", markersize=3, label=label)
        dice_axis.plot(trial["epoch"], trial["val_per_patient_dice"], marker="o", markersize=3, label=label)
    loss_axis.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    dice_axis.set(xlabel="epoch", ylabel="per-patient Dice", title="Validation per-patient Dice", ylim=(-0.02, 1.02))
    for axis in (loss_axis, dice_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    dice_axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_per_patient(per_patient: pd.DataFrame, summary: pd.DataFrame, path: Path) -> None:
    """Box and strip plot of test per-patient Dice, one column per variant's chosen trial."""
    columns, labels = [], []
    for _, row in summary.iterrows():
        values = per_patient.loc[per_patient["trial_id"] == row["chosen_trial"], "dice"].to_numpy(float)
        columns.append(values)
        labels.append(f"{row['model']}\n({row['chosen_trial']})")
    figure, axis = plt.subplots(figsize=(max(5.0, 2.2 * len(columns)), 4.5))
    axis.boxplot(columns, showfliers=False)
    jitter = np.random.default_rng(0)
    for position, values in enumerate(columns, start=1):
        axis.scatter(position + jitter.uniform(-0.12, 0.12, len(values)), values, s=18, alpha=0.7, zorder=3)
    axis.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    axis.set(ylabel="per-patient Dice (test)", ylim=(-0.02, 1.02), title="Test per-patient Dice by variant")
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def predict_patient(checkpoint: str, manifest_path: str, volume_id: str, *, tta: bool = False,
                    postprocess: str = "none") -> list[dict]:
    """Every slice of one patient predicted by `checkpoint` with its own preprocessing, as raysegm.evaluate
    scores it with the same `tta` and `postprocess` (the study's infer settings).

    Returns one dict per slice in slice order: slice_index, image (H, W, C as read), truth (H, W) bool,
    prediction (H, W) bool at the slice's own resolution: the probability, bilinear from the model's size,
    above the contract's threshold, then `postprocess` over the patient's volume.
    """
    import torch
    import torch.nn.functional as F

    from raysegm.checkpoint import load_model
    from raysegm.data.context import read_input, with_context
    from raysegm.data.discover import load_manifest
    from raysegm.data.io import is_missing, read_mask
    from raysegm.data.preprocess import preprocess_image
    from raysegm.infer import postprocess_slices, probabilities
    from raysegm.metrics import SegmentationMeter

    model, config = load_model(checkpoint)
    manifest = load_manifest(manifest_path)
    volume = with_context(manifest[manifest["volume_id"] == volume_id], config.data.context_slices)
    records = volume.sort_values("slice_index").to_dict("records")
    if not records:
        raise ValueError(f"{manifest_path}: no slices of patient {volume_id!r}")
    labeled = [record for record in records if not is_missing(record["mask_path"])]
    records = labeled or records  # the slices raysegm.evaluate scores (and post-processes), where labeled
    channels, k = config.data.in_channels, config.data.context_slices
    centre = slice(k * channels, (k + 1) * channels)  # of a 2.5D stack (raysegm.data.context)
    threshold = SegmentationMeter().threshold
    slices = []
    with torch.no_grad():
        for record in records:
            stack = read_input(record, config.data)
            inputs = torch.from_numpy(preprocess_image(stack, config.data, record))[None]
            image = stack[..., centre]  # the slice itself, for display
            probability = probabilities(model, inputs, tta=tta)
            native = F.interpolate(probability, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            truth = read_mask(record)
            slices.append({"slice_index": int(record["slice_index"]), "image": image,
                           "truth": np.zeros(image.shape[:2], bool) if truth is None else truth.astype(bool),
                           "prediction": native.numpy() > threshold})
    if postprocess != "none":
        for item, mask in zip(slices, postprocess_slices([item["prediction"] for item in slices], postprocess)):
            item["prediction"] = mask
    return slices


def _slice_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    from raysegm.metrics import confusion_counts, scores

    return scores(confusion_counts(prediction, truth))["dice"]


def plot_overlay(slices: list[dict], title: str, path: Path) -> list[int]:
    """FLAIR with the truth (green) and prediction (red) contours on the patient's slices with the most
    tumor (truth, or prediction where the patient has none); returns the slice indices shown."""
    tumor = np.array([s["truth"].sum() for s in slices])
    if not tumor.any():
        tumor = np.array([s["prediction"].sum() for s in slices])
    order = np.argsort(-tumor, kind="stable")[:OVERLAY_SLICES] if tumor.any() else \
        np.array([len(slices) // 2])
    shown = sorted(order.tolist(), key=lambda i: slices[i]["slice_index"])
    figure, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.9), squeeze=False)
    for axis, index in zip(axes[0], shown):
        item = slices[index]
        flair = item["image"][..., FLAIR if item["image"].shape[-1] > FLAIR else 0].astype(np.float32)
        low, high = np.percentile(flair, [1, 99.5])
        axis.imshow(np.clip((flair - low) / max(high - low, 1e-6), 0, 1), cmap="gray")
        prediction = item["prediction"]
        if item["truth"].any():
            axis.contour(item["truth"].astype(float), levels=[0.5], colors=["lime"], linewidths=1.2)
        if prediction.any():
            # A translucent fill as well: a prediction covering the whole slice has no contour to draw.
            axis.imshow(np.ma.masked_where(~prediction, prediction), cmap=RED, alpha=0.3)
            axis.contour(prediction.astype(float), levels=[0.5], colors=["red"], linewidths=1.2)
        axis.set_title(f"slice {item['slice_index']}: Dice {_slice_dice(prediction, item['truth']):.2f}", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{title}\nFLAIR; green: truth, red: prediction", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [slices[i]["slice_index"] for i in shown]


def _overlays(study_dir: Path, scored: pd.DataFrame, per_patient: pd.DataFrame, figures: Path) -> str:
    config = json.loads((study_dir / "config.json").read_text())
    tta, postprocess = config["infer"]["tta"], config["infer"]["postprocess"]  # as raysegm.tune scored them
    best = scored.loc[scored["val_dice"].idxmax()]
    if not {"trial_id", "volume_id", "dice"} <= set(per_patient.columns):
        return "## Overlays\n\nNone: the study has no per-patient table (per_patient.csv).\n"
    patients = per_patient[per_patient["trial_id"] == best["trial_id"]].sort_values(["dice", "volume_id"])
    if patients.empty:
        return ""
    picks = [("best", patients.iloc[-1]), ("worst", patients.iloc[0])]
    if len(patients) == 1:
        picks = picks[:1]
    missing = [path for path in (best["checkpoint"], config["data"]["manifest"]) if not Path(path).exists()]
    if missing:  # a study folder copied from where it ran
        return (f"## Best and worst test patients of the best trial\n\nNo overlays: {', '.join(missing)} "
                f"not found here (the study was run elsewhere).\n\n")
    lines = [f"## Best and worst test patients of the best trial\n\nThe best trial by validation is "
             f"{best['trial_id']} ({best['model']}, batch {best['batch_size']}, {best['loss']}; validation "
             f"per-patient Dice {best['val_dice']:.3f}). Its checkpoint `{best['checkpoint']}` predicts "
             f"every slice of each patient as the study scored it (TTA {'on' if tta else 'off'}, "
             f"post-processing {postprocess}); shown are the slices with the most tumor.\n"]
    for which, patient in picks:
        slices = predict_patient(best["checkpoint"], config["data"]["manifest"], patient["volume_id"], tta=tta,
                                 postprocess=postprocess)
        name = f"overlay_{which}.png"
        title = f"{which} patient {patient['volume_id']}: per-patient Dice {patient['dice']:.3f}"
        shown = plot_overlay(slices, title, figures / name)
        lines.append(f"- {which.capitalize()}: {patient['volume_id']}, per-patient Dice {patient['dice']:.3f} "
                     f"(slices {', '.join(map(str, shown))}).\n\n![{which} patient](figures/{name})\n")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Markdown -> HTML (the subset this report writes)

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}"""


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)",
                  lambda m: '<img alt="{}" src="{}">'.format(*(g.replace('"', "&quot;") for g in m.groups())), text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def markdown_to_html(markdown: str, title: str) -> str:
    """A standalone HTML page from Markdown headings, paragraphs, bullet lists, tables and images."""
    body, lines, index = [], markdown.splitlines(), 0
    while index < len(lines):
        line = lines[index]
        if not line.strip():
            index += 1
        elif heading := re.match(r"^(#{1,6}) (.*)", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            index += 1
        elif line.startswith("|"):
            rows = []
            while index < len(lines) and lines[index].startswith("|"):
                rows.append(lines[index])
                index += 1
            header, data = _cells(rows[0]), [_cells(row) for row in rows[2:]]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header)
                        + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in data)
                        + "</tbody></table>")
        elif line.startswith("- "):
            items = []
            while index < len(lines) and lines[index].startswith("- "):
                items.append(lines[index][2:])
                index += 1
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
        else:  # a paragraph: this line (whatever it starts with) and the plain lines after it
            paragraph = [line]
            index += 1
            while index < len(lines) and lines[index].strip() and not re.match(r"^(#{1,6} |\||- )", lines[index]):
                paragraph.append(lines[index])
                index += 1
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
