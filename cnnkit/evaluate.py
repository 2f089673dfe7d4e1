"""How good is a checkpoint: metrics, calibration, abstention, and the report files.

The metric functions are plain numpy over ``(probabilities, targets)`` so they can be checked
against hand-computed examples; :func:`evaluate` scores a labelled folder and assembles them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Sequence

import numpy as np

from . import html_report
from .models.checkpoint import load_checkpoint
from .models.exported import is_exported_model
from .config import EvaluateConfig
from .data.folders import ImageDataset, expand_inputs, scan_image_folder
from .data.transforms import model_view
from .errors import ConfigError, DataError, OutputError
from .models.openset import OpenSetScorer, standardise
from .runtime import prepare_output_dir

if TYPE_CHECKING:
    from .inference.predictor import Predictor

log = logging.getLogger(__name__)

ECE_BINS = 15
REPORT_FILES = ("report.json", "confusion_matrix.csv", "predictions.csv", "report.html")


# --- metrics ------------------------------------------------------------------------------


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (targets, predicted), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where a ratio is undefined (as sklearn)."""
    true_pos = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1)
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(true_pos), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Share-weighted mean |accuracy - confidence| over equal-width confidence bins (lo, hi]."""
    stats = reliability_bins(confidence, correct, bins)
    n = max(len(confidence), 1)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in stats if b["count"]))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per bin: its range, image count, mean confidence and accuracy (the reliability diagram)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 goes to the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for i in range(bins):
        mask = index == i
        count = int(mask.sum())
        out.append({
            "low": float(edges[i]),
            "high": float(edges[i + 1]),
            "count": count,
            "confidence": float(confidence[mask].mean()) if count else 0.0,
            "accuracy": float(correct[mask].mean()) if count else 0.0,
        })
    return out


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None)).mean())


def top_k_accuracy(probs: np.ndarray, targets: np.ndarray, k: int) -> float:
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == targets[:, None]).any(axis=1).mean())


def softmax_with_temperature(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    scaled = log_probs / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(log_probs: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(log_probs / T) (Guo et al., 2017).

    A golden-section search over log T in [0.05, 20]: the NLL is unimodal in T, and a 1-D
    search needs no optimiser state and gives the same T every time.
    """

    def nll(log_t: float) -> float:
        return negative_log_likelihood(softmax_with_temperature(log_probs, math.exp(log_t)), targets)

    low, high = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(math.exp((low + high) / 2))


def abstain_threshold(confidence: np.ndarray, correct: np.ndarray, target_coverage: float) -> dict[str, float]:
    """The confidence threshold that keeps ``target_coverage`` of the images (the most confident),
    with the coverage and accuracy actually obtained on the kept ones."""
    order = np.sort(confidence)[::-1]
    keep = max(1, math.ceil(target_coverage * len(order) - 1e-9))
    threshold = float(order[keep - 1])
    kept = confidence >= threshold
    return {
        "threshold": threshold,
        "target_coverage": float(target_coverage),
        "coverage": float(kept.mean()),
        "accuracy_kept": float(correct[kept].mean()),
    }


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling known (positive) from unknown images by a score that
    is higher for known ones: P(known > unknown), ties counting half (Mann-Whitney U)."""
    scores = np.concatenate([known, unknown]).astype(np.float64)
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # 1-based, ties get their mean rank
    n_known = len(known)
    return float((ranks[:n_known].sum() - n_known * (n_known + 1) / 2) / (n_known * len(unknown)))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of unknown images accepted at the threshold that keeps ``tpr`` of the known ones
    (the threshold as :func:`abstain_threshold` picks it)."""
    order = np.sort(known)[::-1]
    threshold = order[max(1, math.ceil(tpr * len(order) - 1e-9)) - 1]
    return float((unknown >= threshold).mean())


