"""The data audit on the cached embeddings: likely label errors, near-duplicates and outliers.

Label issues are found by confident learning (cleanlab) on out-of-fold probabilities of a
linear probe fitted by cross-validation over every labelled image. Near-duplicates and
outliers come from one pass over the cosine similarities of the centred, normalised
embeddings, a block of rows at a time, so memory grows with the number of images, never with
its square. ``Familiarity`` keeps what ``predict`` needs to say that a new image is unlike
every training image.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transfer.artifacts import load_arrays, save_arrays
from transfer.embeddings import EmbeddingMeta, read_rows
from transfer.errors import PipelineError, counted
from transfer.keypoints import KeypointMatcher, PairCache
from transfer.layout import (
    AUDIT_FINDINGS,
    AUDIT_PICTURE,
    AUDIT_REPORT,
    EXCLUDE_FILE,
    RELABEL_FILE,
)
from transfer.machine import usable_cores

log = logging.getLogger(__name__)

# Rows of the similarity matrix computed at a time: ROWS x (number of images) float32 values,
# 51 MB at 50,000 images.
ROWS = 256
# Training images kept as the reference that new images are compared with (a sample, by
# content id, of larger training splits): 5,000 x 1,280 float16 values are 13 MB.
MAX_REFERENCE = 5000


@dataclass(frozen=True)
class AuditImages:
    """Every labelled image of the embedding cache in one table: train, then val, then test."""

    features: np.ndarray     # (n, dim) float32
    labels: np.ndarray       # (n,) class indices
    splits: np.ndarray       # (n,) split names
    paths: np.ndarray        # (n,) the prepared store's ids: paths relative to the source
    content_ids: np.ndarray  # (n,) content-based ids (transfer.data.content_id)

    @classmethod
    def gather(cls, parts: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
               ) -> AuditImages:
        """One table from per-split ``(split, features, labels, paths, content ids)``."""
        return cls(
            features=np.concatenate([read_rows(features, slice(None), np.float32)
                                     for _, features, _, _, _ in parts]),
            labels=np.concatenate([labels for _, _, labels, _, _ in parts]).astype(np.int64),
            splits=np.concatenate([np.full(len(labels), split)
                                   for split, _, labels, _, _ in parts]),
            paths=np.concatenate([paths.astype(str) for _, _, _, paths, _ in parts]),
            content_ids=np.concatenate([ids.astype(str) for _, _, _, _, ids in parts]))

    @property
    def train(self) -> np.ndarray:
        return self.splits == "train"


# Label issues


def usable_folds(labels: np.ndarray, folds: int) -> int:
    """``folds``, lowered to the size of the smallest class (each fold holds out one image of
    every class at least); 0 where that leaves fewer than 2."""
    smallest = int(np.bincount(labels)[np.unique(labels)].min()) if len(labels) else 0
    n = min(folds, smallest)
    return n if n >= 2 else 0


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int,
                              folds: int, C: float, seed: int) -> np.ndarray:
    """Each image's class probabilities from a logistic regression that never saw it:
    stratified ``folds``-fold cross-validation on standardized features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X = StandardScaler().fit_transform(features).astype(np.float32)
    probabilities = np.zeros((len(labels), n_classes))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    def fit(rows: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fit_rows, held_out = rows
        # OpenMP's thread count is each thread's own: one here too (older scikit-learn).
        with threadpool_limits(limits=1, user_api="openmp"):
            model = LogisticRegression(C=C, max_iter=1000).fit(X[fit_rows], labels[fit_rows])
        return held_out, model.classes_, model.predict_proba(X[held_out])

    # Each fit on one thread, as many fits at a time as there are cores: the same numbers as
    # one after the other. BLAS or OpenMP on two threads within a fit ran slower on 1,300
    # images, and scikit-learn's OpenMP loss 30-70x slower on a busy machine (docs/audit.md).
    with threadpool_limits(limits=1), \
            ThreadPoolExecutor(min(folds, usable_cores())) as pool:
        for held_out, classes, fold in pool.map(fit, splitter.split(X, labels)):
            probabilities[np.ix_(held_out, classes)] = fold
    return probabilities


def label_issues(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The images confident learning flags as likely mislabelled, most likely first, and every
    image's label quality (the out-of-fold probability of its given label: low is suspect)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    # cleanlab wants the classes numbered 0..k-1, each present: renumber the present ones.
    present = np.unique(labels)
    renumbered = np.searchsorted(present, labels)
    columns = probabilities[:, present]
    columns = columns / columns.sum(axis=1, keepdims=True)
    ranked = find_label_issues(renumbered, columns, return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(renumbered, columns, method="self_confidence")
    return np.asarray(ranked, dtype=np.int64), np.asarray(quality)


# Similarities


def power_normalised(features: np.ndarray) -> np.ndarray:
    """The signed square root of each value (float32): a few large activations no longer
    outweigh the many small ones in a cosine similarity (as for Fisher vectors)."""
    rows = np.asarray(features, dtype=np.float32)
    return np.sign(rows) * np.sqrt(np.abs(rows))


def unit_rows(features: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``features`` power-normalised, minus ``centre`` (the mean of the power-normalised
    training rows), each row scaled to length 1 (float32)."""
    rows = power_normalised(features) - centre.astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, np.float32(1e-12))


def training_centre(images: AuditImages) -> np.ndarray:
    return power_normalised(images.features[images.train]).mean(axis=0)


def mean_top_distance(similarities: np.ndarray, k: int) -> np.ndarray:
    """Per row, the mean cosine distance of its ``k`` largest similarities."""
    k = max(1, min(k, similarities.shape[1]))
    top = np.partition(similarities, similarities.shape[1] - k, axis=1)[:, -k:]
    return 1.0 - top.mean(axis=1, dtype=np.float64)


@dataclass
class Pairs:
    """The near-duplicate pairs that matter most (at most ``limit``, None: all; those across
    splits or labels first, then by margin), and counts of all of them."""

    limit: int | None
    first: np.ndarray
    second: np.ndarray
    similarity: np.ndarray
    margin: np.ndarray
    flagged: np.ndarray
    keypoints: np.ndarray  # matching keypoints of each pair (-1: not checked)
    total: int = 0
    across_splits: int = 0
    across_labels: int = 0
    ruled_out: int = 0  # candidate pairs whose keypoints did not match (not in ``total``)

    @classmethod
    def empty(cls, limit: int | None) -> Pairs:
        return cls(limit, np.empty(0, np.int64), np.empty(0, np.int64),
                   np.empty(0, np.float32), np.empty(0, np.float32), np.empty(0, bool),
                   np.empty(0, np.int64))

    def add(self, first: np.ndarray, second: np.ndarray, similarity: np.ndarray,
            margin: np.ndarray, splits: np.ndarray, labels: np.ndarray,
            keypoints: np.ndarray) -> None:
        leak = splits[first] != splits[second]
        clash = labels[first] != labels[second]
        self.total += len(first)
        self.across_splits += int(leak.sum())
        self.across_labels += int(clash.sum())
        first, second = np.concatenate([self.first, first]), np.concatenate([self.second, second])
        similarity = np.concatenate([self.similarity, similarity])
        margin = np.concatenate([self.margin, margin])
        flagged = np.concatenate([self.flagged, leak | clash])
        keypoints = np.concatenate([self.keypoints, keypoints])
        keep = np.lexsort((second, first, -margin, ~flagged))[:self.limit]
        self.first, self.second = first[keep], second[keep]
        self.similarity, self.margin, self.flagged = similarity[keep], margin[keep], flagged[keep]
        self.keypoints = keypoints[keep]


# Beside the most similar image, the next NEAR ones tell how similar an image's neighbourhood
# typically is: a near-duplicate stands out from it, a crowded class does not.
NEAR = 5
# Whatever the margin, a less similar pair is not a near-duplicate: in a small or varied set
# the neighbourhood's similarity is low enough for merely alike images to stand out. The
# planted copies of docs/audit.md scored 0.69 and more.
MIN_SIMILARITY = 0.6
# How many of each image's most similar images are searched for its k most similar training
# images, in multiples of k (docs/audit.md#at-scale).
WIDER = 4
# Below the floor a pair's similarity must reach for it to be kept as a candidate: more than
# the float32 rounding of the margin's arithmetic, so that no listed pair is missed.
CANDIDATE_SLACK = np.float32(1e-6)
# A row of a block with more than this share of its values above what its image keeps is
# searched whole for its largest; one with fewer has just those gathered.
GATHER_SHARE = 8


class Nearest:
    """Each image's ``wide`` largest similarities met so far, with the images they are to,
    merged as blocks of the similarity matrix come."""

    def __init__(self, n: int, wide: int):
        self.wide = wide
        self.similarity = np.full((n, wide), -np.inf, np.float32)
        self.column = np.full((n, wide), -1, np.int64)
        self.floor = np.full(n, -np.inf, np.float32)  # the smallest kept: no less enters

    def meet(self, images: np.ndarray, similarities: np.ndarray, first_column: int) -> None:
        """Images ``images`` meet images ``first_column``, ``first_column + 1``, ...: row i of
        ``similarities`` holds ``images[i]``'s similarity to each. Only values above what an
        image keeps are taken: past the first blocks, a few per image, gathered one by one;
        where more than ``wide`` and more than an eighth of the row
        (``GATHER_SHARE``; the first blocks), the row's ``wide`` largest by partitioning it."""
        above = similarities > self.floor[images][:, None]
        counts = above.sum(axis=1)
        many = counts > max(self.wide, similarities.shape[1] // GATHER_SHARE)
        if many.any():
            top, columns = largest(similarities[many], self.wide)
            self._merge(images[many], top, columns + first_column)
        few = (counts > 0) & ~many
        if few.any():
            above[many] = False
            row, column = positions(above)
            taken = counts[few]
            slot = np.arange(len(row)) - np.repeat(np.cumsum(taken) - taken, taken)
            at = np.repeat(np.arange(len(taken)), taken)
            top = np.full((len(taken), int(taken.max())), -np.inf, np.float32)
            columns = np.full(top.shape, -1, np.int64)
            top[at, slot] = similarities[row, column]
            columns[at, slot] = column + first_column
            self._merge(images[few], top, columns)

    def _merge(self, images: np.ndarray, similarity: np.ndarray, column: np.ndarray) -> None:
        values = np.concatenate([self.similarity[images], similarity], axis=1)
        columns = np.concatenate([self.column[images], column], axis=1)
        keep = np.argpartition(values, values.shape[1] - self.wide, axis=1)[:, -self.wide:]
        self.similarity[images] = np.take_along_axis(values, keep, axis=1)
        self.column[images] = np.take_along_axis(columns, keep, axis=1)
        self.floor[images] = self.similarity[images].min(axis=1)


def positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of a sparse 2-d ``mask``'s true values, row by row, as
    ``np.nonzero`` gives them, but read in the mask's own memory order (a block's later images
    meet it through a transposed view): a tenth of ``np.nonzero``'s time on a block."""
    if mask.flags.c_contiguous or not mask.flags.f_contiguous:
        return np.divmod(np.flatnonzero(mask), mask.shape[1])
    column, row = np.divmod(np.flatnonzero(mask.T), mask.shape[0])
    order = np.argsort(row, kind="stable")
    return row[order], column[order]


def largest(similarities: np.ndarray, wide: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``wide`` largest values (all of them where it has no more) and their
    columns."""
    m = similarities.shape[1]
    if m <= wide:
        return similarities, np.broadcast_to(np.arange(m), similarities.shape)
    columns = np.argpartition(similarities, m - wide, axis=1)[:, -wide:]
    return np.take_along_axis(similarities, columns, axis=1), columns


def scan(unit: np.ndarray, splits: np.ndarray, labels: np.ndarray, min_margin: float, k: int,
         limit: int | None, rows: int = ROWS, matcher: KeypointMatcher | None = None,
         min_keypoints: int = 0) -> tuple[Pairs, np.ndarray]:
    """Near-duplicate pairs and each image's outlier score, in one pass over the cosine
    similarities of ``unit`` rows, a block of ``rows`` at a time.

    A pair is listed when its similarity exceeds the mean of the two images' typical
    neighbour similarity (their 2nd to (NEAR+1)th most similar images) by ``min_margin`` or
    more, and is at least ``MIN_SIMILARITY``; and, with a ``matcher``, when at least
    ``min_keypoints`` of their keypoints match in one geometric arrangement (or the images are
    too small to tell). The outlier score
    is the mean cosine distance to the ``k`` most similar training images (not the image
    itself).
    """
    n = len(unit)
    train = splits == "train"
    k = max(1, min(k, int(train.sum()) - 1))  # as mean_top_distance counts them
    typical, scores = np.zeros(n, dtype=np.float32), np.empty(n)
    near = min(NEAR + 1, n - 1)
    # Each image's most similar images: the typical similarity is the mean of the 2nd to
    # (NEAR+1)th, and the k most similar training images, for the outlier score, are nearly
    # always among the first WIDER * k (where not, the image searches every training image).
    wide = min(n - 1, max(near, WIDER * k))
    blocks = range(0, n if wide >= 1 else 0, rows)
    nearest = Nearest(n, max(wide, 1))
    # The matrix is symmetric: each block of rows is multiplied with itself and the images
    # after it only, and what it holds for those later images is offered to them too.
    for start in blocks:
        end = min(start + rows, n)
        block = unit[start:end] @ unit[start:].T
        block[np.arange(end - start), np.arange(end - start)] = -np.inf
        nearest.meet(np.arange(start, end), block, start)
        nearest.meet(np.arange(end, n), block[:, end - start:].T, start)
    # The mean of two typical similarities is at least the smaller one, so a listed pair is
    # min_margin above the typical similarity of one of its images, and is among that image's
    # NEAR most similar (the (NEAR+1)th is not above the typical similarity): each image
    # offers those of its top similarities that are that high (CANDIDATE_SLACK: whatever
    # float32 rounding), and the pairs are decided once every typical similarity is known.
    found = []
    for start in blocks:
        block = np.arange(start, min(start + rows, n))
        top, columns = nearest.similarity[block], nearest.column[block]
        if near >= 2:
            typical[block] = np.sort(top, axis=1)[:, -near:-1].mean(axis=1)
        floor = np.maximum(typical[block] + np.float32(min_margin), np.float32(MIN_SIMILARITY))
        row, rank = np.nonzero(top >= floor[:, None] - CANDIDATE_SLACK)
        found.append((block[row], columns[row, rank], top[row, rank]))
        top_train = np.where(train[columns], top, -np.inf)
        within = (top_train > -np.inf).sum(axis=1) >= k
        scores[block[within]] = mean_top_distance(top_train[within], k)
        beyond = block[~within]
        if len(beyond):
            similarities = unit[beyond] @ unit.T
            similarities[np.arange(len(beyond)), beyond] = -np.inf
            scores[beyond] = mean_top_distance(similarities[:, train], k)
    first, second, similarity, margin = listed_pairs(
        *(np.concatenate(part) for part in zip(*found, strict=True)), typical, min_margin) \
        if found else (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32),
                       np.empty(0, np.float32))
    keypoints = np.full(len(first), -1, np.int64)
    ruled_out = 0
    if matcher is not None and len(first):
        keypoints = np.array(matcher.matches_many(
            list(zip(first.tolist(), second.tolist(), strict=True)), min_keypoints),
            np.int64).reshape(-1)
        confirmed = (keypoints >= min_keypoints) | (keypoints < 0)  # < 0: too small to tell
        ruled_out = int((~confirmed).sum())
        first, second, similarity = first[confirmed], second[confirmed], similarity[confirmed]
        margin, keypoints = margin[confirmed], keypoints[confirmed]
    pairs = Pairs.empty(limit)
    pairs.ruled_out = ruled_out
    pairs.add(first, second, similarity, margin, splits, labels, keypoints)
    return pairs, scores


def listed_pairs(rows: np.ndarray, columns: np.ndarray, similarities: np.ndarray,
                 typical: np.ndarray, min_margin: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs among the similarities kept by ``scan`` (image ``rows[i]`` to
    ``columns[i]``) whose margin over their images' ``typical`` similarity is at least
    ``min_margin``: each pair once, the first image the one with the lower index, with the
    similarity the first image kept where it kept the pair (else the one the second kept: the
    same value, unless both images are in one block), and the margin, in order of the first,
    then the second image."""
    first, second = np.minimum(rows, columns), np.maximum(rows, columns)
    own_side = rows == first  # found from the first image's row: preferred
    order = np.lexsort((~own_side, second, first))
    first, second, similarities = first[order], second[order], similarities[order]
    once = np.ones(len(first), bool)
    once[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    first, second, similarities = first[once], second[once], similarities[once]
    margin = similarities - (typical[first] + typical[second]) / 2
    listed = margin >= min_margin
    return first[listed], second[listed], similarities[listed], margin[listed]


# Familiarity: is a new image like the training images?


@dataclass(frozen=True)
class Familiarity:
    """Training images as unit rows, and the distance beyond which a new image is unfamiliar:
    the ``percentile`` of the validation images' distances to them."""

    centre: np.ndarray
    reference: np.ndarray
    k: int
    percentile: float
    threshold: float
    embeddings: dict[str, Any]  # what the embeddings came from: only those can be compared

    @functools.cached_property
    def _reference_rows(self) -> np.ndarray:
        """``reference`` (stored as float16) as float32, converted once, not per batch."""
        return self.reference.astype(np.float32)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mean cosine distance of each row to its ``k`` most similar training images."""
        unit = unit_rows(features, self.centre)
        reference = self._reference_rows
        return np.concatenate([np.empty(0)] + [
            mean_top_distance(unit[s:s + ROWS] @ reference.T, self.k)
            for s in range(0, len(unit), ROWS)])

    def unfamiliar(self, features: np.ndarray) -> np.ndarray:
        return self.distances(features) > self.threshold

    def save(self, path: str | Path) -> None:
        save_arrays(path, centre=self.centre, reference=self.reference, k=np.int64(self.k),
                    percentile=np.float64(self.percentile),
                    threshold=np.float64(self.threshold),
                    embeddings=np.str_(json.dumps(self.embeddings, sort_keys=True)))

    @classmethod
    def load(cls, path: str | Path) -> Familiarity:
        arrays = load_arrays(path)
        try:
            centre, reference = arrays["centre"], arrays["reference"]
            familiarity = cls(centre, reference, int(arrays["k"]), float(arrays["percentile"]),
                              float(arrays["threshold"]), json.loads(str(arrays["embeddings"])))
        except (KeyError, TypeError, ValueError) as err:
            raise PipelineError(f"{path}: not a familiarity reference ({err}); re-run: dvc "
                                "repro audit") from err
        if reference.ndim != 2 or centre.shape != (reference.shape[1],) or \
                not isinstance(familiarity.embeddings, dict) or \
                familiarity.embeddings.get("dim") != reference.shape[1] or \
                not 1 <= familiarity.k <= len(reference) or \
                not math.isfinite(familiarity.threshold):
            raise PipelineError(f"{path}: arrays of the wrong shape or values; re-run: dvc "
                                "repro audit")
        return familiarity

    def matches(self, meta: EmbeddingMeta) -> bool:
        """Whether new images embedded as ``meta`` says can be compared with this reference."""
        return self.embeddings == embeddings_identity(meta)


def embeddings_identity(meta: EmbeddingMeta) -> dict[str, Any]:
    """What makes two embeddings comparable: the same network, weights and preprocessing."""
    return {"backbone": meta.backbone, "weights_sha256": meta.weights_sha256,
            "preprocessing": meta.preprocessing, "flip_average": meta.flip_average,
            "dim": meta.dim}


def conformal_threshold(distances: np.ndarray, percentile: float) -> float:
    """The distance beyond which at most ``100 - percentile`` percent of new images drawn like
    those of ``distances`` lie, on average over such draws: the ⌈(n + 1) p⌉-th smallest of the
    n distances (split conformal prediction: Vovk et al. 2005; Angelopoulos and Bates 2021,
    "A gentle introduction to conformal prediction"), the largest where n is too small for
    that. ``np.percentile`` interpolates between the largest few and lets through up to twice
    as many (1.9% at n = 100, p = 99)."""
    n = len(distances)
    rank = min(n, math.ceil((n + 1) * percentile / 100))
    return float(np.sort(distances)[rank - 1])


def fit_familiarity(images: AuditImages, centre: np.ndarray, k: int, percentile: float,
                    meta: EmbeddingMeta) -> Familiarity:
    """The training images (a sample of ``MAX_REFERENCE`` by content id where there are more)
    and the distance to them beyond which at most ``100 - percentile`` percent of images like
    the validation images lie (``prepare`` leaves no split empty)."""
    train = np.flatnonzero(images.train)
    if len(train) > MAX_REFERENCE:
        train = train[np.argsort(images.content_ids[train], kind="stable")[:MAX_REFERENCE]]
    unfitted = Familiarity(centre.astype(np.float32),
                           unit_rows(images.features[train], centre).astype(np.float16),
                           max(1, min(k, len(train))), percentile, np.inf,
                           embeddings_identity(meta))
    distances = unfitted.distances(images.features[images.splits == "val"])
    return dataclasses.replace(unfitted, threshold=conformal_threshold(distances, percentile))


# The whole audit


@dataclass(frozen=True)
class AuditSettings:
    """What ``audit.*`` in params.yaml sets (see ``transfer.params.AuditParams``)."""

    folds: int
    C: float
    duplicate_margin: float
    neighbours: int
    unfamiliar_percentile: float
    max_listed: int
    duplicate_keypoints: int = 0


@dataclass(frozen=True)
class Audit:
    """What the audit found: ``findings``, every one of each kind (the label issues, the
    near-duplicate pairs and the images beyond the unfamiliar distance, strongest first: what
    ``python -m stages.curate`` reads); ``report``, ``reports/audit.json``'s content, the same
    with ``audit.max_listed`` of each list (the outliers then the farthest images, beyond the
    distance or not); and the familiarity reference for ``predict``."""

    report: dict[str, Any]
    findings: dict[str, Any]
    familiarity: Familiarity


def run_audit(images: AuditImages, classes: Sequence[str], settings: AuditSettings,
              seed: int, meta: EmbeddingMeta,
              pixels: Callable[[int], np.ndarray] | None = None,
              pair_cache: PairCache | None = None) -> Audit:
    """Audit ``images``; ``pixels(i)``: image ``i``'s pixels, for the keypoints that confirm a
    near-duplicate pair (``settings.duplicate_keypoints``; none checked without it), with the
    counts of pairs checked before in ``pair_cache``."""
    def image(i: int) -> dict[str, str]:
        return {"id": str(images.content_ids[i]), "path": str(images.paths[i]),
                "split": str(images.splits[i])}

    folds = usable_folds(images.labels, settings.folds)
    issues: list[dict[str, Any]] = []
    flagged: int | None = None  # not searched
    present, sizes = np.unique(images.labels, return_counts=True)
    smallest = (classes[int(present[np.argmin(sizes)])], int(sizes.min())) if len(sizes) else None
    not_searched = None
    if 0 < folds < settings.folds:
        log.warning("audit.folds: %d folds instead of %d: class '%s' has %d images", folds,
                    settings.folds, *smallest)
    if folds:
        probabilities = out_of_fold_probabilities(images.features, images.labels, len(classes),
                                                  folds, settings.C, seed)
        ranked, quality = label_issues(images.labels, probabilities)
        flagged = len(ranked)
        issues = [{**image(i), "given": classes[images.labels[i]],
                   "suggested": classes[int(np.argmax(probabilities[i]))],
                   "score": round(float(quality[i]), 4)}
                  for i in ranked]
    else:
        not_searched = (f"class '{smallest[0]}' has {counted(smallest[1], 'image')}, and "
                        "cross-validation needs at least two of each") if smallest else \
            "no labelled images"
        log.warning("label issues not searched: %s", not_searched)

    centre = training_centre(images)
    matcher = KeypointMatcher(pixels, pair_cache) \
        if pixels is not None and settings.duplicate_keypoints > 0 else None
    pairs, scores = scan(unit_rows(images.features, centre), images.splits, images.labels,
                         settings.duplicate_margin, settings.neighbours, None,
                         matcher=matcher, min_keypoints=settings.duplicate_keypoints)
    familiarity = fit_familiarity(images, centre, settings.neighbours,
                                  settings.unfamiliar_percentile, meta)
    farthest = np.argsort(-scores, kind="stable")
    unfamiliar = int((scores > familiarity.threshold).sum())

    def outliers(ranked: np.ndarray) -> list[dict[str, Any]]:
        return [{**image(i), "label": classes[images.labels[i]],
                 "score": round(float(scores[i]), 4)} for i in ranked]

    findings = {
        "counts": {
            "images": len(images.labels),
            "label_issues": flagged,
            "near_duplicate_pairs": pairs.total,
            "near_duplicates_across_splits": pairs.across_splits,
            "near_duplicates_across_labels": pairs.across_labels,
            "near_duplicates_ruled_out_by_keypoints": pairs.ruled_out if matcher else None,
            "unfamiliar": unfamiliar,
        },
        "settings": {"folds": folds, "label_issues_not_searched": not_searched,
                     "C": settings.C,
                     "duplicate_margin": settings.duplicate_margin,
                     "duplicate_keypoints": settings.duplicate_keypoints if matcher else 0,
                     "neighbours": familiarity.k,
                     "unfamiliar_percentile": settings.unfamiliar_percentile,
                     "unfamiliar_distance": round(familiarity.threshold, 6),
                     "max_listed": settings.max_listed},
        "label_issues": issues,
        "near_duplicates": [
            {"a": str(images.paths[a]), "b": str(images.paths[b]),
             "ids": [str(images.content_ids[a]), str(images.content_ids[b])],
             "similarity": round(float(s), 4), "margin": round(float(m), 4),
             "keypoints": int(kp) if kp >= 0 else None,
             "splits": [str(images.splits[a]), str(images.splits[b])],
             "labels": [classes[images.labels[a]], classes[images.labels[b]]]}
            for a, b, s, m, kp in zip(pairs.first, pairs.second, pairs.similarity, pairs.margin,
                                      pairs.keypoints, strict=True)],
        "outliers": outliers(farthest[:unfamiliar]),
    }
    listed = settings.max_listed
    report = {**findings, "label_issues": issues[:listed],
              "near_duplicates": findings["near_duplicates"][:listed],
              "outliers": outliers(farthest[:listed])}
    return Audit(report, findings, familiarity)


def summary_section(report: dict[str, Any], exclude: str = EXCLUDE_FILE.as_posix(),
                    relabel: str = RELABEL_FILE.as_posix()) -> str:
    """The audit's few lines in ``reports/summary.md``, naming the curation files
    (``data.exclude``, ``data.relabel``) that act on it."""
    counts, settings = report["counts"], report["settings"]
    lines = ["", "## Data audit", "",
             f"- {counts['label_issues']} of {counts['images']} images look mislabelled "
             f"(confident learning on {settings['folds']}-fold out-of-fold probabilities)."
             if counts["label_issues"] is not None else
             f"- **Labels not checked**: {settings['label_issues_not_searched']}."]
    if report["label_issues"]:
        top = report["label_issues"][0]
        lines[-1] = lines[-1][:-1] + f"; the most likely: `{top['path']}`, filed as " \
            f"{top['given']}, looks like {top['suggested']}."
    ruled_out = counts.get("near_duplicates_ruled_out_by_keypoints")  # None: check off
    keypoints = f"; {counted(ruled_out, 'look-alike pair')} left out, fewer than " \
        f"{settings['duplicate_keypoints']} of their keypoints matching" if ruled_out else ""
    lines += [f"- {counts['near_duplicate_pairs']} near-duplicate pairs (similarity "
              f"{settings['duplicate_margin']} or more above their neighbourhood's{keypoints}): "
              f"{counts['near_duplicates_across_splits']} "
              f"across splits (leakage), {counts['near_duplicates_across_labels']} across labels.",
              f"- {counts['unfamiliar']} images are farther from the training images than "
              f"{settings['unfamiliar_percentile']:g}% of validation images.",
              f"- Details: `{AUDIT_REPORT}`; the suspects: `{AUDIT_PICTURE}`. Act on them with "
              f"`{exclude}` and `{relabel}`: `python -m stages.curate leaks` "
              "(or `labels`, `outliers`) previews the lines, `--apply` appends them (see "
              "docs/audit.md)."]
    cut = [f"{len(report[key])} of the {counts[count]} {what}" for key, count, what in (
        ("label_issues", "label_issues", "likely mislabelled images"),
        ("near_duplicates", "near_duplicate_pairs",
         "near-duplicate pairs (those across splits or labels first)"))
        if counts[count] is not None and len(report[key]) < counts[count]]
    if cut:  # a short list must not read as all there is
        lines.insert(-1, f"- `{AUDIT_REPORT}` lists the first {' and '.join(cut)}; "
                         f"`audit.max_listed` ({settings['max_listed']}) sets how many; "
                         f"`{AUDIT_FINDINGS}` has every one, and `python -m stages.curate` "
                         "reads it.")
    return "\n".join(lines) + "\n"
