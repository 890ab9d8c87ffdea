"""Geometric verification of near-duplicate pairs: how many local features of two images match
under one similarity transform (shift, rotation, uniform scale), found with OpenCV's ORB, then
SIFT, and RANSAC.

The embeddings say two images look alike; two different photos of one species on similar
leaves can look as alike to them as a photo and its resized, re-encoded copy. Copies, crops
and shots of one scene moments apart share many keypoints in one geometric arrangement;
different scenes share almost none (docs/audit.md). Mirrored copies are matched too.

ORB's binary features take about a tenth of SIFT's time and confirm most copies; SIFT, which
finds every copy ORB finds and a few more, is computed only for the pairs ORB leaves below the
threshold. A pair's count is the most keypoints any of the tries matched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import write_json
from transfer.machine import cpu_model, usable_cores

log = logging.getLogger(__name__)

# SIFT keypoints kept per image, the strongest. Measured on monkeys10 (docs/audit.md): 250, or
# images shrunk to 160 pixels first, lost copies that 500 at full size kept; 1,000 kept no more.
FEATURES = 500
# ORB keypoints per image: with 1,000 ORB confirmed 138 of the 143 pairs SIFT confirms on
# monkeys10, and no pair of different scenes there or on catsdogs (docs/audit.md).
ORB_FEATURES = 1000
# Smaller images have too few keypoints to tell: their pairs are left to the embeddings.
MIN_SIDE = 32
RATIO = 0.75  # Lowe's ratio test: a match must be clearly better than the second best
RANSAC_PIXELS = 3.0  # reprojection error within which a match agrees with the transform
# An image's keypoints: their (x, y) positions and descriptors (None where it has none).
Features = tuple[np.ndarray, np.ndarray | None]
ORB, SIFT = 0, 1  # the detectors, in the order they are tried


class PairCache:
    """The counts ``KeypointMatcher.matches_many`` found before, for the next audit: one JSON
    file in ``folder`` (outside DVC's outputs, like the embedding store) per configuration
    (these settings, OpenCV's version, the processor), each pair keyed by its images' pixels as
    ``prepare`` stored them (``digests[i]``: image ``i``'s SHA-256) and the ``enough`` the
    mirror image was tried below. A damaged file is matched again, never trusted. Nothing is
    read before a count is asked for (an audit without the keypoint check reads nothing)."""

    def __init__(self, folder: Path, digests: Sequence[str]) -> None:
        self._folder = folder
        self._digests = digests
        self._added = False

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        import cv2

        return {"detectors": ["orb", "sift"], "orb_features": ORB_FEATURES,
                "features": FEATURES, "ratio": RATIO, "ransac_pixels": RANSAC_PIXELS,
                "min_side": MIN_SIDE, "opencv": cv2.__version__, "cpu": cpu_model()}

    @functools.cached_property
    def path(self) -> Path:
        name = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()
        return self._folder / f"{name[:32]}.json"

    @functools.cached_property
    def _counts(self) -> dict[str, int]:
        if not self.path.exists():
            return {}
        try:
            stored = json.loads(self.path.read_text(encoding="utf-8"))
            counts = stored["pairs"]
            if stored["config"] != self.config or not isinstance(counts, dict) or not all(
                    isinstance(key, str) and type(count) is int for key, count in counts.items()):
                raise ValueError("not the counts of this configuration")
            return counts
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            log.warning("%s is damaged (%s): its pairs are matched again", self.path, err)
            return {}

    def _key(self, pair: tuple[int, int], enough: int) -> str:
        return f"{self._digests[pair[0]]}:{self._digests[pair[1]]}:{enough}"

    def get(self, pair: tuple[int, int], enough: int) -> int | None:
        return self._counts.get(self._key(pair, enough))

    def put(self, pair: tuple[int, int], enough: int, count: int) -> None:
        self._counts[self._key(pair, enough)] = count
        self._added = True

    def save(self) -> None:
        """Write the counts, all at once (a concurrent audit's are replaced, not mixed in)."""
        if self._added:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"config": self.config, "pairs": dict(sorted(
                self._counts.items()))})
            self._added = False


class KeypointMatcher:
    """Counts matching keypoints between images given by index; each image is read once
    (``pixels(i)``: its uint8 ``(H, W, 3)`` pixels) and its keypoints computed once per
    detector it needs, and not at all for a pair the ``cache`` knows."""

    def __init__(self, pixels: Callable[[int], np.ndarray],
                 cache: PairCache | None = None) -> None:
        import cv2

        cv2.setNumThreads(1)  # the same counts on every machine, and no oversubscription
        self._cv2 = cv2
        self._pixels = pixels
        self._cache = cache
        self._detectors = {ORB: cv2.ORB_create(nfeatures=ORB_FEATURES),
                           SIFT: cv2.SIFT_create(nfeatures=FEATURES)}
        self._matchers = {ORB: cv2.BFMatcher(cv2.NORM_HAMMING), SIFT: cv2.BFMatcher(cv2.NORM_L2)}
        self._grey: dict[int, np.ndarray | None] = {}
        self._features: dict[tuple[int, bool, int], Features | None] = {}

    def matches_many(self, pairs: Sequence[tuple[int, int]], enough: int) -> list[int]:
        """``matches`` of each pair: from the cache where it has them, the others computed on
        every core (OpenCV works without Python's lock, so threads share the work; the counts
        are the same either way), a detector at a time, and added to it."""
        cache = self._cache
        counts = [cache.get(pair, enough) if cache else None for pair in pairs]
        todo = [n for n, count in enumerate(counts) if count is None]
        found = dict.fromkeys(todo, 0)
        with ThreadPoolExecutor(usable_cores()) as pool:
            for detector in self._detectors:
                left = [n for n in todo if 0 <= found[n] < enough]
                images = sorted({i for n in left for i in pairs[n]})
                list(pool.map(lambda i, d=detector: self._keypoints(i, False, d), images))
                for n, count in zip(left, pool.map(
                        lambda n, d=detector: self._tried(d, *pairs[n], enough), left),
                        strict=True):
                    found[n] = count if count < 0 else max(found[n], count)
        for n in todo:
            counts[n] = found[n]
            if cache:
                cache.put(pairs[n], enough, found[n])
        if cache and todo:
            cache.save()
        return counts

    def matches(self, first: int, second: int, enough: int) -> int:
        """Keypoints of ``first`` that match ``second`` (or its mirror image) under one
        similarity transform: ORB's, then SIFT's where ORB's are fewer than ``enough`` (the
        most either matched); the mirror image is tried only when fewer than ``enough`` match
        directly. -1: an image is under ``MIN_SIDE`` pixels, too small to check."""
        return self.matches_many([(first, second)], enough)[0]

    def _tried(self, detector: int, first: int, second: int, enough: int) -> int:
        """The keypoints ``detector`` matches between ``first`` and ``second``, or its mirror
        image where fewer than ``enough`` match directly (the larger count); -1 where an image
        is too small."""
        features_a = self._keypoints(first, False, detector)
        features_b = self._keypoints(second, False, detector)
        if features_a is None or features_b is None:
            return -1
        found = self._inliers(detector, features_a, features_b)
        if found < enough:
            found = max(found, self._inliers(detector, features_a,
                                             self._keypoints(second, True, detector)))
        return found

    def _keypoints(self, i: int, mirrored: bool, detector: int) -> Features | None:
        """Image ``i``'s keypoints (of its mirror image) by ``detector``, None where it is too
        small."""
        if (i, mirrored, detector) not in self._features:
            if i not in self._grey:
                pixels = self._pixels(i)
                self._grey[i] = None if min(pixels.shape[:2]) < MIN_SIDE else \
                    self._cv2.cvtColor(np.ascontiguousarray(pixels), self._cv2.COLOR_RGB2GRAY)
            grey = self._grey[i]
            if grey is None:
                self._features[i, mirrored, detector] = None
            else:
                points, descriptors = self._detectors[detector].detectAndCompute(
                    np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey, None)
                self._features[i, mirrored, detector] = (
                    np.float32([p.pt for p in points]).reshape(-1, 2), descriptors)
        return self._features[i, mirrored, detector]

    def _inliers(self, detector: int, first: Features, second: Features) -> int:
        (points_a, descriptors_a), (points_b, descriptors_b) = first, second
        if descriptors_a is None or descriptors_b is None or min(len(points_a),
                                                                 len(points_b)) < 2:
            return 0
        good = [best for best, second_best in (
            pair for pair in self._matchers[detector].knnMatch(descriptors_a, descriptors_b,
                                                               k=2)
            if len(pair) == 2) if best.distance < RATIO * second_best.distance]
        if len(good) < 3:
            return 0
        source = points_a[[m.queryIdx for m in good]]
        target = points_b[[m.trainIdx for m in good]]
        _, inliers = self._cv2.estimateAffinePartial2D(
            source, target, method=self._cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS)
        return 0 if inliers is None else int(inliers.sum())
