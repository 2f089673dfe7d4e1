"""PNG figures (matplotlib, headless). Imported only when a picture is asked for."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from .errors import ImageError  # noqa: E402
from .data.transforms import load_image  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix_png(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str) -> None:
    """Heat map of the row-normalised confusion matrix, with the raw counts in the cells."""
    counts = np.asarray(matrix)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 30:
        for (row, col), value in np.ndenumerate(counts):
            if value:
                ax.text(col, row, str(value), ha="center", va="center",
                        color="white" if share[row, col] > 0.5 else "black", fontsize=8)
    ax.set_title("Confusion matrix")
    _save(fig, path)


def reliability_png(report: dict[str, Any], path: str) -> None:
    """Accuracy against confidence per bin (before, and after calibration when fitted)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    series = [("model", report["reliability"], report["ece"])]
    if "calibration" in report:
        c = report["calibration"]
        series.append((f"T = {c['temperature']:.2f}", c["reliability_after"], c["ece_after"]))
    width = 1.0 / len(report["reliability"])
    for offset, (label, bins, ece) in enumerate(series):
        centres = [(b["low"] + b["high"]) / 2 for b in bins if b["count"]]
        accuracy = [b["accuracy"] for b in bins if b["count"]]
        ax.bar(np.asarray(centres) + (offset - (len(series) - 1) / 2) * width / len(series), accuracy,
               width=width / len(series), alpha=0.75, edgecolor="black", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    _save(fig, path)


def gallery_png(
    wrong: Sequence[dict[str, Any]],
    names: dict[str, str],
    path: str,
    columns: int = 4,
    overlays: dict[str, Image.Image] | None = None,
) -> None:
    """The most confidently wrong images, each titled with its true and predicted names; an
    image with an entry in ``overlays`` (path → its heat map over the image as the model saw it)
    is shown as that."""
    _tiles(wrong, lambda item: (f"true: {names.get(item['true'], item['true'])}\n"
                                f"predicted: {names.get(item['predicted'], item['predicted'])} ({item['confidence']:.0%})"),
           "Most confidently wrong" + (" (heat map: Grad-CAM of the predicted class)" if overlays else ""),
           path, columns, overlays)


def label_issues_png(suspects: Sequence[dict[str, Any]], names: dict[str, str], path: str, columns: int = 4) -> None:
    """The suspected label issues of ``cnnkit inspect --label-issues``, most suspicious first,
    each titled with its rank and file, the label it was given and the one suggested (with the
    suggested label's out-of-fold probability)."""

    def caption(s: dict[str, Any]) -> str:
        file = os.path.basename(s["path"])
        return (f"#{s['rank']} {file if len(file) <= 30 else file[:29] + '…'}\n"
                f"given: {names.get(s['given'], s['given'])}\n"
                f"suggested: {names.get(s['suggested'], s['suggested'])} (p={s['p_suggested']:.2f})")

    _tiles(suspects, caption, "Suspected label issues", path, min(columns, max(1, len(suspects))))


def pairs_png(pairs: Sequence[dict[str, Any]], path: str) -> None:
    """A contact sheet of duplicate pairs (``inspect``'s report order: leaks and label conflicts
    first), a row each: the two images side by side, titled with their split and label."""
    fig, axes = plt.subplots(len(pairs), 2, figsize=(6.4, 3.2 * len(pairs)), squeeze=False)
    for row, pair in zip(axes, pairs):
        how = f"{pair['kind']}, {pair['distance']} bits" + \
            (f", cosine {pair['similarity']:.3f}" if pair.get("similarity") is not None else "") + \
            (", LEAK" if pair["across_splits"] else "") + \
            (", LABEL CONFLICT" if pair["label_conflict"] else "")
        for ax, side in zip(row, ("a", "b")):
            ax.axis("off")
            _show(ax, pair[side]["path"])
            file = os.path.basename(pair[side]["path"])
            ax.set_title(f"{pair[side]['split']}/{pair[side]['label']}/{file if len(file) <= 24 else file[:23] + '…'}"
                         + (f"\n{how}" if side == "a" else "\n"), fontsize=9, loc="left" if side == "a" else "center")
    fig.suptitle("Duplicate pairs")
    _save(fig, path)


def image_sizes_png(sizes: dict[str, Sequence[tuple[int, int]]], path: str) -> None:
    """Image sizes per split: a histogram of the shorter side, and width against height."""
    fig, (short, scatter) = plt.subplots(1, 2, figsize=(10, 4))
    shorter = {split: [min(w, h) for w, h in values] for split, values in sizes.items() if values}
    if shorter:
        short.hist(list(shorter.values()), bins=30, stacked=True, label=list(shorter))
        short.legend()
    short.set_xlabel("shorter side, px")
    short.set_ylabel("images")
    short.set_title("Shorter side")
    for split, values in sizes.items():
        if values:
            scatter.scatter([w for w, _ in values], [h for _, h in values], s=8, alpha=0.5, label=split)
    scatter.set_xlabel("width, px")
    scatter.set_ylabel("height, px")
    scatter.set_title("Width and height")
    _save(fig, path)


def _tiles(items: Sequence[dict[str, Any]], caption: Callable[[dict[str, Any]], str], title: str, path: str,
           columns: int, overlays: dict[str, Image.Image] | None = None) -> None:
    """A grid of the images of ``items`` (their ``path``), each titled ``caption(item)``."""
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        _show(ax, item["path"], (overlays or {}).get(item["path"]))
        ax.set_title(caption(item), fontsize=9)
    fig.suptitle(title)
    _save(fig, path)


def _show(ax, path: str, picture: Image.Image | None = None) -> None:
    """A thumbnail of ``picture`` (default: the image at ``path``) in ``ax``; a file gone or
    changed since it was listed leaves the tile blank."""
    try:
        image = picture or load_image(path)
    except ImageError:
        return
    image.thumbnail((256, 256))
    ax.imshow(image)


# --- heat maps (cnnkit explain, the evaluate gallery) ----------------------------------------


def heat_overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``heat`` (H, W, in [0, 1]) coloured red for high and blue for low, blended over ``image``
    (RGB, the same size)."""
    colours = (matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255).astype(np.uint8)
    return Image.blend(image, Image.fromarray(colours, mode="RGB"), alpha)


def explanation_png(image: Image.Image, heat: np.ndarray, caption: str, path: str, size: int = 300) -> None:
    """:func:`explanation_picture` written beside ``path`` and renamed, so that no half-written
    picture is left."""
    canvas = explanation_picture(image, heat, caption, size)
    tmp = f"{path}.tmp"
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def explanation_picture(image: Image.Image, heat: np.ndarray, caption: str, size: int = 300) -> Image.Image:
    """``image`` and ``heat`` blended over it, side by side, each enlarged to ``size`` pixels on
    its long side, with ``caption`` in a band under them."""
    scale = size / max(image.size)
    shape = (round(image.width * scale), round(image.height * scale))
    panels = [picture.resize(shape, Image.Resampling.BICUBIC) for picture in (image, heat_overlay(image, heat))]
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: one fixed size
        font = ImageFont.load_default()
    gap, band = 4, 26
    canvas = Image.new("RGB", (2 * shape[0] + gap, shape[1] + band), "white")
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * (shape[0] + gap), 0))
    draw = ImageDraw.Draw(canvas)
    while len(caption) > 1 and draw.textlength(caption, font=font) > canvas.width - 12:
        caption = caption[:-2] + "…"
    draw.text((6, shape[1] + 5), caption, fill="black", font=font)
    return canvas


# --- training (cnnkit train, cnnkit lr-find) -------------------------------------------------


def _save_atomic(fig, path: str) -> None:
    """Save beside ``path`` and rename: a viewer never sees a half-written picture."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def training_curves_png(history: Sequence[dict[str, Any]], path: str, fine_tune_from: int | None = None) -> None:
    """Loss and accuracy per epoch, training against validation (metrics.jsonl rows)."""
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((loss_ax, "loss", "Loss (NLL)"), (acc_ax, "acc", "Accuracy")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", markersize=3, label="train")
        ax.plot(epochs, [row[f"val_{key}"] for row in history], marker="o", markersize=3, label="validation")
        if fine_tune_from is not None and epochs and fine_tune_from < epochs[-1]:
            ax.axvline(fine_tune_from + 0.5, color="grey", linestyle="--", linewidth=1, label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    if epochs:
        loss_ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        acc_ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    acc_ax.set_ylim(0, 1)
    _save_atomic(fig, path)


def lr_find_png(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: float | None, path: str
) -> None:
    """The learning-rate range test: loss against learning rate (log scale), raw and smoothed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="lightgrey", linewidth=1, label="batch loss")
    ax.plot(lrs, smoothed, linewidth=2, label="smoothed")
    if suggestion is not None:
        ax.axvline(suggestion, color="red", linestyle="--", linewidth=1, label=f"suggested {suggestion:.1e}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:  # the divergent tail would squash the interesting part
        low, high = min(finite), max(finite[: max(1, len(finite) * 9 // 10)])
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.25 * (high - low + 1e-9))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("Learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save_atomic(fig, path)
