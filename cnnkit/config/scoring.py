"""The configs of the commands that score images with a trained model or a backbone:
``predict``, ``evaluate``, ``explain``, ``inspect``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import EXPLAIN_METHODS, PREDICT_FORMATS, TTA_MODES, Serializable, check, check_common


@dataclass(frozen=True)
class PredictConfig(Serializable):
    """Options of ``cnnkit predict``."""

    inputs: tuple[str, ...]
    checkpoint: str
    top_k: int = 1
    category_names: str | None = None
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    format: str | None = None  # None: from --output's extension, else table
    output: str | None = None  # a CSV/JSONL/JSON file written as results arrive; None: stdout
    resume: bool = False  # skip inputs already in --output and append to it
    force: bool = False  # overwrite an existing --output
    shard: str | None = None  # "K/N": score only the K-th (0-based) of N hash slices
    abstain: bool = False  # label images below the checkpoint's abstain threshold "unknown"
    tta: str | None = None  # TTA_MODES; None: the checkpoint's (what it was calibrated with), else none

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        check(len(self.inputs) > 0, "give at least one INPUT: an image, a folder, or - for paths on stdin")
        check(bool(self.checkpoint), "give a checkpoint with --checkpoint CKPT")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check_common(self.batch_size, self.workers, self.device)
        check(
            self.format is None or self.format in PREDICT_FORMATS,
            f"--format must be one of {', '.join(PREDICT_FORMATS)}, got {self.format!r}",
        )
        check(not (self.resume and self.output is None), "--resume needs --output FILE to continue")
        check(not (self.resume and self.force), "--resume appends to --output and --force overwrites it: choose one")
        check(
            not (self.resume and self.output_format == "json"),
            "--resume needs a CSV or JSONL --output (a JSON array cannot be appended to)",
        )
        self.output_format, self.shard_spec  # validate --output's extension and --shard

    @property
    def output_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.output is not None:
            ext = self.output.lower().rsplit(".", 1)[-1]
            check(
                ext in ("csv", "jsonl", "ndjson", "json"),
                f"cannot tell the format of --output {self.output} from its extension: give --format csv, jsonl or json",
            )
            return "jsonl" if ext == "ndjson" else ext
        return "table"

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        """(K, N) from ``--shard K/N``."""
        if self.shard is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        check(match is not None, f"--shard must look like K/N (e.g. 0/4), got {self.shard!r}")
        k, n = int(match.group(1)), int(match.group(2))  # type: ignore[union-attr]
        check(n >= 1 and 0 <= k < n, f"--shard K/N needs 0 <= K < N, got {self.shard!r}")
        return k, n


@dataclass(frozen=True)
class EvaluateConfig(Serializable):
    """Options of ``cnnkit evaluate``."""

    checkpoint: str
    data_dir: str
    split: str | None = None  # None: DATA_DIR/test when it exists, else DATA_DIR itself
    top_k: int = 5
    category_names: str | None = None
    ignore_unknown: bool = False
    calibrate: bool = False
    target_coverage: float | None = None
    unknown: str | None = None  # a folder of images of classes the model never saw: AUROC, FPR@95
    output: str | None = None
    worst: int = 12
    force: bool = False
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    tta: str | None = None  # TTA_MODES; None: the checkpoint's, else none; stored with --calibrate/--target-coverage

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "give the checkpoint to evaluate")
        check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        check(bool(self.data_dir), "give DATA_DIR, a labelled ImageFolder")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check(
            self.target_coverage is None or 0 < self.target_coverage <= 1,
            f"--target-coverage must be in (0, 1], got {self.target_coverage}",
        )
        check(self.worst >= 0, f"--worst must be 0 or more, got {self.worst}")
        check(self.unknown is None or bool(self.unknown), "--unknown needs a folder of images of classes the model never saw")
        check_common(self.batch_size, self.workers, self.device)


@dataclass(frozen=True)
class ExplainConfig(Serializable):
    """Options of ``cnnkit explain``."""

    inputs: tuple[str, ...]
    checkpoint: str
    output: str  # the folder the PNG overlays go to
    top_k: int = 1  # explain the K most probable classes of each image
    target: str | None = None  # or this class (a label, or its name), whatever its rank
    method: str = "gradcam"  # gradcam | gradcam++
    category_names: str | None = None
    force: bool = False  # overwrite the overlays of the same images already in --output
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        check(len(self.inputs) > 0, "give at least one IMAGE: an image, a folder, or - for paths on stdin")
        check(bool(self.checkpoint), "give a checkpoint with --checkpoint CKPT")
        check(bool(self.output), "give the folder for the pictures with --output DIR")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check(self.target is None or bool(self.target), "--target must name a class")
        check(not (self.target is not None and self.top_k != 1),
               "--target explains one given class and --top-k the most probable ones: choose one")
        check(self.method in EXPLAIN_METHODS,
               f"--method must be one of {', '.join(EXPLAIN_METHODS)}, got {self.method!r}")
        check_common(None, None, self.device)


# Near-duplicates by features (whitened cosine): measured on flowers-20 in benchmarks/RESULTS.md.
DEFAULT_SIMILARITY = 0.9


@dataclass(frozen=True)
class InspectConfig(Serializable):
    """Options of ``cnnkit inspect``."""

    data_dir: str
    phash_distance: int = 6  # near-duplicates: at most this many of the 64 pHash bits differ
    output: str | None = None  # a folder for inspect.json, pairs.csv, inspect.html (and label_issues.*)
    force: bool = False  # overwrite them
    # A backbone (cnnkit.inference.backbone): a checkpoint's (with its preprocessing), or a
    # torchvision arch with weights (DEFAULT, a name, a file, none). Its features find
    # near-duplicates (whitened cosine >= similarity, cnnkit.data.similarity) and, with
    # label_issues, the images whose label looks wrong (k-fold heads on them, fed to cleanlab).
    checkpoint: str | None = None
    arch: str | None = None
    weights: str | None = None
    image_size: int | None = None  # with arch: the crop; None: the architecture's
    similarity: float | None = None  # None: DEFAULT_SIMILARITY
    cache_dir: str | None = None  # where the features are cached between runs; None: not kept
    label_issues: bool = False
    folds: int = 5  # fewer when a class has fewer readable images
    seed: int = 0  # the folds' shuffle
    category_names: str | None = None  # label → name for the summary, gallery and page
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check(bool(self.data_dir), "give DATA_DIR, a folder of class folders (or of train/, valid/, test/)")
        check(0 <= self.phash_distance <= 32,
               f"--phash-distance must be 0 to 32 (of the 64 bits; 0: identical hashes only), got {self.phash_distance}")
        check(self.output is None or bool(self.output), "--output must not be empty")
        check(self.cache_dir is None or bool(self.cache_dir), "--cache-dir must not be empty")
        check(self.has_backbone or (self.similarity is None and self.cache_dir is None),
               "--similarity and --cache-dir are for a backbone's features: add --checkpoint CKPT, or --arch "
               "ARCH and --weights W")
        check(self.similarity is None or 0 < self.similarity <= 1,
               f"--similarity must be above 0 and at most 1 (a cosine), got {self.similarity}")
        check(self.label_issues or self.category_names is None, "--category-names: only used with --label-issues; "
               "add it, or drop it")
        check(not self.label_issues or self.has_backbone,
               "--label-issues needs a backbone: --checkpoint CKPT, or --arch ARCH and --weights W "
               "(DEFAULT, a weights name, a .pth file, or none)")
        check(not (self.checkpoint and (self.arch or self.weights or self.image_size)),
               "--checkpoint brings its own backbone and preprocessing: drop --arch, --weights and --image-size")
        check(self.checkpoint is not None or bool(self.arch) == bool(self.weights),
               "--arch and --weights go together: the architecture, and DEFAULT, a weights name, a .pth file or none")
        check(self.checkpoint is not None or self.arch is not None or self.image_size is None,
               "--image-size is the crop of --arch's backbone: add --arch and --weights, or drop it")
        check(self.image_size is None or self.image_size >= 16, f"--image-size must be at least 16 pixels, got {self.image_size}")
        check(self.folds >= 2, f"--folds must be at least 2, got {self.folds}")
        check_common(self.batch_size, self.workers, self.device)

    @property
    def has_backbone(self) -> bool:
        return bool(self.checkpoint or self.arch or self.weights)

    @property
    def min_similarity(self) -> float:
        return DEFAULT_SIMILARITY if self.similarity is None else self.similarity
