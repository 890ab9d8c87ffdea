import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import one_error_line, run_stage_cli, working_directory, write_params
from transfer.audit import (
    AuditImages,
    AuditSettings,
    Familiarity,
    Nearest,
    Pairs,
    conformal_threshold,
    out_of_fold_probabilities,
    positions,
    power_normalised,
    run_audit,
    scan,
    summary_section,
    unit_rows,
    usable_folds,
)
from transfer.embeddings import EmbeddingMeta
from transfer.errors import PipelineError

SETTINGS = AuditSettings(folds=5, C=0.1, duplicate_margin=0.13, neighbours=3,
                         unfamiliar_percentile=99.0, max_listed=50)


def meta(dim: int, classes: list[str]) -> EmbeddingMeta:
    return EmbeddingMeta(backbone="b", weights="w", weights_sha256="0" * 64, preprocessing={},
                         dim=dim, dtype="float32", classes=classes, flip_average=False,
                         precision="float32", engine="torch", short_side=64, versions={})


def clusters(per_class: int = 40, classes: int = 3, dim: int = 32, seed: int = 0
             ) -> AuditImages:
    """Well separated Gaussian clusters, one per class, split 60/20/20 within each class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.5, size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dim))
    place = np.tile(np.arange(per_class), classes) / per_class
    splits = np.where(place < 0.6, "train", np.where(place < 0.8, "val", "test"))
    paths = np.array([f"c{label}/{i}.png" for i, label in enumerate(labels)])
    ids = np.array([f"{i:016x}" for i in range(len(labels))])
    return AuditImages(features.astype(np.float32), labels, splits, paths, ids)


def test_flipped_labels_are_ranked_first_with_the_label_they_came_from():
    images = clusters()
    flipped = [3, 50, 95]
    labels = images.labels.copy()
    labels[flipped] = (labels[flipped] + 1) % 3
    noisy = AuditImages(images.features, labels, images.splits, images.paths, images.content_ids)
    classes = ["a", "b", "c"]
    report = run_audit(noisy, classes, SETTINGS, seed=0, meta=meta(32, classes)).report
    top = report["label_issues"][:3]
    assert {e["path"] for e in top} == {f"c{images.labels[i]}/{i}.png" for i in flipped}
    for entry in top:
        i = int(entry["path"].split("/")[1].removesuffix(".png"))
        assert entry["given"] == classes[labels[i]]
        assert entry["suggested"] == classes[images.labels[i]]
        assert entry["id"] == f"{i:016x}" and 0 <= entry["score"] < 0.5
    assert report["counts"]["label_issues"] == len(report["label_issues"]) >= 3


def test_out_of_fold_probabilities_are_those_of_the_folds_fitted_one_after_another():
    """The folds are fitted on several threads at once: each image still gets the
    probabilities of the one fit that held it out, to the bit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    images = clusters(per_class=30, classes=4, dim=16, seed=2)
    features = images.features + np.random.default_rng(4).normal(scale=3.0,
                                                                  size=images.features.shape)
    labels = images.labels
    got = out_of_fold_probabilities(features, labels, n_classes=5, folds=4, C=0.1, seed=7)
    X = StandardScaler().fit_transform(features).astype(np.float32)
    expected = np.zeros((len(labels), 5))
    for fit_rows, held_out in StratifiedKFold(4, shuffle=True, random_state=7).split(X, labels):
        model = LogisticRegression(C=0.1, max_iter=1000).fit(X[fit_rows], labels[fit_rows])
        expected[np.ix_(held_out, model.classes_)] = model.predict_proba(X[held_out])
    np.testing.assert_array_equal(got, expected)
    assert np.all(got[:, 4] == 0) and 0.3 < (got.argmax(axis=1) == labels).mean() < 1


def test_a_copy_across_splits_is_a_pair_and_the_counts_cover_all():
    images = clusters()
    features = np.random.default_rng(0).normal(size=(len(images.labels), 256))
    features[35] = features[0] + 0.01  # a test image, nearly a copy of a training image
    centre = power_normalised(features).mean(axis=0)
    pairs, scores = scan(unit_rows(features, centre), images.splits, images.labels,
                         min_margin=0.13, k=3, limit=10)
    assert pairs.total == 1 and pairs.across_splits == 1 and pairs.across_labels == 0
    assert (pairs.first.tolist(), pairs.second.tolist()) == ([0], [35])
    assert scores.shape == (len(features),) and np.all(scores >= 0)


