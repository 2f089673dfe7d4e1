"""cnnkit.data.similarity: whitening makes a near-copy stand out among pictures of its class that
raw cosine cannot tell apart, and the pair search is the brute force's."""

from __future__ import annotations

import numpy as np

from cnnkit.data.similarity import cosine_pairs, whiten


def class_features(seed: int = 0, classes: int = 5, per_class: int = 80, dim: int = 256, shared: int = 4,
                   copy_of: int | None = None) -> np.ndarray:
    """Features as a classifier's look: a strong direction of the picture's class, a few strong
    directions every picture varies along (light, scale, framing: what a crop changes), and a
    weak part that is the picture's own. ``copy_of``: one more row, that picture with its own
    part and class kept and its shared directions moved further than pictures of a class differ
    in them (a cropped copy: another scale and framing)."""
    rng = np.random.default_rng(seed)
    means = np.repeat(rng.random((classes, dim)) * 10, per_class, axis=0)
    factors = rng.normal(0, 1, (shared, dim))
    own = rng.normal(0, 0.3, (classes * per_class, dim))
    shares = rng.normal(0, 1, (classes * per_class, shared))
    features = means + shares @ factors + own
    if copy_of is None:
        return features
    copy = means[copy_of] + (shares[copy_of] + rng.normal(0, 2, shared)) @ factors + own[copy_of]
    return np.vstack([features, copy])


def test_whitening_separates_a_near_copy_that_raw_cosine_does_not():
    features = class_features(copy_of=3)
    raw = features / np.linalg.norm(features, axis=1, keepdims=True)
    raw_sim = raw @ raw.T
    others = np.delete(raw_sim[3], [3, len(features) - 1])
    assert (others > raw_sim[3, -1]).sum() >= 5  # raw: other pictures of the class are closer than the copy

    unit = whiten(features)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1, rtol=1e-5)
    pairs = list(cosine_pairs(unit, 0.9))
    assert [(i, j) for i, j, _ in pairs] == [(3, len(features) - 1)]


def test_fewer_images_than_dimensions_stay_finite_and_a_lone_image_has_no_pair():
    features = class_features(classes=2, per_class=10, dim=128)  # 20 images, 128 dimensions
    unit = whiten(features)
    assert np.isfinite(unit).all() and unit.shape == features.shape
    assert list(cosine_pairs(whiten(features[:1]), 0.5)) == []
    twins = whiten(np.vstack([features, features[:1]]))  # an exact copy: cosine 1 after any linear map
    assert [(i, j) for i, j, _ in cosine_pairs(twins, 0.999)] == [(0, 20)]


def test_cosine_pairs_are_those_of_the_brute_force():
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(300, 8)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    found = {(i, j) for i, j, _ in cosine_pairs(unit, 0.8, block=64)}  # several blocks
    similarity = unit @ unit.T
    expected = {(i, j) for i in range(300) for j in range(i + 1, 300) if similarity[i, j] >= 0.8}
    assert found == expected and len(expected) >= 20
