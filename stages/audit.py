"""DVC stage ``audit``: likely label errors, near-duplicates, leakage and outliers, found on the
cached embeddings; and the reference ``predict`` uses to call a new image unfamiliar."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import numpy as np

from transfer.artifacts import atomic_outputs, json_text
from transfer.audit import AuditImages, AuditSettings, run_audit
from transfer.catalog import SPLITS
from transfer.data import ImageStore
from transfer.embeddings import EmbeddingMeta, load_split
from transfer.errors import PipelineError, counted, run_stage
from transfer.gallery import Section, Tile, draw_sheet, images_by_id, png_bytes
from transfer.keypoints import PairCache
from transfer.layout import (
    AUDIT_FINDINGS,
    AUDIT_PICTURE,
    AUDIT_REPORT,
    EMBEDDINGS_DIR,
    FAMILIARITY,
    KEYPOINT_CACHE,
    PARAMS,
    PREPARED_DIR,
    shared_by_experiments,
)
from transfer.params import load_params

log = logging.getLogger(__name__)

SHOWN = 12  # suspects of each kind in the picture
WARNING = (190, 30, 30)
TEXT = (20, 20, 20)


def main() -> None:
    params = load_params(PARAMS)
    meta = EmbeddingMeta.read(EMBEDDINGS_DIR)
    stores = {split: ImageStore(PREPARED_DIR, split) for split in SPLITS}
    parts = []
    for split, store in stores.items():
        features, labels, ids = load_split(EMBEDDINGS_DIR, split)
        if not np.array_equal(store.ids, ids):
            raise PipelineError(f"{PREPARED_DIR}/{split} and {EMBEDDINGS_DIR} list different "
                                "images; run: dvc repro")
        parts.append((split, features, labels, ids, np.asarray(store.content_ids())))
    images = AuditImages.gather(parts)
    settings = AuditSettings(**vars(params.audit))
    started = time.perf_counter()
    lookup = image_lookup(stores)
    audit = run_audit(images, meta.classes, settings, params.seed, meta,
                      lambda i: lookup((images.splits[i], images.paths[i])),
                      pair_cache(stores.values()))
    log.info("audit took %.2fs for %d images", time.perf_counter() - started, len(images.labels))
    report = audit.report
    picture = draw_sheet(suspect_sections(report), lookup)
    with atomic_outputs(AUDIT_REPORT, AUDIT_FINDINGS, AUDIT_PICTURE, FAMILIARITY) as (
            report_file, findings_file, picture_file, reference_file):
        report_file.write_text(json_text(report), encoding="utf-8")
        findings_file.write_text(json_text(audit.findings), encoding="utf-8")
        picture_file.write_bytes(png_bytes(picture))
        audit.familiarity.save(reference_file)
    counts = report["counts"]
    ruled_out = counts["near_duplicates_ruled_out_by_keypoints"]
    log.info("%d images: %s, %s (%d across splits, %d across labels%s), %d beyond the "
             "unfamiliar distance", counts["images"],
             counted(counts["label_issues"], "likely label issue")
             if counts["label_issues"] is not None else "labels not checked",
             counted(counts["near_duplicate_pairs"], "near-duplicate pair"),
             counts["near_duplicates_across_splits"], counts["near_duplicates_across_labels"],
             f"; {counted(ruled_out, 'look-alike pair')} left out, their keypoints not "
             "matching" if ruled_out else "", counts["unfamiliar"])
    log.info("details: %s (every finding: %s); picture: %s", AUDIT_REPORT, AUDIT_FINDINGS,
             AUDIT_PICTURE)


def pair_cache(stores: Iterable[ImageStore]) -> PairCache | None:
    """The keypoint counts of pairs checked before, for the images of ``stores`` in their
    order (as ``AuditImages.gather`` puts them); None for a store prepared without its pixels'
    hashes."""
    digests = [store.stored_digests() for store in stores]
    if any(d is None for d in digests):
        return None
    return PairCache(shared_by_experiments(KEYPOINT_CACHE),
                     [digest.decode("ascii") for d in digests for digest in d])


def image_lookup(stores: dict[str, ImageStore]) -> Callable[[tuple[str, str]], np.ndarray]:
    """Pixels of an image by its (split, path)."""
    lookups = {split: images_by_id(store, [], f"{PREPARED_DIR}/{split}")
               for split, store in stores.items()}
    return lambda key: lookups[key[0]](key[1])


def suspect_sections(report: dict) -> list[Section]:
    """The picture's blocks: likely mislabelled images, near-duplicate pairs, outliers."""
    issues = [Tile((e["split"], e["path"]), ((e["path"], TEXT), (f"given: {e['given']}", TEXT),
                                             (f"likely: {e['suggested']}", WARNING)))
              for e in report["label_issues"][:SHOWN]]
    pairs = [Tile((split, path), ((path, TEXT), (f"{split}, {label}", TEXT),
                                  (f"pair {n + 1}: {e['similarity']:.3f}", WARNING)))
             for n, e in enumerate(report["near_duplicates"][:SHOWN // 2])
             for path, split, label in zip((e["a"], e["b"]), e["splits"], e["labels"],
                                           strict=True)]
    outliers = [Tile((e["split"], e["path"]), ((e["path"], TEXT), (e["label"], TEXT),
                                               (f"distance {e['score']:.3f}", WARNING)))
                for e in report["outliers"][:SHOWN]]
    counts = report["counts"]
    return [
        Section(f"Likely mislabelled: {counts['label_issues']} found, the most likely first",
                issues, "none found") if counts["label_issues"] is not None else
        Section("Likely mislabelled: not searched", issues,
                report["settings"]["label_issues_not_searched"]),
        Section(f"Near-duplicate pairs: {counts['near_duplicate_pairs']} "
                f"({counts['near_duplicates_across_splits']} across splits, "
                f"{counts['near_duplicates_across_labels']} across labels)", pairs, "none found"),
        Section("Farthest from the training images", outliers, "no images"),
    ]


if __name__ == "__main__":
    run_stage(main)