def brute_force_scan(unit: np.ndarray, train: np.ndarray, min_margin: float, k: int):
    """The pairs and outlier scores ``scan`` is defined to give, from the whole similarity
    matrix at once."""
    similarities = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(similarities, -np.inf)
    ranked = -np.sort(-similarities, axis=1)
    typical = ranked[:, 1:6].mean(axis=1)
    margins = similarities - (typical[:, None] + typical[None, :]) / 2
    first, second = np.nonzero(np.triu((margins >= min_margin) & (similarities >= 0.6), 1))
    to_train = -np.sort(-similarities[:, train], axis=1)[:, :k]
    return set(zip(first.tolist(), second.tolist(), strict=True)), 1 - to_train.mean(axis=1)


@pytest.mark.parametrize("train_share", [0.7, 0.1])
def test_the_one_pass_scan_finds_what_the_whole_similarity_matrix_defines(train_share):
    """Blocks of 16 rows, copies across blocks, and (with few training images) rows whose
    nearest training images lie beyond their nearest images: the same pairs and scores as
    the definition computed on the whole matrix."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 48))
    labels = rng.integers(0, 4, size=200)
    features = centres[labels] + rng.normal(scale=0.8, size=(200, 48))
    originals = rng.choice(200, size=25, replace=False)
    copies = np.roll(originals, 7)  # each original's copy replaces another image, anywhere
    features[copies] = features[originals] + rng.normal(scale=0.05, size=(25, 48))
    splits = np.where(rng.random(200) < train_share, "train", "val")
    unit = unit_rows(features, power_normalised(features[splits == "train"]).mean(axis=0))
    pairs, scores = scan(unit, splits, labels, min_margin=0.05, k=3, limit=1000, rows=16)
    expected_pairs, expected_scores = brute_force_scan(unit, splits == "train", 0.05, 3)
    assert set(zip(pairs.first.tolist(), pairs.second.tolist(), strict=True)) == expected_pairs
    assert pairs.total == len(expected_pairs) >= 20
    assert np.all(pairs.first < pairs.second)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


def test_nearest_keeps_each_images_largest_similarities_whatever_order_they_come_in():
    """Values met a few at a time (taken one by one) or many at a time (partitioned), in any
    order: each image ends with its largest ones and the columns they came from."""
    rng = np.random.default_rng(5)
    similarities = rng.normal(size=(30, 90)).astype(np.float32)
    nearest = Nearest(30, wide=6)
    images = np.arange(30)
    for n, (start, end) in enumerate([(40, 60), (0, 10), (85, 90), (10, 20), (60, 85),
                                      (20, 40)]):
        part = similarities[:, start:end]
        if n % 2:  # as a block's later images meet it: a transposed view (column-major)
            part = np.ascontiguousarray(part.T).T
        nearest.meet(images, part, start)
    expected = np.sort(similarities, axis=1)[:, -6:]
    order = np.argsort(nearest.similarity, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(nearest.similarity, order, axis=1), expected)
    np.testing.assert_array_equal(np.take_along_axis(similarities, nearest.column, axis=1),
                                  nearest.similarity)
    np.testing.assert_array_equal(nearest.floor, expected[:, 0])


@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_positions_are_those_of_nonzero_row_by_row_in_any_memory_layout(layout):
    mask = np.random.default_rng(2).random((37, 53)) > 0.9
    given = {"C": mask, "F": np.asfortranarray(mask), "strided": np.tile(mask, 2)[:, ::2]}
    expected = np.nonzero(given[layout])
    for got, want in zip(positions(given[layout]), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_pairs_keep_those_across_splits_or_labels_before_more_similar_ones():
    pairs = Pairs.empty(limit=2)
    splits = np.array(["train", "train", "train", "test"])
    labels = np.array([0, 0, 0, 0])
    pairs.add(np.array([0, 1]), np.array([1, 2]), np.array([0.99, 0.98]), np.array([0.3, 0.2]),
              splits, labels, np.array([40, 30]))
    pairs.add(np.array([2]), np.array([3]), np.array([0.91]), np.array([0.14]), splits, labels,
              np.array([12]))
    assert list(zip(pairs.first, pairs.second, strict=True)) == [(2, 3), (0, 1)]
    assert pairs.keypoints.tolist() == [12, 40]
    assert pairs.total == 3 and pairs.across_splits == 1


def test_an_outlier_scores_highest_and_is_unfamiliar_to_the_reference():
    images = clusters()
    features = images.features.copy()
    # A test image unlike every class (a validation image would set the threshold itself).
    features[119] = 4.0 * np.random.default_rng(1).normal(size=32)
    odd = AuditImages(features, images.labels, images.splits, images.paths, images.content_ids)
    classes = ["a", "b", "c"]
    audit = run_audit(odd, classes, SETTINGS, seed=0, meta=meta(32, classes))
    report, familiarity = audit.report, audit.familiarity
    assert report["outliers"][0]["path"] == images.paths[119]
    assert familiarity.unfamiliar(features[[119, 0, 50]]).tolist() == [True, False, False]


def test_the_unfamiliar_distance_lets_through_at_most_the_share_it_promises():
    from scipy.stats import norm

    # Over many validation splits of 100 images (distances drawn alike), the chance that a new
    # image lies beyond the threshold averages at most 1% at the 99th percentile: the largest
    # of the 100 (1/101); np.percentile's interpolation lets through about 1.9%.
    draws = np.random.default_rng(0).normal(size=(4000, 100))
    beyond = [norm.sf(conformal_threshold(row, 99.0)) for row in draws]
    assert np.mean(beyond) <= 0.0105
    assert np.mean(norm.sf(np.percentile(draws, 99, axis=1))) > 0.018
    assert conformal_threshold(np.arange(10.0), 90.0) == 9.0  # ⌈11 x 0.9⌉ = 10th smallest
    assert conformal_threshold(np.arange(10.0), 50.0) == 5.0  # ⌈11 x 0.5⌉ = 6th
    assert conformal_threshold(np.array([3.0]), 99.0) == 3.0  # too few: the largest


def test_the_familiarity_reference_round_trips_and_knows_its_embeddings(tmp_path):
    images = clusters()
    classes = ["a", "b", "c"]
    familiarity = run_audit(images, classes, SETTINGS, seed=0, meta=meta(32, classes)).familiarity
    familiarity.save(tmp_path / "f.npz")
    loaded = Familiarity.load(tmp_path / "f.npz")
    assert loaded.threshold == familiarity.threshold and loaded.k == familiarity.k
    np.testing.assert_array_equal(loaded.distances(images.features),
                                  familiarity.distances(images.features))
    assert loaded.matches(meta(32, classes)) and not loaded.matches(meta(33, classes))
    (tmp_path / "bad.npz").write_bytes(b"not an archive")
    with pytest.raises(PipelineError, match="bad.npz: not a readable array file"):
        Familiarity.load(tmp_path / "bad.npz")


def test_a_class_of_one_image_skips_the_label_search_only():
    assert usable_folds(np.array([0, 0, 0, 1, 1, 1]), 5) == 3
    assert usable_folds(np.array([0, 0, 0, 1]), 5) == 0
    images = clusters(per_class=10)
    keep = np.ones(len(images.labels), bool)
    keep[np.flatnonzero(images.labels == 2)[1:]] = False  # class 2: one image left
    small = AuditImages(images.features[keep], images.labels[keep], images.splits[keep],
                        images.paths[keep], images.content_ids[keep])
    classes = ["a", "b", "c"]
    report = run_audit(small, classes, SETTINGS, seed=0, meta=meta(32, classes)).report
    assert report["label_issues"] == [] and report["settings"]["folds"] == 0
    assert report["counts"]["images"] == keep.sum()
    # Not searched is not the same as none found, in the report and in the summary.
    assert report["counts"]["label_issues"] is None
    assert report["settings"]["label_issues_not_searched"] == (
        "class 'c' has 1 image, and cross-validation needs at least two of each")
    assert "- **Labels not checked**: class 'c' has 1 image" in summary_section(report)
    assert "look mislabelled" not in summary_section(report)


def texture(seed: int, size: int = 128) -> Image.Image:
    """A smooth random pattern of coloured waves: unlike any other seed's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.zeros((size, size, 3))
    for _ in range(6):
        fx, fy = rng.uniform(0.5, 4, 2)
        pixels += np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))[..., None] \
            * rng.uniform(0, 1, 3)
    pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def near_copy(image: Image.Image) -> Image.Image:
    """A 4% crop on each side, 80% of the size, JPEG quality 70: a re-saved copy."""
    w, h = image.size
    cropped = image.crop((round(w * 0.04), round(h * 0.04), round(w * 0.96), round(h * 0.96)))
    smaller = cropped.resize((round(cropped.width * 0.8), round(cropped.height * 0.8)),
                             Image.Resampling.BICUBIC)
    out = io.BytesIO()
    smaller.save(out, format="JPEG", quality=70)
    return Image.open(io.BytesIO(out.getvalue()))


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    """A pre-split project of random textures (two classes) plus a real photo (scikit-learn's
    sample ``china.jpg``) in test whose near-copy is among the training images; prepared,
    embedded and audited."""
    from sklearn.datasets import load_sample_images

    from stages import audit, extract, prepare

    root = tmp_path_factory.mktemp("audited")
    raw = root / "data" / "raw" / "scenes"
    seed = 0
    for split, per_class in (("train", 8), ("val", 3), ("test", 3)):
        for label in ("left", "right"):
            (raw / split / label).mkdir(parents=True)
            for i in range(per_class):
                seed += 1
                texture(seed).save(raw / split / label / f"{i}.png")
    photo = Image.fromarray(load_sample_images().images[0])
    photo.save(raw / "test" / "left" / "photo.png")
    near_copy(photo).save(raw / "train" / "left" / "copy.png")
    write_params(root, {"seed": 0, "data": {"source": "data/raw/scenes"},
                        "backbone": {"batch_size": 8}, "audit": {"folds": 3}})
    with working_directory(root):
        prepare.main()
        extract.main()
        audit.main()
    return root


