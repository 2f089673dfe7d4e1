"""Label issues: images whose folder label the rest of the data set disagrees with.

Confident learning (Northcutt et al., cleanlab's ``find_label_issues``) needs out-of-fold
predicted probabilities: for each image, a model's class probabilities from a model that never
saw it. Here that model is cheap: the penultimate features of a frozen backbone (a cnnkit
checkpoint's, with its stored preprocessing, or a torchvision architecture with ``--weights``)
are computed once per image (cnnkit.inference.backbone, eval preprocessing only), and k
logistic-regression heads (standardised features, stratified seeded folds) are fitted on them,
each scoring the fold it left out; their regularisation is the one of a few whose out-of-fold
probabilities fit best (log loss). Minutes for thousands of images on a CPU: one forward pass
per image, and k small fits per candidate. Needs the 'labels' extra (cleanlab, which brings
scikit-learn).
"""

from __future__ import annotations

import csv
import logging
import os
import time
import warnings
from typing import Any, Sequence

import numpy as np

from .config import InspectConfig
from .data.folders import load_category_names
from .errors import DataError, OutputError
from .inference.backbone import Backbone

log = logging.getLogger(__name__)

FILES = ("label_issues.csv", "label_issues.png")  # beside inspect.json
GALLERY = 12  # suspects shown in label_issues.png (all of them are in the CSV and the JSON)
HEAD_C = (0.01, 0.0316, 0.1, 0.316, 1.0)  # the heads' candidate C, half a decade apart
CSV_COLUMNS = ["rank", "path", "split", "given", "given_name", "suggested", "suggested_name", "p_given", "p_suggested"]


def find_label_issues(backbone: Backbone, features: np.ndarray, images: Sequence[tuple[str, str, str]],
                      cfg: InspectConfig) -> dict[str, Any]:
    """The report's ``label_issues`` section for ``images``, readable ``(path, split, label)``
    triples, whose rows of ``features`` ``backbone`` computed: the suspects ranked most suspicious
    first (the given label's out-of-fold probability, lowest first), each with the suggested
    label (the most probable one)."""
    classes = sorted({label for _, _, label in images})
    if len(classes) < 2:
        raise DataError(f"--label-issues needs at least 2 classes with readable images, found {len(classes)}")
    index = {label: i for i, label in enumerate(classes)}
    labels = np.array([index[label] for _, _, label in images])
    counts = np.bincount(labels, minlength=len(classes))
    folds = choose_folds(cfg.folds, classes, counts)
    names = load_category_names(cfg.category_names, classes) if cfg.category_names else backbone.names

    started = time.perf_counter()
    probs, c = out_of_fold_probabilities(features, labels, len(classes), folds, cfg.seed)
    log.info("label issues: %d-fold heads (C=%g of %s) on %d images in %.1fs", folds, c, HEAD_C, len(images),
             time.perf_counter() - started)

    import cleanlab.filter

    ranked = cleanlab.filter.find_label_issues(labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    suggested = probs.argmax(axis=1)
    suspects = [{
        "rank": rank,
        "path": images[i][0],
        "split": images[i][1],
        "given": classes[labels[i]],
        "suggested": classes[suggested[i]],
        "p_given": round(float(probs[i, labels[i]]), 4),
        "p_suggested": round(float(probs[i, suggested[i]]), 4),
    } for rank, i in enumerate(ranked.tolist(), start=1)]
    return {
        "backbone": backbone.source,
        "images": len(images),
        "classes": classes,
        "names": {label: names[label] for label in classes if names.get(label, label) != label},
        "folds": folds,
        "head_c": c,
        "seed": cfg.seed,
        "out_of_fold_accuracy": round(float((suggested == labels).mean()), 4),
        "issues": len(suspects),
        "suspects": suspects,
    }


def choose_folds(folds: int, classes: Sequence[str], counts: np.ndarray) -> int:
    """``folds``, or fewer when the smallest class has fewer images (every fold must hold one of
    each class out and still train on one); a class with a single image is an error."""
    smallest = int(counts.min())
    if smallest < 2:
        rare = ", ".join(c for c, n in zip(classes, counts) if n < 2)
        raise DataError(f"--label-issues needs at least 2 readable images in every class; {rare} "
                        "has fewer: add images to it, or move its folder out of DATA_DIR")
    if smallest < folds:
        rare = classes[int(counts.argmin())]
        log.warning("class %s has only %d readable images: using %d folds instead of %d", rare, smallest, smallest, folds)
    return min(folds, smallest)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int,
                              seed: int, strengths: Sequence[float] = HEAD_C) -> tuple[np.ndarray, float]:
    """(N, num_classes): each row predicted by a multinomial logistic regression (on standardised
    features) fitted on the other folds of a stratified, seeded k-fold split; and the inverse
    regularisation strength ``C`` those heads used: of ``strengths``, the one whose out-of-fold
    probabilities have the lowest log loss (sklearn's default ``C=1`` over-fits a few thousand
    images of hundreds of features, and confident learning reads the probabilities themselves)."""
    fits = [(_out_of_fold(features, labels, num_classes, folds, seed, c), c) for c in strengths]
    losses = [-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean() for probs, _ in fits]
    return fits[int(np.argmin(losses))]


