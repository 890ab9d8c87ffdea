"""How well the audit finds planted problems in a real photo set, and what acting on it gives.

    python -m benchmarks.audit_quality PHOTOS [--flip 0.05] [--copies 30] [--seed 0] [--keep]

PHOTOS is an image-folder or pre-split root (e.g. ../shared/data/monkeys10). In a fresh clone
of this repository, the photos (hard-linked where possible) get two kinds of planted problems:
``--flip`` of the training images are filed under another class chosen at random (through
``data.relabel``), and ``--copies`` test images get a near-copy (80% size, a 4% crop on each
side, JPEG quality 70) filed beside the training images of their class. Then ``dvc repro``
runs the whole pipeline, and the command prints: precision and recall of the audit's
label-issue list against the flipped images; how many planted copies the near-duplicate list
finds and how many other pairs it lists, at several similarity thresholds; the extract and
audit stage times; and the head's test accuracy with the problems, after acting on the audit
(leaving out, or relabelling as suggested, the flagged training and validation images, and
leaving out the training side of pairs across splits), and on the untouched photos. The test
split is the same in every run. docs/audit.md holds what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.pipeline_times import REPO
from benchmarks.pipeline_times import timed as run

MARGINS = (0.08, 0.1, 0.12, 0.13, 0.15, 0.2)


def set_params(project: Path, changes: dict[str, dict]) -> None:
    import yaml

    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def link_tree(source: Path, target: Path) -> None:
    """``target`` mirrors ``source``: each file a hard link to the original where the file
    system allows, else a copy (prepare refuses symbolic links leaving the data root)."""
    for folder, _, files in os.walk(source):
        out = target / Path(folder).relative_to(source)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(folder, name), out / name)
            except OSError:
                shutil.copy2(Path(folder, name), out / name)


def near_copy(original: Path, copy: Path) -> None:
    with Image.open(original) as image:
        image = image.convert("RGB")
        w, h = image.size
        image = image.crop((round(w * 0.04), round(h * 0.04), round(w * 0.96), round(h * 0.96)))
        image = image.resize((round(image.width * 0.8), round(image.height * 0.8)),
                             Image.Resampling.BICUBIC)
        image.save(copy, format="JPEG", quality=70)


def split_ids(project: Path) -> dict[str, list[tuple[str, int]]]:
    """Per split, the (path, label index) of each prepared image."""
    out = {}
    for split in ("train", "val", "test"):
        with np.load(project / "data" / "prepared" / f"{split}.npz") as index:
            out[split] = list(zip(index["ids"].astype(str), index["labels"].tolist(),
                                  strict=True))
    return out


def head_accuracy(project: Path) -> float:
    return json.loads((project / "metrics" / "evaluate.json").read_text())["head"]["accuracy"]


def write_curation(project: Path, exclude: list[str], relabel: list[tuple[str, str]]) -> None:
    (project / "data" / "exclude.txt").write_text("".join(f"{p}\n" for p in exclude))
    with open(project / "data" / "relabel.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(relabel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="audit-quality-"))
    project = scratch / "project"
    run(["git", "clone", "-q", str(REPO), str(project)], scratch)
    photos = project / "data" / "raw" / "photos"
    link_tree(args.photos.resolve(), photos)
    set_params(project, {"data": {"source": "data/raw/photos"},
                         "audit": {"max_listed": 100_000}})

    # The untouched photos: the reference accuracy, and the splits the problems are planted in.
    run(["dvc", "repro"], project)
    clean_accuracy = head_accuracy(project)
    splits = split_ids(project)
    classes = json.loads((project / "data" / "prepared" / "meta.json").read_text())["classes"]

    originals = [splits["test"][i][0] for i in
                 rng.choice(len(splits["test"]), size=args.copies, replace=False)]
    copies = {}
    for original in originals:
        copy = Path(original).with_name(f"nearcopy-{Path(original).stem}.jpg").as_posix()
        near_copy(photos / original, photos / copy)
        copies[copy] = original
    train = splits["train"]
    flipped = {}
    for i in rng.choice(len(train), size=round(args.flip * len(train)), replace=False):
        path, label = train[i]
        flipped[path] = classes[(label + int(rng.integers(1, len(classes)))) % len(classes)]
    write_curation(project, [], sorted(flipped.items()))

    run(["dvc", "repro", "prepare"], project)
    # A full extraction, the embedding store off (it holds the untouched photos' rows), to
    # compare the audit with: store_max_gb is not a DVC param of extract.
    params = (project / "params.yaml").read_text(encoding="utf-8")
    set_params(project, {"backbone": {"store_max_gb": 0}})
    extract_seconds, _ = run(["dvc", "repro", "-s", "extract"], project)
    (project / "params.yaml").write_text(params, encoding="utf-8")
    audit_seconds, audit_log = run(["dvc", "repro", "-s", "audit"], project)
    run(["dvc", "repro"], project)
    noisy_accuracy = head_accuracy(project)
    noisy_test = split_ids(project)["test"]
    report = json.loads((project / "reports" / "audit.json").read_text())
    planted = {frozenset(pair) for pair in copies.items()}

    issues = report["label_issues"]
    found = {e["path"] for e in issues}
    hits = len(found & set(flipped))
    print(f"photos: {args.photos} ({sum(len(v) for v in splits.values())} images), "
          f"{len(flipped)} training labels flipped, {len(copies)} near-copies planted")
    print(f"label issues: {len(found)} listed, {hits} of them flipped: precision "
          f"{hits / max(1, len(found)):.3f}, recall {hits / max(1, len(flipped)):.3f}")

    sys.path.insert(0, str(project))
    from transfer.audit import AuditImages, scan, training_centre, unit_rows  # noqa: E402

    parts = []
    for split in ("train", "val", "test"):
        features = np.load(project / "data" / "embeddings" / f"{split}.npy")
        with np.load(project / "data" / "embeddings" / "index.npz") as index:
            parts.append((split, features, index[f"{split}_labels"], index[f"{split}_ids"],
                          index[f"{split}_ids"]))
    from stages.audit import image_lookup  # noqa: E402
    from transfer.data import ImageStore  # noqa: E402
    from transfer.keypoints import KeypointMatcher  # noqa: E402

    images = AuditImages.gather(parts)
    unit = unit_rows(images.features, training_centre(images))
    lookup = image_lookup({split: ImageStore(project / "data" / "prepared", split)
                           for split in ("train", "val", "test")})
    matcher = KeypointMatcher(lambda i: lookup((images.splits[i], images.paths[i])))
    keypoints = report["settings"]["duplicate_keypoints"]
    for title, found in (
            ("the embeddings alone (duplicate_keypoints: 0)",
             scan(unit, images.splits, images.labels, min(MARGINS), 5, 10**7)[0]),
            (f"with duplicate_keypoints: {keypoints}",
             scan(unit, images.splits, images.labels, min(MARGINS), 5, 10**7, matcher=matcher,
                  min_keypoints=keypoints)[0])):
        print(f"near-duplicates by audit.duplicate_margin, {title}:")
        print("| margin | planted copies found | other pairs listed | of which across splits |")
        print("|---:|---:|---:|---:|")
        for threshold in MARGINS:
            keep = found.margin >= threshold
            listed = [frozenset((images.paths[a], images.paths[b]))
                      for a, b in zip(found.first[keep], found.second[keep], strict=True)]
            leak = images.splits[found.first[keep]] != images.splits[found.second[keep]]
            other = [p not in planted for p in listed]
            print(f"| {threshold} | {sum(p in planted for p in listed)} of {len(planted)} | "
                  f"{sum(other)} | {int(np.sum(leak & np.array(other, dtype=bool)))} |")
    setting = report["settings"]["duplicate_margin"]
    print(f"stage wall times: extract (store off) {extract_seconds:.1f} s, audit "
          f"{audit_seconds:.1f} s "
          f"({audit_seconds / extract_seconds:.3f} x extract) at duplicate_margin {setting}")
    print(*[line for line in audit_log.splitlines() if "audit took" in line], sep="\n")

    # Acting on the audit: only training and validation images, so the test split stays.
    acted = [e for e in issues if e["split"] != "test"]
    leaks = [pair for pair in report["near_duplicates"] if pair["splits"].count("train") == 1
             and "test" in pair["splits"]]
    leak_paths = [pair["a"] if pair["splits"][0] == "train" else pair["b"] for pair in leaks]
    relabel = dict(flipped)
    variants = {
        "leave out flagged": ([e["path"] for e in acted] + leak_paths, relabel),
        "relabel flagged as suggested": (leak_paths, {**relabel, **{e["path"]: e["suggested"]
                                                                     for e in acted}}),
    }
    print("| photos | head test accuracy |")
    print("|---|---:|")
    print(f"| untouched | {clean_accuracy:.4f} |")
    print(f"| with the planted problems | {noisy_accuracy:.4f} |")
    for name, (exclude, relabel) in variants.items():
        write_curation(project, exclude, sorted(relabel.items()))
        run(["dvc", "repro"], project)
        same = "" if split_ids(project)["test"] == noisy_test else " (test split changed)"
        print(f"| {name} ({len(exclude)} left out) | {head_accuracy(project):.4f}{same} |")
    if args.keep:
        print(f"project kept at {project}")
    else:
        subprocess.run(["rm", "-rf", str(scratch)], check=True)


if __name__ == "__main__":
    main()