def separation(known: np.ndarray, unknown: np.ndarray) -> dict[str, float]:
    return {"auroc": auroc(known, unknown), "fpr_at_95_tpr": fpr_at_tpr(known, unknown)}


def most_confused(matrix: np.ndarray, classes: Sequence[str], limit: int = 5) -> list[dict[str, Any]]:
    """The off-diagonal cells with the most images, largest first."""
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    cells = sorted(
        ((int(off[t, p]), t, p) for t, p in zip(*np.nonzero(off))), key=lambda c: (-c[0], c[1], c[2])
    )
    return [{"true": classes[t], "predicted": classes[p], "count": n} for n, t, p in cells[:limit]]


def classification_report(
    probs: np.ndarray, targets: np.ndarray, classes: Sequence[str], top_k: int = 5
) -> dict[str, Any]:
    """Accuracy, top-k, per-class and averaged precision/recall/F1, confusion matrix, ECE, NLL.

    Averages are over the classes present in the targets or the predictions, as sklearn's
    ``classification_report`` does; the weighted average weights by support.
    """
    predicted = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    correct = predicted == targets
    matrix = confusion_matrix(targets, predicted, len(classes))
    scores = per_class_scores(matrix)
    present = np.union1d(np.unique(targets), np.unique(predicted))
    support = scores["support"][present]
    averages = {}
    for metric in ("precision", "recall", "f1"):
        values = scores[metric][present]
        averages[metric] = {
            "macro": float(values.mean()),
            "weighted": float((values * support).sum() / max(support.sum(), 1)),
        }
    return {
        "images": int(len(targets)),
        "accuracy": float(correct.mean()),
        "top_k": int(min(top_k, len(classes))),
        "top_k_accuracy": top_k_accuracy(probs, targets, top_k),
        "nll": negative_log_likelihood(probs, targets),
        "ece": expected_calibration_error(confidence, correct),
        "per_class": [
            {
                "label": label,
                "precision": float(scores["precision"][i]),
                "recall": float(scores["recall"][i]),
                "f1": float(scores["f1"][i]),
                "support": int(scores["support"][i]),
            }
            for i, label in enumerate(classes)
        ],
        "macro_avg": {m: averages[m]["macro"] for m in averages},
        "weighted_avg": {m: averages[m]["weighted"] for m in averages},
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, classes),
        "reliability": reliability_bins(confidence, correct),
    }


# --- evaluating a checkpoint on a folder --------------------------------------------------


@dataclass
class EvaluationResult:
    report: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    calibrated_checkpoint: str | None = None


def resolve_eval_folder(data_dir: str, split: str | None) -> str:
    if not os.path.isdir(data_dir):
        raise DataError(f"DATA_DIR not found or not a folder: {data_dir}")
    if split is not None:
        folder = os.path.join(data_dir, split)
        if not os.path.isdir(folder):
            raise DataError(f"--split {split}: no folder {folder}")
        return folder
    test = os.path.join(data_dir, "test")
    return test if os.path.isdir(test) else data_dir


def match_classes(
    found: Sequence[str], samples: list[tuple[str, int]], known: Sequence[str], ignore_unknown: bool, folder: str
) -> list[tuple[str, int]]:
    """Samples re-labelled with the checkpoint's class indices (classes are matched by name)."""
    index = {label: i for i, label in enumerate(known)}
    unknown = [c for c in found if c not in index]
    missing = [c for c in known if c not in set(found)]
    if unknown and not ignore_unknown:
        raise DataError(
            f"{folder} has classes the checkpoint does not know: {', '.join(unknown)} "
            "(--ignore-unknown skips them)"
        )
    if missing and not ignore_unknown:
        raise DataError(
            f"{folder} has no folder for checkpoint classes: {', '.join(missing)} "
            "(--ignore-unknown evaluates the others)"
        )
    if unknown:
        log.warning("skipping images of classes the checkpoint does not know: %s", ", ".join(unknown))
    if missing:
        log.warning("no images of checkpoint classes: %s", ", ".join(missing))
    return [(path, index[found[t]]) for path, t in samples if found[t] in index]


