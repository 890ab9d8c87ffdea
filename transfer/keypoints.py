"""Geometric verification of near-duplicate pairs: how many local features of two images match
under one similarity transform (shift, rotation, uniform scale), found with OpenCV's SIFT and
RANSAC.

The embeddings say two images look alike; two different photos of one species on similar
leaves can look as alike to them as a photo and its resized, re-encoded copy. Copies, crops
and shots of one scene moments apart share many keypoints in one geometric arrangement;
different scenes share almost none (docs/audit.md). Mirrored copies are matched too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# SIFT keypoints kept per image, the strongest. Measured on monkeys10 (docs/audit.md): 250, or
# images shrunk to 160 pixels first, lost copies that 500 at full size kept; 1,000 kept no more.
FEATURES = 500
# Smaller images have too few keypoints to tell: their pairs are left to the embeddings.
MIN_SIDE = 32
RATIO = 0.75  # Lowe's ratio test: a match must be clearly better than the second best
RANSAC_PIXELS = 3.0  # reprojection error within which a match agrees with the transform
# An image's keypoints: their (x, y) positions and SIFT descriptors (None where it has none).
Features = tuple[np.ndarray, np.ndarray | None]


class KeypointMatcher:
    """Counts matching keypoints between images given by index; each image is read and its
    keypoints computed once (``pixels(i)``: its uint8 ``(H, W, 3)`` pixels)."""

    def __init__(self, pixels: Callable[[int], np.ndarray]) -> None:
        import cv2

        cv2.setNumThreads(1)  # the same counts on every machine, and no oversubscription
        self._cv2 = cv2
        self._pixels = pixels
        self._sift = cv2.SIFT_create(nfeatures=FEATURES)
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._grey: dict[int, np.ndarray | None] = {}
        self._features: dict[tuple[int, bool], Features | None] = {}

    def matches_many(self, pairs: Sequence[tuple[int, int]], enough: int) -> list[int]:
        """``matches`` of each pair, computed on every core: OpenCV works without Python's
        lock, so threads share the work (each image's keypoints are the same either way)."""
        images = sorted({i for pair in pairs for i in pair})
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        with ThreadPoolExecutor(cores or os.cpu_count() or 1) as pool:
            list(pool.map(self._keypoints, images))
            return list(pool.map(lambda pair: self.matches(*pair, enough), pairs))

    def matches(self, first: int, second: int, enough: int) -> int:
        """Keypoints of ``first`` that match ``second`` (or its mirror image) under one
        similarity transform; the mirror is tried only when fewer than ``enough`` match. -1:
        an image is under ``MIN_SIDE`` pixels, too small to check."""
        features_a, features_b = self._keypoints(first), self._keypoints(second)
        if features_a is None or features_b is None:
            return -1
        found = self._inliers(features_a, features_b)
        if found < enough:
            found = max(found, self._inliers(features_a,
                                             self._keypoints(second, mirrored=True)))
        return found

    def _keypoints(self, i: int, mirrored: bool = False) -> Features | None:
        """Image ``i``'s keypoints (of its mirror image), None where it is too small."""
        if (i, mirrored) not in self._features:
            if i not in self._grey:
                pixels = self._pixels(i)
                self._grey[i] = None if min(pixels.shape[:2]) < MIN_SIDE else \
                    self._cv2.cvtColor(np.ascontiguousarray(pixels), self._cv2.COLOR_RGB2GRAY)
            grey = self._grey[i]
            if grey is None:
                self._features[i, mirrored] = None
            else:
                points, descriptors = self._sift.detectAndCompute(
                    np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey, None)
                self._features[i, mirrored] = (
                    np.float32([p.pt for p in points]).reshape(-1, 2), descriptors)
        return self._features[i, mirrored]

    def _inliers(self, first: Features, second: Features) -> int:
        (points_a, descriptors_a), (points_b, descriptors_b) = first, second
        if descriptors_a is None or descriptors_b is None or min(len(points_a),
                                                                 len(points_b)) < 2:
            return 0
        good = [best for best, second_best in (
            pair for pair in self._matcher.knnMatch(descriptors_a, descriptors_b, k=2)
            if len(pair) == 2) if best.distance < RATIO * second_best.distance]
        if len(good) < 3:
            return 0
        source = points_a[[m.queryIdx for m in good]]
        target = points_b[[m.trainIdx for m in good]]
        _, inliers = self._cv2.estimateAffinePartial2D(
            source, target, method=self._cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS)
        return 0 if inliers is None else int(inliers.sum())
