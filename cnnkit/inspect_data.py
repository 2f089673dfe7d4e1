"""``cnnkit inspect DATA_DIR``: what is in a data set, before a model is trained on it.

Per split and class: image counts and imbalance, sizes and colour modes, unreadable files (with
the reasons ``predict`` gives), tiny and very elongated images. Duplicates: the same bytes
(SHA-256 of the file) or a near-identical picture (imagehash's 64-bit perceptual hash, at most
``phash_distance`` bits apart: a re-encoded or slightly resized copy), within a split and across
splits; with a backbone (a checkpoint, or an architecture and weights), also a similar picture:
whitened backbone features with a cosine of at least ``similarity`` (cnnkit.data.similarity: a
cropped copy, another shot of the same scene). The same picture in two splits is a leak
(evaluation sees what training saw); under two labels, a label conflict. Needs the 'inspect'
extra (imagehash). With ``label_issues``, also the images whose label looks wrong
(cnnkit.label_issues: k-fold heads on the same features, cleanlab).

(Not ``inspect.py``: a module of that name shadows the standard library's in some tools.)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from . import html_report, label_issues
from .config import InspectConfig
from .data.folders import walk_images
from .data.similarity import cosine_pairs, whiten
from .data.transforms import load_image
from .errors import DataError, ImageError, OutputError, require_extra
from .inference.backbone import load_backbone
from .runtime import prepare_output_dir

log = logging.getLogger(__name__)

# Split name → the folder names it may have (the first found is used), as training reads them.
SPLIT_FOLDERS = {"train": ("train",), "valid": ("valid", "val", "validation"), "test": ("test",)}
WHOLE = "all"  # the split name of a DATA_DIR that is itself a folder of class folders
TINY_SIDE = 32  # pixels: an image with a shorter side is reported as tiny
MAX_ASPECT = 4.0  # long side / short side above this is reported as extreme
REPORT_FILES = ("inspect.json", "pairs.csv", "inspect.html")
FIGURES = ("sizes.png", "pairs.png")  # with matplotlib (the plot extra)
PAIRS_SHOWN = 12  # pairs in pairs.png (all are in pairs.csv and inspect.html)
SHOWN = 10  # rows per list in the terminal summary (all are in --json and --output)


@dataclass
class ImageRecord:
    """One file of the data set: where it is, and what reading it found."""

    path: str
    split: str
    label: str
    sha256: str = ""
    phash: int = 0
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str | None = None


@dataclass
class InspectResult:
    report: dict[str, Any]
    files: list[str] = field(default_factory=list)

    @property
    def leaks(self) -> int:
        """Pairs of duplicate images in two different splits."""
        return int(self.report["duplicates"]["across_splits"])

    @property
    def label_conflicts(self) -> int:
        return int(self.report["duplicates"]["label_conflicts"])


def inspect_data(cfg: InspectConfig) -> InspectResult:
    """Read every image of ``cfg.data_dir``, build the report, and write it where asked."""
    require_extra("inspect", "imagehash")
    if cfg.label_issues:
        require_extra("labels", "cleanlab")
    backbone = load_backbone(cfg) if cfg.has_backbone else None  # a bad one fails before the reading
    if cfg.output:
        prepare_output_dir(cfg.output, [*REPORT_FILES, *FIGURES, *(label_issues.FILES if cfg.label_issues else ())],
                           cfg.force)
    layout = find_splits(cfg.data_dir)
    records = [read_image(path, split, label)
               for split, classes in layout.items() for label, paths in classes.items() for path in paths]
    for record in records:
        if record.error is not None:
            log.warning("cannot read %s: %s", record.path, record.error)
    readable = [r for r in records if r.error is None]
    features = backbone.features([r.path for r in readable], cfg) if backbone is not None and readable else None
    pairs = duplicate_pairs(readable, cfg.phash_distance, None if features is None else whiten(features),
                            cfg.min_similarity)
    report = {
        "data_dir": cfg.data_dir,
        "phash_distance": cfg.phash_distance,
        "backbone": backbone.source if backbone is not None else None,
        "similarity": cfg.min_similarity if backbone is not None else None,
        "images": len(records),
        "splits": {split: split_summary([r for r in records if r.split == split], classes)
                   for split, classes in layout.items()},
        "duplicates": {
            "exact_pairs": sum(p["kind"] == "exact" for p in pairs),
            "near_pairs": sum(p["kind"] == "near" for p in pairs),
            "similar_pairs": sum(p["kind"] == "similar" for p in pairs),
            "within_split": sum(not p["across_splits"] for p in pairs),
            "across_splits": sum(p["across_splits"] for p in pairs),
            "label_conflicts": sum(p["label_conflict"] for p in pairs),
        },
        "pairs": pairs,
    }
    if cfg.label_issues:
        report["label_issues"] = label_issues.find_label_issues(
            backbone, features, [(r.path, r.split, r.label) for r in readable], cfg)
    result = InspectResult(report)
    if cfg.output:
        sizes = {split: [(r.width, r.height) for r in records if r.split == split and r.error is None]
                 for split in layout}
        result.files = write_report(report, cfg.output, sizes)
    return result


def find_splits(data_dir: str) -> dict[str, dict[str, list[str]]]:
    """Split → class label → image paths: DATA_DIR's train/, valid/ (or val/) and test/ folders
    of class folders, or DATA_DIR itself as one split (``all``) when it has none of them."""
    if not os.path.isdir(data_dir):
        raise DataError(f"DATA_DIR not found or not a folder: {data_dir}")
    roots = {}
    for split, names in SPLIT_FOLDERS.items():
        folder = next((os.path.join(data_dir, n) for n in names if os.path.isdir(os.path.join(data_dir, n))), None)
        if folder is not None:
            roots[split] = folder
    layout = {}
    for split, root in (roots or {WHOLE: data_dir}).items():
        labels = sorted(n for n in os.listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
        layout[split] = {label: walk_images(os.path.join(root, label)) for label in labels}
    if not any(layout.values()):
        raise DataError(f"{data_dir} has no class folders (expected {data_dir}/<class>/<images>, "
                        "or train/, valid/ and test/ folders of them)")
    return layout


def read_image(path: str, split: str, label: str) -> ImageRecord:
    """Decode ``path`` as training would (the same reasons when it cannot be), and hash it."""
    import imagehash

    record = ImageRecord(path, split, label)
    try:
        image = load_image(path)
        with open(path, "rb") as handle:
            data = handle.read()
    except ImageError as exc:
        record.error = str(exc)
        return record
    except OSError as exc:  # gone or changed between the decoding and the read
        record.error = f"cannot read: {exc.strerror or exc}"
        return record
    record.sha256 = hashlib.sha256(data).hexdigest()
    record.phash = int(str(imagehash.phash(image)), 16)
    record.width, record.height = image.size
    try:
        with Image.open(io.BytesIO(data)) as header:  # the file's own mode: load_image gives RGB
            record.mode = header.mode
    except Exception:  # the decoded image came from the same bytes: this is not expected
        record.mode = "?"
    return record


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_pairs(hashes: Sequence[int], max_distance: int, block: int = 256) -> Iterator[tuple[int, int, int]]:
    """``(i, j, distance)`` for every i < j whose 64-bit ``hashes`` differ in at most
    ``max_distance`` bits; ``block`` rows at a time (memory: block x len(hashes) x 8 bytes)."""
    values = np.asarray(hashes, dtype=np.uint64)
    for start in range(0, len(values), block):
        xor = values[start:start + block, None] ^ values[None, :]
        distance = _POPCOUNT[xor.view(np.uint8)].reshape(*xor.shape, 8).sum(axis=2)
        rows, cols = np.nonzero(distance <= max_distance)
        for row, col in zip(rows.tolist(), cols.tolist()):
            if col > start + row:
                yield start + row, col, int(distance[row, col])


def duplicate_pairs(readable: Sequence[ImageRecord], max_distance: int, unit: np.ndarray | None = None,
                    min_similarity: float = 1.0) -> list[dict[str, Any]]:
    """Pairs of ``readable`` images with the same bytes (``exact``), pHashes at most
    ``max_distance`` bits apart (``near``) or, given ``unit`` (their whitened features, a row
    each), a cosine of at least ``min_similarity`` (``similar``); each saying whether it crosses
    splits or labels, leaks and label conflicts first."""
    kinds: dict[tuple[int, int], str] = {}
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, record in enumerate(readable):
        by_digest[record.sha256].append(i)
    for group in by_digest.values():
        kinds.update({pair: "exact" for pair in combinations(group, 2)})
    for i, j, _ in hamming_pairs([r.phash for r in readable], max_distance):
        kinds.setdefault((i, j), "near")
    if unit is not None:
        for i, j, _ in cosine_pairs(unit, min_similarity):
            kinds.setdefault((i, j), "similar")
    pairs = [_pair(kind, readable[i], readable[j], None if unit is None else float(unit[i] @ unit[j]))
             for (i, j), kind in kinds.items()]
    order = {"exact": 0, "near": 1, "similar": 2}
    return sorted(pairs, key=lambda p: (not p["across_splits"], not p["label_conflict"], order[p["kind"]],
                                        p["distance"], -(p["similarity"] or 0), p["a"]["path"], p["b"]["path"]))


def _pair(kind: str, a: ImageRecord, b: ImageRecord, similarity: float | None) -> dict[str, Any]:
    return {
        "kind": kind,
        "distance": bin(a.phash ^ b.phash).count("1"),  # pHash bits apart
        "similarity": None if similarity is None else round(min(similarity, 1.0), 4),  # whitened cosine
        "a": {"path": a.path, "split": a.split, "label": a.label},
        "b": {"path": b.path, "split": b.split, "label": b.label},
        "across_splits": a.split != b.split,
        "label_conflict": a.label != b.label,
    }


def split_summary(records: Sequence[ImageRecord], classes: dict[str, list[str]]) -> dict[str, Any]:
    """Counts per class, imbalance, sizes and modes, and the files worth a look, of one split."""
    readable = [r for r in records if r.error is None]
    counts = {label: sum(r.label == label and r.error is None for r in records) for label in classes}
    present = [n for n in counts.values() if n]
    sides = [(r.width, r.height) for r in readable]
    return {
        "images": len(readable),
        "classes": counts,
        "empty_classes": [label for label, n in counts.items() if not n],
        "imbalance": round(max(present) / min(present), 3) if present else None,  # largest / smallest class
        "width": _spread([w for w, _ in sides]),
        "height": _spread([h for _, h in sides]),
        "modes": dict(Counter(r.mode for r in readable).most_common()),
        "unreadable": [{"path": r.path, "error": r.error} for r in records if r.error is not None],
        "tiny": [r.path for r in readable if min(r.width, r.height) < TINY_SIDE],
        "extreme_aspect": [r.path for r in readable if max(r.width, r.height) > MAX_ASPECT * min(r.width, r.height)],
    }


def _spread(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def write_report(report: dict[str, Any], folder: str, sizes: dict[str, list[tuple[int, int]]] | None = None) -> list[str]:
    """inspect.json (the whole report), pairs.csv (one duplicate pair a row), with matplotlib
    sizes.png (of ``sizes``: split -> each readable image's width and height) and pairs.png (a
    contact sheet of the first pairs), with label issues label_issues.csv and .png, and
    inspect.html (a page of all, with thumbnails); their paths."""
    json_path, csv_path, html_path = (os.path.join(folder, name) for name in REPORT_FILES)
    try:
        # surrogateescape: a file name that is not UTF-8 is written as its own bytes, as predict does
        with open(json_path, "w", encoding="utf-8", errors="surrogateescape") as handle:
            json.dump(report, handle, indent=2, ensure_ascii=False)
        with open(csv_path, "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            writer = csv.writer(handle)
            writer.writerow(["kind", "distance", "similarity", "across_splits", "label_conflict",
                             "path_a", "split_a", "label_a", "path_b", "split_b", "label_b"])
            for p in report["pairs"]:
                writer.writerow([p["kind"], p["distance"], "" if p["similarity"] is None else p["similarity"],
                                 p["across_splits"], p["label_conflict"],
                                 *p["a"].values(), *p["b"].values()])
    except OSError as exc:
        raise OutputError(f"cannot write the report to {folder}: {exc.strerror or exc}") from None
    written = [json_path, csv_path, *write_figures(report, folder, sizes or {})]
    if "label_issues" in report:
        written += label_issues.write_files(report["label_issues"], folder)
    return [*written, html_report.write_page(html_path, html_report.inspection_page(report, folder))]


def write_figures(report: dict[str, Any], folder: str, sizes: dict[str, list[tuple[int, int]]]) -> list[str]:
    """sizes.png and (when there are pairs) pairs.png in ``folder``; none without matplotlib."""
    try:
        from . import plots
    except ImportError:
        log.warning("%s are not drawn: matplotlib is not installed (pip install 'cnnkit[plot]')", " and ".join(FIGURES))
        return []
    sizes_path, pairs_path = (os.path.join(folder, name) for name in FIGURES)
    try:
        plots.image_sizes_png(sizes, sizes_path)
        if not report["pairs"]:
            return [sizes_path]
        plots.pairs_png(report["pairs"][:PAIRS_SHOWN], pairs_path)
    except OSError as exc:
        raise OutputError(f"cannot write the figures to {folder}: {exc.strerror or exc}") from None
    return [sizes_path, pairs_path]


def format_summary(report: dict[str, Any]) -> str:
    """The terminal summary."""
    splits = report["splits"]
    lines = [f"{report['data_dir']}: {report['images']} files in {len(splits)} split(s): {', '.join(splits)}", ""]
    labels = sorted({label for s in splits.values() for label in s["classes"]})
    width = max([len("imbalance"), *(len(label) for label in labels)])
    lines.append(f"{'class':<{width}}" + "".join(f"{name:>9}" for name in splits))
    for label in labels:
        lines.append(f"{label:<{width}}" + "".join(f"{s['classes'].get(label, '-'):>9}" for s in splits.values()))
    lines.append(f"{'imbalance':<{width}}" + "".join(
        f"{(str(s['imbalance']) + 'x') if s['imbalance'] else '-':>9}" for s in splits.values()))
    for name, s in splits.items():
        if s["width"]:
            lines.append(f"{name}: width {_range(s['width'])}, height {_range(s['height'])} px; modes "
                         + ", ".join(f"{mode} {n}" for mode, n in s["modes"].items()))
    for key, title in (("empty_classes", "empty class folders"), ("unreadable", "unreadable files"),
                       ("tiny", f"tiny images (a side under {TINY_SIDE} px)"),
                       ("extreme_aspect", f"extreme aspect ratio (over {MAX_ASPECT:g}:1)")):
        found = [(name, item) for name, s in splits.items() for item in s[key]]
        if found:
            lines += ["", f"{title}: {len(found)}"]
            lines += [f"  {name}: " + (f"{item['path']}: {item['error']}" if isinstance(item, dict) else item)
                      for name, item in found[:SHOWN]]
            lines += [f"  ... {len(found) - SHOWN} more"] if len(found) > SHOWN else []
    d = report["duplicates"]
    similar = (f", {d['similar_pairs']} similar (features of {report['backbone']}, cosine at least "
               f"{report['similarity']:g})" if report["backbone"] else "")
    lines += ["", f"duplicates: {d['exact_pairs']} exact, {d['near_pairs']} near (pHash within "
                  f"{report['phash_distance']} bits){similar}: {d['within_split']} within a split, {d['across_splits']} "
                  f"across splits (leaks); {d['label_conflicts']} under two labels (label conflicts)"]
    for p in report["pairs"][:SHOWN]:
        notes = [n for n, flag in (("leak", p["across_splits"]), ("label conflict", p["label_conflict"])) if flag]
        how = (f"similar (cosine {p['similarity']:.3f})" if p["kind"] == "similar"
               else f"near ({p['distance']} bits)" if p["kind"] == "near" else "exact")
        lines.append(f"  {how}: {p['a']['path']} ~ {p['b']['path']}" + (f"  [{', '.join(notes)}]" if notes else ""))
    if len(report["pairs"]) > SHOWN:
        lines.append(f"  ... {len(report['pairs']) - SHOWN} more (all in --json and --output's pairs.csv)")
    if "label_issues" in report:
        lines += ["", *label_issues.format_section(report["label_issues"], SHOWN)]
    return "\n".join(lines)


def _range(spread: dict[str, float]) -> str:
    return f"{spread['min']:g}-{spread['max']:g} (median {spread['median']:g})"
