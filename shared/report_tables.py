"""Report pieces shared by pooled and federated runs: metrics tables, JSON, learning curves."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from shared.atomic_files import atomic_file  # noqa: E402
from shared.config import TaskConfig  # noqa: E402

ML_COLUMNS = ("auc", "ap", "f1", "precision", "recall", "f1_tuned")
MC_COLUMNS = ("sensitivity", "specificity", "accuracy", "auc")
# per label: AP@0.5:0.95 and AR@100 (COCO), and sensitivity/specificity of the boxes at
# IoU 0.5 and score 0.5 (shared.metrics.box_classification)
DET_COLUMNS = ("ap", "ar", "sensitivity", "specificity")


def metrics_table(task: TaskConfig, mean: dict[str, float],
                  sd: dict[str, float] | None = None) -> pd.DataFrame:
    """Per-label (or per-class) rows plus a macro row; 'mean +- sd' strings when sd is given.
    A pretrain task: the masked-modelling loss."""
    if task.type == "pretrain":
        v, s = mean.get("loss", float("nan")), (sd or {}).get("loss")
        text = f"{v:.4f}" + (f" ± {s:.4f}" if s is not None and not math.isnan(s) else "")
        return pd.DataFrame({"value": {"masked-modelling loss": text}}).rename_axis("metric")
    cols = {"multilabel": ML_COLUMNS, "detection": DET_COLUMNS}.get(task.type, MC_COLUMNS)
    cols = tuple(c for c in cols if c != "f1_tuned" or "macro_f1_tuned" in mean)

    def cell(key: str) -> str:
        v = mean.get(key, float("nan"))
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "undef"
        if sd is not None and key in sd and not math.isnan(sd[key]):
            return f"{v:.3f} ± {sd[key]:.3f}"
        return f"{v:.3f}"

    rows = {name: {c: cell(f"{c}/{name}") for c in cols} for name in task.labels}
    if task.type == "detection":
        rows["all"] = {"ap": f"{cell('map')} (mAP@0.5:0.95); {cell('map_50')} (mAP@0.5)",
                       "ar": f"{cell('mar_100')} (mAR@100)",
                       "sensitivity": f"{cell('box_recall')} (boxes found); "
                                      f"{cell('box_accuracy')} (found boxes' class right)",
                       "specificity": f"{cell('box_precision')} (box precision)"}
    else:
        rows["macro"] = {c: cell(f"macro_{c}") for c in cols}
    df = pd.DataFrame.from_dict(rows, orient="index")
    if task.type == "multiclass":
        extra = {k: cell(k) for k in ("accuracy", "balanced_accuracy", "macro_f1")}
        df.loc["overall"] = [extra["accuracy"], "", extra["balanced_accuracy"] + " (bal. acc)",
                             extra["macro_f1"] + " (macro-F1)"]
    df.index.name = "class" if task.type == "multiclass" else "label"
    return df


def render_table(df: pd.DataFrame) -> str:
    """Markdown; text cells stay as written ("1.000" must not become "1") and integer columns
    stay integers beside float ones (object dtype stops the row-wise upcast to float)."""
    return df.astype(object).to_markdown(disable_numparse=True)


def plot_learning_curves(histories: list[list[dict[str, float]]], headline: str,
                         path: Path) -> None:
    """Train/val loss and the validation headline metric per epoch (one line per fold)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for f, hist in enumerate(histories):
        ep = [h["epoch"] for h in hist]
        tag = f" fold {f + 1}" if len(histories) > 1 else ""
        axes[0].plot(ep, [h["train_loss"] for h in hist], "-", label=f"train{tag}")
        axes[0].plot(ep, [h["val_loss"] for h in hist], "--", label=f"val{tag}")
        axes[1].plot(ep, [h.get(f"val_{headline}", float("nan")) for h in hist], "-o",
                     ms=3, label=f"val{tag}")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Loss")
    axes[1].set(xlabel="epoch", ylabel=headline, title=f"Validation {headline}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