def evaluate(cfg: EvaluateConfig) -> EvaluationResult:
    """Score the labelled folder, build the report, and write what ``cfg`` asks for."""
    from .inference.predictor import Predictor

    if (cfg.calibrate or cfg.target_coverage is not None) and is_exported_model(cfg.checkpoint):
        raise ConfigError(
            "--calibrate and --target-coverage store their results in a checkpoint, and an export (ONNX, OpenVINO) is "
            "read-only: evaluate the .pt checkpoint with them, then export it again"
        )
    if cfg.output:
        prepare_output_dir(cfg.output, list(REPORT_FILES), cfg.force)
    folder = resolve_eval_folder(cfg.data_dir, cfg.split)
    found, samples = scan_image_folder(folder)
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names, tta=cfg.tta)
    ckpt = predictor.checkpoint
    samples = match_classes(found, samples, ckpt.classes, cfg.ignore_unknown, folder)
    if not samples:
        raise DataError(f"no images of the checkpoint's classes in {folder}")

    target_of = dict(samples)
    rows, unreadable, distance = _score(predictor, cfg, [p for p, _ in samples])
    if not rows:
        raise DataError(f"none of the images in {folder} could be read")
    y = np.asarray([target_of[path] for path, _ in rows])
    log_probs = np.log(np.clip(np.stack([p for _, p in rows]).astype(np.float64), 1e-30, None))
    stored_t = ckpt.temperature
    probs = softmax_with_temperature(log_probs, stored_t)

    report = classification_report(probs, y, ckpt.classes, cfg.top_k)
    report.update({
        "checkpoint": cfg.checkpoint,
        "data": folder,
        "arch": ckpt.arch,
        "temperature": stored_t,
        "tta": predictor.tta,
        "unreadable": unreadable,
        "classes": [{"label": c, "name": predictor.names.get(c, c)} for c in ckpt.classes],
    })
    calibration = dict(ckpt.calibration)
    if cfg.calibrate or cfg.target_coverage is not None:  # what they were fitted with is what predict must use
        calibration["tta"] = predictor.tta
    if cfg.calibrate:
        temperature = fit_temperature(log_probs, y)
        probs = softmax_with_temperature(log_probs, temperature)
        calibrated = classification_report(probs, y, ckpt.classes, cfg.top_k)
        report["calibration"] = {
            "temperature": temperature,
            "ece_before": report["ece"],
            "ece_after": calibrated["ece"],
            "nll_before": report["nll"],
            "nll_after": calibrated["nll"],
            "reliability_after": calibrated["reliability"],
        }
        calibration.update({"temperature": temperature, "fitted_on": folder, "images": len(y)})
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    open_set = _open_set_for(predictor, cfg, confidence, distance)
    known = open_set.known_scores(confidence, distance) if open_set is not None else None
    unknown = _unknown_scores(predictor, cfg, calibration.get("temperature", stored_t), open_set) if cfg.unknown else None
    if unknown is not None:
        report["unknown"] = _unknown_report(unknown, confidence, distance, known, cfg.unknown)
    if cfg.target_coverage is not None:
        report["abstain"] = abstain_threshold(confidence, predicted == y, cfg.target_coverage)
        calibration.update({"abstain_threshold": report["abstain"]["threshold"],
                            "target_coverage": cfg.target_coverage})
        if known is not None:  # what --abstain uses; the confidence threshold stays for exports
            report["abstain_combined"] = abstain_threshold(known, predicted == y, cfg.target_coverage)
            calibration["unknown_threshold"] = report["abstain_combined"]["threshold"]
        for key, score in (("abstain", "confidence"), ("abstain_combined", "known")):
            if unknown is not None and key in report:
                report[key]["unknown_rejected"] = float((unknown[score] < report[key]["threshold"]).mean())

    predictions = [
        {
            "path": path,
            "true": ckpt.classes[t],
            "predicted": ckpt.classes[p],
            "confidence": float(c),
            "correct": bool(t == p),
        }
        for (path, _), t, p, c in zip(rows, y, predicted, confidence)
    ]
    wrong = sorted((p for p in predictions if not p["correct"]), key=lambda p: -p["confidence"])
    report["most_confident_wrong"] = wrong[: cfg.worst]
    result = EvaluationResult(report, predictions)

    if cfg.calibrate or cfg.target_coverage is not None:
        result.calibrated_checkpoint = _store_calibration(cfg, calibration, open_set.stats if open_set else None)
        report["calibrated_checkpoint"] = result.calibrated_checkpoint
    if cfg.output:
        overlays = gallery_heat_maps(predictor, report["most_confident_wrong"])
        result.files = write_report(result, cfg.output, predictor.names, overlays)
    return result