def test_the_audit_stage_finds_a_resized_reencoded_copy_across_splits(audited):
    report = json.loads((audited / "reports" / "audit.json").read_text())
    top = report["near_duplicates"][0]
    assert {top["a"], top["b"]} == {"train/left/copy.png", "test/left/photo.png"}
    assert sorted(top["splits"]) == ["test", "train"] and top["labels"] == ["left", "left"]
    assert top["similarity"] > 0.9 and top["margin"] > 0.5
    # Two of the random textures may look alike, never nearly as much.
    assert all(p["similarity"] < 0.7 for p in report["near_duplicates"][1:])
    assert report["counts"]["images"] == 30 and len(report["outliers"]) == 30
    assert type(report["counts"]["near_duplicates_ruled_out_by_keypoints"]) is int
    assert all(len(e["id"]) == 16 for e in report["outliers"])
    with Image.open(audited / "plots" / "audit" / "suspects.png") as picture:
        assert picture.width > 500 and picture.height > 300
    assert (audited / "models" / "familiarity.npz").is_file()


def test_the_audit_outputs_are_the_same_bytes_when_run_again(audited, tmp_path):
    import shutil

    from stages import audit

    project = tmp_path / "again"
    shutil.copytree(audited, project)
    with working_directory(project):
        audit.main()
    for name in ("reports/audit.json", "plots/audit/suspects.png", "models/familiarity.npz"):
        assert (project / name).read_bytes() == (audited / name).read_bytes(), name


