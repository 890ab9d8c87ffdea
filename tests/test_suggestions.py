import json
from pathlib import Path

import pytest

from tests.conftest import one_error_line, run_stage_cli, working_directory
from tests.test_curation import colours, prepared, stored  # noqa: F401 (a fixture)
from transfer.suggestions import Suggestion, leaks, new_text


def pair(a: tuple, b: tuple, similarity: float = 0.99) -> dict:
    """A near-duplicate pair of the audit's findings from two (path, split, label, id)."""
    return {"a": a[0], "b": b[0], "ids": [a[3], b[3]], "similarity": similarity, "margin": 0.5,
            "keypoints": 40, "splits": [a[1], b[1]], "labels": [a[2], b[2]]}


def audit_report(root: Path, pairs=(), issues=(), outliers=(), listed: int = 50,
                 counted: dict | None = None) -> None:
    counts = {"images": 24, "label_issues": len(issues), "near_duplicate_pairs": len(pairs),
              "near_duplicates_across_splits": 0, "near_duplicates_across_labels": 0,
              "unfamiliar": 1, **(counted or {})}
    report = {"counts": counts,
              "settings": {"folds": 5, "label_issues_not_searched": None, "C": 0.1,
                           "unfamiliar_distance": 0.5, "max_listed": listed},
              "label_issues": list(issues), "near_duplicates": list(pairs),
              "outliers": list(outliers)}
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "audit_findings.json").write_text(json.dumps(report))


def images_by_split(root: Path) -> dict[str, list[tuple]]:
    """Every prepared image as (path, split, label, id), by split."""
    out: dict[str, list[tuple]] = {}
    for path, (split, label, image_id) in sorted(stored(root).items()):
        out.setdefault(split, []).append((path, split, label, image_id))
    return out


def curate(root: Path, *args: str) -> None:
    from stages import curate as command

    with working_directory(root):
        command.main(list(args))


def test_leaks_exclude_the_later_split_copy_once_and_prepare_applies_them(colours):  # noqa: F811
    prepared(colours)
    split = images_by_split(colours)
    train, val, test = split["train"][0], split["val"][0], split["test"][0]
    audit_report(colours, pairs=[pair(test, train), pair(val, test), pair(train, val),
                                 pair(train, split["train"][1])])
    curate(colours, "leaks", "--apply")
    text = (colours / "data" / "exclude.txt").read_text()
    def labels(a: tuple, b: tuple) -> str:
        return "" if a[2] == b[2] else f", labelled '{a[2]}' against '{b[2]}'"

    assert text.splitlines() == [
        f"{test[3]}  # {test[0]}: test copy of {train[0]} (train), similarity 0.99"
        f"{labels(test, train)}",
        f"{val[3]}  # {val[0]}: val copy of {train[0]} (train), similarity 0.99"
        f"{labels(val, train)}"]
    from stages import prepare

    with working_directory(colours):
        prepare.main()
    left = stored(colours)
    assert test[0] not in left and val[0] not in left and train[0] in left
    report = json.loads((colours / "reports" / "data.json").read_text())
    assert sorted(e["path"] for e in report["curation"]["exclude"]["excluded"]) == \
        sorted([test[0], val[0]])
    curate(colours, "leaks", "--apply")  # again: nothing new
    assert (colours / "data" / "exclude.txt").read_text() == text
    # Nor where the file names them by their path from the repository, as `find` writes it.
    (colours / "data" / "exclude.txt").write_text(f"data/raw/colours/{test[0]}\n"
                                                  f"{(colours / 'data/raw/colours' / val[0])}\n")
    curate(colours, "leaks", "--apply")
    assert len((colours / "data" / "exclude.txt").read_text().splitlines()) == 2


def test_label_fixes_go_to_the_relabel_file_with_its_header(colours, capsys):  # noqa: F811
    prepared(colours)
    image = images_by_split(colours)["train"][0]
    other = "green" if image[2] != "green" else "red"
    issue = {"id": image[3], "path": image[0], "split": "train", "given": image[2],
             "suggested": other, "score": 0.97}
    audit_report(colours, issues=[issue])
    curate(colours, "labels")  # a preview: the file stays as it was
    assert capsys.readouterr().out == (
        f"image,label\n# {image[0]}: train, labelled '{image[2]}', likely '{other}' "
        f"(score 0.97)\n{image[3]},{other}\n")
    assert (colours / "data" / "relabel.csv").read_text() == ""
    curate(colours, "labels", "--apply")
    from stages import prepare

    with working_directory(colours):
        prepare.main()
    assert stored(colours)[image[0]][1] == other


def test_a_test_image_to_relabel_comes_with_a_warning_to_look_at_it(tmp_path):
    issues = [{"id": f"{n:016x}", "path": f"c/{n}.png", "split": split, "given": "c",
               "suggested": "d", "score": 0.01} for n, split in ((1, "test"), (2, "train"))]
    audit_report(tmp_path, issues=issues)
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    result = run_stage_cli("curate", tmp_path, "labels")
    assert result.returncode == 0, result.stderr
    assert "WARNING __main__: 1 test image: the suggested label is the probe's own answer, " \
           "so a wrong one makes the test score look better than it is; look at each before " \
           "keeping its line" in result.stderr
    issues[0]["split"] = "val"
    audit_report(tmp_path, issues=issues)
    assert "WARNING" not in run_stage_cli("curate", tmp_path, "labels").stderr