def gallery_heat_maps(predictor: Predictor, wrong: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Path → Grad-CAM of the predicted class over the image as the model saw it, for the
    gallery of the most confidently wrong; none without captum or the torch model (one log line)."""
    if not wrong:
        return {}
    if predictor.model is None:
        log.info("the gallery has no heat maps: Grad-CAM needs the torch checkpoint, not an export")
        return {}
    if importlib.util.find_spec("captum") is None:
        log.info("the gallery has no heat maps: captum is not installed (pip install 'cnnkit[explain]')")
        return {}
    from . import plots
    from .inference.cam import HeatMapper

    mapper = HeatMapper(predictor.model, predictor.checkpoint.arch)
    preprocess = predictor.checkpoint.preprocess
    images = ImageDataset([item["path"] for item in wrong], predictor.transform, max_pixels=preprocess.max_pixels)
    overlays = {}
    for index, item in enumerate(wrong):
        tensor, _, error = images[index]
        if error is None:  # a file changed since it was scored: its tile shows what load_image can
            heat = mapper.maps(tensor[None], [predictor.classes.index(item["predicted"])])[0]
            overlays[item["path"]] = plots.heat_overlay(model_view(tensor, preprocess), heat.numpy())
    return overlays


def _score(predictor: Any, cfg: EvaluateConfig,
           paths: Sequence[str]) -> tuple[list[tuple[str, np.ndarray]], list[dict[str, str]], np.ndarray | None]:
    """``([(path, uncalibrated probabilities)], unreadable, feature distances or None)``."""
    rows, unreadable, distances = [], [], []
    for path, probs, distance, error in predictor.score_paths_with_distance(
            paths, cfg.batch_size, cfg.workers, cfg.progress, calibrated=False):
        if error is not None:
            unreadable.append({"path": path, "error": error})
            log.warning("cannot score %s: %s", path, error)
            continue
        rows.append((path, probs))
        distances.append(distance)
    return rows, unreadable, np.asarray(distances) if predictor.open_set is not None else None


def _open_set_for(predictor: Any, cfg: EvaluateConfig, confidence: np.ndarray,
                  distance: np.ndarray | None) -> OpenSetScorer | None:
    """The combined score's scorer, None without open-set statistics. When evaluate stores a
    calibration, the z-scores are re-fitted on these (validation) images at its temperature:
    the stored ones were fitted at training's temperature of 1."""
    if predictor.open_set is None:
        if cfg.unknown and predictor.checkpoint.open_set is not None:
            log.warning("the feature score needs the checkpoint (.pt), not an export: confidence alone is measured")
        return None
    if not (cfg.calibrate or cfg.target_coverage is not None):
        return predictor.open_set
    return OpenSetScorer({**predictor.open_set.stats, "confidence": standardise(confidence),
                          "distance": standardise(distance)})


def _unknown_scores(predictor: Any, cfg: EvaluateConfig, temperature: float,
                    open_set: OpenSetScorer | None) -> dict[str, Any]:
    """Confidence, feature distance and combined score of the ``--unknown`` images."""
    if not os.path.isdir(cfg.unknown):
        raise DataError(f"--unknown {cfg.unknown}: not found or not a folder")
    rows, unreadable, distance = _score(predictor, cfg, list(expand_inputs([cfg.unknown])))
    if not rows:
        raise DataError(f"--unknown {cfg.unknown}: no readable images")
    log_probs = np.log(np.clip(np.stack([p for _, p in rows]).astype(np.float64), 1e-30, None))
    confidence = softmax_with_temperature(log_probs, temperature).max(axis=1)
    return {"images": len(rows), "unreadable": unreadable, "confidence": confidence, "distance": distance,
            "known": open_set.known_scores(confidence, distance) if open_set is not None else None}


def _unknown_report(unknown: dict[str, Any], confidence: np.ndarray, distance: np.ndarray | None,
                    known: np.ndarray | None, folder: str) -> dict[str, Any]:
    """How well each score tells the evaluated images (known) from ``--unknown``'s."""
    report: dict[str, Any] = {"data": folder, "images": unknown["images"], "unreadable": unknown["unreadable"],
                              "confidence": separation(confidence, unknown["confidence"])}
    if known is not None:
        report["distance"] = separation(-distance, -unknown["distance"])  # (nearer: more known)
        report["combined"] = separation(known, unknown["known"])
    return report


def calibrated_path(checkpoint: str) -> str:
    stem, ext = os.path.splitext(checkpoint)
    return f"{stem}.calibrated{ext or '.pt'}"


def _store_calibration(cfg: EvaluateConfig, calibration: dict[str, Any], open_set: dict[str, Any] | None) -> str:
    """Write the calibration (and the open-set statistics standardised with it) into a new
    checkpoint file, or into CKPT itself with --force."""
    target = cfg.checkpoint if cfg.force else calibrated_path(cfg.checkpoint)
    if not cfg.force and os.path.exists(target):
        raise OutputError(f"{target} exists; remove it, or use --force to store the calibration in {cfg.checkpoint}")
    ckpt = load_checkpoint(cfg.checkpoint)
    ckpt.calibration = calibration
    if open_set is not None:
        ckpt.open_set = open_set
    ckpt.save(target)
    log.info("calibration stored in %s", target)
    return target


# --- report files ---------------------------------------------------------------------------


def write_report(
    result: EvaluationResult, folder: str, names: dict[str, str], overlays: dict[str, Any] | None = None
) -> list[str]:
    """report.json, confusion_matrix.csv, predictions.csv, the PNG pictures (the gallery with
    the heat maps in ``overlays``, see :func:`gallery_heat_maps`) and report.html, all of them
    in one page; returns their paths."""
    report = result.report
    classes = [c["label"] for c in report["classes"]]
    written = []

    def path(name: str) -> str:
        written.append(os.path.join(folder, name))
        return written[-1]

    def text_file(name: str) -> IO[str]:
        # surrogateescape: a file or folder name that is not UTF-8 is written as its own bytes,
        # as predict does
        return open(path(name), "w", newline="", encoding="utf-8", errors="surrogateescape")

    try:
        with text_file("report.json") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
        with text_file("confusion_matrix.csv") as handle:
            writer = csv.writer(handle)
            writer.writerow(["true \\ predicted", *classes])
            for label, row in zip(classes, report["confusion_matrix"]):
                writer.writerow([label, *row])
        with text_file("predictions.csv") as handle:
            writer = csv.DictWriter(handle, ["path", "true", "predicted", "confidence", "correct"])
            writer.writeheader()
            writer.writerows(result.predictions)
        from . import plots

        plots.confusion_matrix_png(report["confusion_matrix"], [names.get(c, c) for c in classes],
                                   path("confusion_matrix.png"))
        plots.reliability_png(report, path("reliability.png"))
        if report["most_confident_wrong"]:
            plots.gallery_png(report["most_confident_wrong"], names, path("most_confident_wrong.png"),
                              overlays=overlays)
    except OSError as exc:
        raise OutputError(f"cannot write the report to {folder}: {exc.strerror or exc}") from None
    html_report.write_page(path("report.html"), html_report.evaluation_page(report, folder))
    return written


def format_report(report: dict[str, Any]) -> str:
    """The terminal table."""
    names = {c["label"]: c["name"] for c in report["classes"]}
    k = report["top_k"]
    lines = [
        f"{report['arch']} on {report['data']}: {report['images']} images"
        + (f" ({len(report['unreadable'])} unreadable, skipped)" if report["unreadable"] else ""),
        f"accuracy {report['accuracy']:.1%}   top-{k} {report['top_k_accuracy']:.1%}   "
        f"NLL {report['nll']:.4f}   ECE {report['ece']:.4f}"
        + (f"   (temperature {report['temperature']:.3g})" if report["temperature"] != 1.0 else ""),
        "",
    ]
    width = max([len("class")] + [len(f"{names[r['label']]} ({r['label']})") for r in report["per_class"]])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for row in report["per_class"]:
        label = f"{names[row['label']]} ({row['label']})" if names[row["label"]] != row["label"] else row["label"]
        lines.append(
            f"{label:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
        )
    for avg in ("macro_avg", "weighted_avg"):
        a = report[avg]
        lines.append(
            f"{avg.replace('_', ' '):<{width}}  {a['precision']:9.3f}  {a['recall']:6.3f}  {a['f1']:5.3f}  {report['images']:7d}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    labels = [r["label"] for r in report["per_class"]]
    cell = max(5, *(len(c) for c in labels))
    lines.append(" " * cell + "".join(f"{c:>{cell + 1}}" for c in labels))
    for label, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{label:>{cell}}" + "".join(f"{v:>{cell + 1}}" for v in row))
    if report["most_confused"]:
        lines += ["", "most confused: " + "; ".join(
            f"{names[c['true']]} -> {names[c['predicted']]} ({c['count']})" for c in report["most_confused"])]
    if report["most_confident_wrong"]:
        lines += ["", "most confidently wrong:"]
        lines += [
            f"  {w['confidence']:6.1%}  {w['path']}  true {names[w['true']]}, predicted {names[w['predicted']]}"
            for w in report["most_confident_wrong"]
        ]
    if "calibration" in report:
        c = report["calibration"]
        lines += ["", f"calibration: temperature {c['temperature']:.3f}; ECE {c['ece_before']:.4f} -> "
                      f"{c['ece_after']:.4f}; NLL {c['nll_before']:.4f} -> {c['nll_after']:.4f}"]
    if "unknown" in report:
        u = report["unknown"]
        lines += ["", f"unknown images ({u['images']} in {u['data']}) told from these:   AUROC   FPR at 95% TPR"]
        lines += [f"  {score:<10} {u[score]['auroc']:6.3f}   {u[score]['fpr_at_95_tpr']:6.1%}"
                  for score in ("confidence", "distance", "combined") if score in u]
    for key, score in (("abstain", "confidence"), ("abstain_combined", "the combined open-set score")):
        if key in report:
            a = report[key]
            lines += ["", f"abstain below {score} {a['threshold']:.3f}: keeps {a['coverage']:.1%} of images "
                      f"(target {a['target_coverage']:.0%}), accuracy on those {a['accuracy_kept']:.1%}"
                      + (f"; rejects {a['unknown_rejected']:.1%} of the unknown images" if "unknown_rejected" in a else "")]
    if "abstain_combined" in report:
        lines.append("predict --abstain and serve use the combined score (an export: confidence)")
    if report.get("calibrated_checkpoint"):
        lines.append(f"stored in {report['calibrated_checkpoint']}")
    return "\n".join(lines)