def test_a_second_audit_takes_the_pairs_keypoints_from_the_cache(audited, tmp_path,
                                                                 monkeypatch, caplog):
    """The first audit left the pairs' keypoint counts in cache/keypoints/; run again, it
    computes no keypoints and writes the same bytes; a damaged cache file is matched again,
    with a warning, to the same bytes."""
    import shutil

    from stages import audit
    from transfer.keypoints import KeypointMatcher

    project = tmp_path / "cached"
    shutil.copytree(audited, project)
    (cached,) = (project / "cache" / "keypoints").glob("*.json")
    stored = json.loads(cached.read_text())["pairs"]
    report = json.loads((audited / "reports" / "audit.json").read_text())
    assert len(stored) >= report["counts"]["near_duplicate_pairs"] >= 1
    real_keypoints = KeypointMatcher._keypoints

    def no_keypoints(self, i, mirrored, detector):
        raise AssertionError("keypoints computed for a pair the cache knows")

    monkeypatch.setattr(KeypointMatcher, "_keypoints", no_keypoints)
    with working_directory(project):
        audit.main()
    assert (project / "reports" / "audit.json").read_bytes() == \
        (audited / "reports" / "audit.json").read_bytes()
    monkeypatch.setattr(KeypointMatcher, "_keypoints", real_keypoints)
    cached.write_text('{"config": {}, "pairs": {"a": "b"}')  # truncated
    with working_directory(project):
        audit.main()
    assert "is damaged" in caplog.text
    assert (project / "reports" / "audit.json").read_bytes() == \
        (audited / "reports" / "audit.json").read_bytes()
    assert json.loads(cached.read_text())["pairs"] == stored  # rewritten whole


