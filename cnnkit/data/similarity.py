"""Near-duplicate images by the similarity of their backbone features.

A classifier's pooled penultimate features make poor duplicate detectors as they are: every
picture of a class points the same way (on flowers-20, thousands of pairs of different photos
have a cosine above 0.99, the same as a cropped copy's). Whitening them first, as image
retrieval does (Jégou & Chum, ECCV 2012: PCA-whitening), divides out the directions the whole
data set varies along together, so that what is left to agree is what makes a picture that
picture. The eigenvalues get a small ridge (a share of their mean) so that a data set with fewer
images than feature dimensions does not blow its smallest directions up into noise.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

RIDGE = 0.01  # of the mean eigenvalue: flowers-20's cropped copies score >= 0.947, other photos <= 0.925


def whiten(features: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """(N, D) -> (N, D) unit rows: centred, rotated onto the features' principal axes, each axis
    scaled by 1 / sqrt(its variance + ridge x the mean variance)."""
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    variances, axes = np.linalg.eigh(x.T @ x / max(1, len(x)))
    variances = np.clip(variances, 0.0, None)
    white = (x @ axes) / np.sqrt(variances + ridge * max(float(variances.mean()), 1e-12))
    norms = np.linalg.norm(white, axis=1, keepdims=True)
    return (white / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def cosine_pairs(unit: np.ndarray, threshold: float, block: int = 1024) -> Iterator[tuple[int, int, float]]:
    """``(i, j, cosine)`` for every i < j of ``unit`` rows (unit vectors) whose cosine is at least
    ``threshold``; ``block`` rows at a time (memory: block x N x 4 bytes)."""
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows, cols = np.nonzero(similarity >= threshold)
        for row, col in zip(rows.tolist(), cols.tolist()):
            if col > start + row:
                yield start + row, col, float(similarity[row, col])