def test_outliers_are_those_beyond_the_unfamiliar_distance_strongest_first(tmp_path):
    near, far, farther = (
        {"id": f"{n:016x}", "path": f"c/{n}.png", "split": "train", "label": "c", "score": s}
        for n, s in ((1, 0.4), (2, 0.6), (3, 0.8)))
    audit_report(tmp_path, outliers=[farther, far, near])
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    result = run_stage_cli("curate", tmp_path, "outliers", "--top", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{3:016x}  # c/3.png: train, 'c', distance 0.8 (unfamiliar " \
                            "beyond 0.5)\n"
    assert "1 image to append to data/exclude.txt (outliers)" in result.stderr


def test_the_outliers_suggested_are_those_the_audit_counted_not_their_rounded_scores(tmp_path):
    # A distance just beyond the limit can round to it: the audit's count decides.
    on_the_limit, inside = (
        {"id": f"{n:016x}", "path": f"c/{n}.png", "split": "train", "label": "c", "score": s}
        for n, s in ((1, 0.5), (2, 0.4)))
    audit_report(tmp_path, outliers=[on_the_limit, inside], counted={"unfamiliar": 1})
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    result = run_stage_cli("curate", tmp_path, "outliers")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{1:016x}  # c/1.png: train, 'c', distance 0.5 (unfamiliar " \
                            "beyond 0.5)\n"


def test_every_finding_is_suggested_whatever_the_report_lists(colours):  # noqa: F811
    # reports/audit.json lists audit.max_listed of each kind; curate reads the findings, which
    # hold every one, so one --apply excludes every leak.
    prepared(colours)
    split = images_by_split(colours)
    leaked = split["test"][:3]
    audit_report(colours, pairs=[pair(image, split["train"][0]) for image in leaked], listed=1)
    curate(colours, "leaks", "--apply")
    text = (colours / "data" / "exclude.txt").read_text()
    assert [line.split()[0] for line in text.splitlines()] == [image[3] for image in leaked]


@pytest.mark.parametrize(("setup", "args", "message"), [
    (lambda root: None, ["leaks"],
     "error: data/audit_findings.json: missing; the audit stage writes it (dvc repro audit), or "
     "fetch it from the team's remote (dvc pull audit)"),
    (lambda root: (root / "data" / "audit_findings.json").write_text('{"counts": {}}'),
     ["leaks"], "error: data/audit_findings.json: not an audit report this version reads (no "
     "'settings'); run dvc repro to write it again"),
    (lambda root: audit_report(root, counted={"label_issues": None}), ["labels"],
     "error: data/audit_findings.json: the audit did not search for label issues (None), so there "
     "is nothing to suggest"),
    (lambda root: audit_report(root, counted={"unfamiliar": -1}), ["outliers"],
     "error: data/audit_findings.json: not an audit report this version reads (no unfamiliar "
     "count); run dvc repro to write it again"),
    (lambda root: audit_report(root, counted={"unfamiliar": None}), ["outliers"],
     "error: data/audit_findings.json: not an audit report this version reads (no unfamiliar "
     "count); run dvc repro to write it again"),
    (lambda root: (root / "data" / "audit_findings.json").write_text("[1, 2]"), ["leaks"],
     "error: data/audit_findings.json: not an audit report this version reads (a list, not an "
     "object); run dvc repro to write it again"),
    (lambda root: audit_report(root, pairs=[5]), ["leaks"],
     "error: data/audit_findings.json: an entry of 'near_duplicates' is not one this version "
     "writes (TypeError: 'int' object is not subscriptable); run dvc repro audit to write it "
     "again"),
    (lambda root: audit_report(root, issues=[{"id": "ab"}]), ["labels"],
     "error: data/audit_findings.json: an entry of 'label_issues' is not one this version "
     "writes (KeyError: 'path'); run dvc repro audit to write it again"),
    (lambda root: audit_report(root, outliers=[{"id": 7, "path": "a.png", "split": "train",
                                                "label": "c", "score": 0.9}]), ["outliers"],
     "error: data/audit_findings.json: an entry of 'outliers' is not one this version writes "
     "(TypeError: 7 is not an image id and path); run dvc repro audit to write it again"),
    (lambda root: None, ["leaks", "--top", "0"],
     "error: python -m stages.curate: --top must be 1 or more (see --help)"),
])
def test_bad_input_is_one_line(tmp_path, setup, args, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "params.yaml").write_text("data:\n  source: digits\n")
    setup(tmp_path)
    code = 2 if args[-1] == "0" else 1
    assert one_error_line(run_stage_cli("curate", tmp_path, *args), code) == message


def test_appended_lines_start_on_a_line_of_their_own_and_the_header_is_written_once():
    suggestion = Suggestion("ab" * 8, "x/1.png", "why", "cat")
    assert new_text("# a comment", [suggestion], relabel=True) == \
        f"\nimage,label\n# x/1.png: why\n{'ab' * 8},cat\n"
    assert new_text("image,label\n", [suggestion], relabel=True) == \
        f"# x/1.png: why\n{'ab' * 8},cat\n"
    assert new_text("", [Suggestion("ab" * 8, "x/\n.png", "why")], relabel=False) == \
        f"{'ab' * 8}  # x/\\n.png: why\n"


def test_a_pair_in_one_split_is_no_leak():
    one = ("a.png", "test", "c", "1" * 16)
    assert leaks({"near_duplicates": [pair(one, ("b.png", "test", "d", "2" * 16))]}) == []