def test_damaged_embeddings_are_one_error_line_and_nothing_is_written(audited, tmp_path):
    import shutil

    project = tmp_path / "damaged"
    shutil.copytree(audited, project)
    for name in ("reports/audit.json", "plots/audit/suspects.png", "models/familiarity.npz"):
        (project / name).unlink()
    (project / "data" / "embeddings" / "val.npy").write_bytes(b"\x93NUMPY broken")
    line = one_error_line(run_stage_cli("audit", project))
    assert line.startswith("error: data/embeddings/val.npy: truncated or damaged")
    assert not (project / "reports" / "audit.json").exists()
    assert not (project / "models" / "familiarity.npz").exists()


def test_keypoints_match_a_copy_and_its_mirror_image_but_not_another_photo():
    import io

    from PIL import Image
    from sklearn.datasets import load_sample_image

    from transfer.keypoints import KeypointMatcher

    china = Image.fromarray(load_sample_image("china.jpg")).resize((320, 214))
    copy = china.crop((12, 8, 308, 206)).resize((236, 158))  # cropped, 80%, re-encoded
    buffer = io.BytesIO()
    copy.save(buffer, "JPEG", quality=70)
    images = [np.asarray(china), np.asarray(Image.open(buffer).convert("RGB")),
              np.asarray(china)[:, ::-1],
              np.asarray(Image.fromarray(load_sample_image("flower.jpg")).resize((320, 214)))]
    matcher = KeypointMatcher(lambda i: images[i])
    assert matcher.matches(0, 1, enough=8) >= 50
    assert matcher.matches(0, 2, enough=100) >= 50  # mirrored (tried below 100 direct)
    assert matcher.matches(0, 3, enough=8) < 8
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2)]  # on every core: the same counts
    assert KeypointMatcher(lambda i: images[i]).matches_many(pairs, enough=8) == \
        [matcher.matches(a, b, enough=8) for a, b in pairs]


def test_sift_is_computed_only_for_the_pairs_orb_leaves_below_the_threshold(monkeypatch):
    from sklearn.datasets import load_sample_image

    from transfer.keypoints import ORB, SIFT, KeypointMatcher

    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    images = [china, china[10:-10, 12:-12], flower]
    computed = []
    real_keypoints = KeypointMatcher._keypoints

    def recorded(self, i, mirrored, detector):
        computed.append((i, mirrored, detector))
        return real_keypoints(self, i, mirrored, detector)

    monkeypatch.setattr(KeypointMatcher, "_keypoints", recorded)
    copy, other = KeypointMatcher(images.__getitem__).matches_many([(0, 1), (0, 2)], enough=8)
    assert copy >= 8 and other < 8
    assert {i for i, mirrored, detector in computed if detector == SIFT} == {0, 2}
    assert {(i, mirrored) for i, mirrored, detector in computed if detector == ORB} == \
        {(0, False), (1, False), (2, False), (2, True)}
    # A threshold ORB cannot reach on the copy: SIFT is tried, and the larger count kept.
    orb_only = KeypointMatcher(images.__getitem__)._tried(ORB, 0, 1, enough=10**6)
    both = KeypointMatcher(images.__getitem__).matches(0, 1, enough=10**6)
    assert both >= orb_only and both == max(orb_only, KeypointMatcher(
        images.__getitem__)._tried(SIFT, 0, 1, enough=10**6))


def test_a_pair_alike_to_the_network_but_not_in_its_keypoints_is_left_out():
    from sklearn.datasets import load_sample_image

    from transfer.keypoints import KeypointMatcher

    images = clusters()
    features = np.random.default_rng(0).normal(size=(len(images.labels), 256))
    features[35] = features[0] + 0.01  # the network sees a near-copy
    features[36] = features[1] + 0.01
    china, flower = load_sample_image("china.jpg"), load_sample_image("flower.jpg")
    pixels = {0: china, 35: china[10:-10, 12:-12], 1: china, 36: flower}  # 36: another photo
    unit = unit_rows(features, power_normalised(features).mean(axis=0))
    pairs, _ = scan(unit, images.splits, images.labels, min_margin=0.13, k=3, limit=10,
                    matcher=KeypointMatcher(pixels.__getitem__), min_keypoints=8)
    assert (pairs.first.tolist(), pairs.second.tolist()) == ([0], [35])
    assert pairs.total == 1 and pairs.keypoints[0] >= 8
    assert pairs.ruled_out == 1  # (1, 36), counted apart