def _out_of_fold(features: np.ndarray, labels: np.ndarray, num_classes: int, folds: int, seed: int,
                 c: float) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(labels), num_classes))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(features, labels)
    for fitted_on, held_out in splits:
        head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        with warnings.catch_warnings():  # a head that stops short of convergence still ranks well
            warnings.simplefilter("ignore", ConvergenceWarning)
            head.fit(features[fitted_on], labels[fitted_on])
        probs[np.ix_(held_out, head.classes_)] = head.predict_proba(features[held_out])
    return probs


def write_files(section: dict[str, Any], folder: str) -> list[str]:
    """label_issues.csv (every suspect) and label_issues.png (the first GALLERY, when matplotlib
    is installed) in ``folder``; their paths."""
    csv_path, png_path = (os.path.join(folder, name) for name in FILES)
    names = section["names"]
    try:
        with open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.DictWriter(handle, CSV_COLUMNS)
            writer.writeheader()
            writer.writerows({**s, "given_name": names.get(s["given"], s["given"]),
                              "suggested_name": names.get(s["suggested"], s["suggested"])} for s in section["suspects"])
        if not section["suspects"]:
            return [csv_path]
        try:
            from .plots import label_issues_png
        except ImportError:
            log.warning("%s is not written: matplotlib is not installed (pip install 'cnnkit[plot]')", FILES[1])
            return [csv_path]
        label_issues_png(section["suspects"][:GALLERY], names, png_path)
    except OSError as exc:
        raise OutputError(f"cannot write the label issues to {folder}: {exc.strerror or exc}") from None
    return [csv_path, png_path]


def format_section(section: dict[str, Any], shown: int) -> list[str]:
    """The terminal summary's lines: the count and the first ``shown`` suspects."""
    names = section["names"]

    def name(label: str) -> str:
        return f"{names[label]} ({label})" if label in names else label

    lines = [f"label issues: {section['issues']} of {section['images']} images suspected (cleanlab on "
             f"{section['folds']}-fold logistic regressions on the features of {section['backbone']}; "
             f"out-of-fold accuracy {section['out_of_fold_accuracy']:.1%})"]
    lines += [f"  {s['path']}: given {name(s['given'])} (p={s['p_given']:.2f}), suggested {name(s['suggested'])} "
              f"(p={s['p_suggested']:.2f})" for s in section["suspects"][:shown]]
    if section["issues"] > shown:
        lines.append(f"  ... {section['issues'] - shown} more (all in --json and --output's label_issues.csv)")
    return lines