def test_the_report_and_summary_count_the_look_alikes_the_keypoints_left_out():
    report = {"counts": {"images": 9, "label_issues": 0, "near_duplicate_pairs": 1,
                         "near_duplicates_across_splits": 1, "near_duplicates_across_labels": 0,
                         "near_duplicates_ruled_out_by_keypoints": 54, "unfamiliar": 0},
              "settings": {"folds": 5, "duplicate_margin": 0.1, "duplicate_keypoints": 8,
                           "unfamiliar_percentile": 99.0, "max_listed": 50},
              "label_issues": [], "near_duplicates": [{}]}
    assert "- 1 near-duplicate pairs (similarity 0.1 or more above their neighbourhood's; " \
           "54 look-alike pairs left out, fewer than 8 of their keypoints matching): " \
           "1 across splits" in summary_section(report)
    # None left out, the check off, or a report from before the count: nothing to say.
    for ruled_out in (0, None, "absent"):
        report["counts"]["near_duplicates_ruled_out_by_keypoints"] = ruled_out
        if ruled_out == "absent":
            del report["counts"]["near_duplicates_ruled_out_by_keypoints"]
        assert "(similarity 0.1 or more above their neighbourhood's): 1 across" in \
            summary_section(report)


def test_images_too_small_for_keypoints_are_left_to_the_embeddings():
    from transfer.keypoints import KeypointMatcher

    tiny = np.zeros((8, 8, 3), np.uint8)
    assert KeypointMatcher(lambda i: tiny).matches(0, 1, enough=8) == -1


def test_the_summary_says_when_a_list_holds_only_the_first_ones():
    # With audit.max_listed below the counts, reports/audit.json lists the first ones only: the
    # summary says so (two of four planted copies sat beyond the first 50 pairs of monkeys10).
    images = clusters()
    labels = images.labels.copy()
    labels[[3, 50, 95]] = (labels[[3, 50, 95]] + 1) % 3
    noisy = AuditImages(images.features, labels, images.splits, images.paths, images.content_ids)
    classes = ["a", "b", "c"]
    short = AuditSettings(**{**vars(SETTINGS), "max_listed": 1})
    audit = run_audit(noisy, classes, short, seed=0, meta=meta(32, classes))
    report = audit.report
    assert report["counts"]["label_issues"] >= 3 and len(report["label_issues"]) == 1
    assert report["settings"]["max_listed"] == 1
    text = summary_section(report)
    assert f"lists the first 1 of the {report['counts']['label_issues']} likely mislabelled " \
           "images" in text and "`audit.max_listed` (1) sets how many" in text
    assert "`data/audit_findings.json` has every one" in text
    full = run_audit(noisy, classes, SETTINGS, seed=0, meta=meta(32, classes)).report
    assert "lists the first" not in summary_section(full)
    # The findings hold every one whatever audit.max_listed: the long report's lists, and the
    # images beyond the unfamiliar distance (the report lists the farthest, beyond it or not).
    findings = audit.findings
    assert findings["label_issues"] == full["label_issues"]
    assert findings["near_duplicates"] == full["near_duplicates"]
    limit = findings["settings"]["unfamiliar_distance"]
    assert len(findings["outliers"]) == findings["counts"]["unfamiliar"] and \
        findings["outliers"] == [o for o in full["outliers"] if o["score"] > limit]
    assert {k: v for k, v in findings.items() if k not in ("label_issues", "near_duplicates",
                                                          "outliers")} == \
        {k: v for k, v in report.items() if k not in ("label_issues", "near_duplicates",
                                                      "outliers")}
    # It names the curation files the params point at, where the lines would go.
    assert "`data/exclude.txt` and `data/relabel.csv`" in summary_section(full)
    assert "`curation/out.txt` and `curation/fix.csv`" in summary_section(
        full, "curation/out.txt", "curation/fix.csv")
