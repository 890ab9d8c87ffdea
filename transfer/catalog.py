"""The files of a source and what prepare learns about each, kept on disk, not in memory.

A private SQLite database (on disk, gone when closed) holds one row per listed file and,
once it is decoded, its hashes, size and pixel sums. Ordering, de-duplication, label conflicts,
class sizes, the per-class cap and the split are queries over it, so prepare's memory stays
flat however many files a source holds: only SQLite's page cache (2 MiB) lives in memory.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfer.curation import Entry, content_id, is_content_id, not_a_class
from transfer.errors import PipelineError

SPLITS = ("train", "val", "test")

_SCHEMA = """
CREATE TABLE listed (id TEXT NOT NULL, path TEXT NOT NULL, label TEXT NOT NULL, split TEXT);
CREATE TABLE images (
    rank INTEGER PRIMARY KEY,  -- position in the order copies are ranked in; the first is kept
    id TEXT NOT NULL, path TEXT NOT NULL, label TEXT NOT NULL,
    given TEXT,                -- the split the source gives, if any
    reason TEXT,               -- why the file was skipped; NULL once decoded
    byte_sha256 TEXT, pixel_sha256 TEXT, stored_sha256 TEXT, staging_file TEXT, offset INTEGER,
    height INTEGER, width INTEGER, small INTEGER,
    sum_r INTEGER, sum_g INTEGER, sum_b INTEGER,
    square_r INTEGER, square_g INTEGER, square_b INTEGER,
    status TEXT,               -- kept, duplicate, conflict or capped
    split TEXT                 -- where a kept image goes
);
"""
# Of several copies of one picture the first is kept: a given train copy before val or test
# ones (so the training data stays whole), then by id.
# Where an image's pixels start in its split's ``.bin``: the sizes of the images before it.
STORE_OFFSET = "SUM(height * width * 3) OVER (ORDER BY id, rank) - height * width * 3"
_COPY_ORDER = ("CASE split WHEN 'train' THEN 0 WHEN 'val' THEN 2 WHEN 'test' THEN 3 ELSE 1 END, "
               "id, rowid")


@dataclass(frozen=True)
class DecodedFile:
    """The outcome of decoding one file: where its pixels went, its hashes, or why it was skipped.

    The worker that decodes a file appends the pixels to a staging file of its own, so pixels
    never travel between processes.
    """

    staging_file: str = ""
    offset: int = 0
    shape: tuple[int, int] = (0, 0)
    original_size: tuple[int, int] = (0, 0)
    pixel_sha256: str = ""  # of the decoded full-size pixels: the image's identity
    byte_sha256: str = ""
    stored_sha256: str = ""  # of the pixels as stored (shrunk): the embedding store's key
    reason: str = ""
    # Per-channel sums of the stored pixels and of their squares: the training split's mean
    # and std add up from these without a second pass over the pixels.
    channel_sums: tuple[int, int, int] = (0, 0, 0)
    channel_squares: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class SourceImage:
    """One file of a source: its id (path relative to the source root), class and given split."""

    id: str
    path: Path
    label: str
    split: str | None = None


class Catalog:
    """The labelled files of a source, the entries that could not even be listed, and, once
    prepare has decoded them, which files are kept, where they go and why the others are not."""

    def __init__(self) -> None:
        # An empty name opens a private temporary database on disk ($TMPDIR, else /var/tmp)
        # whose file SQLite unlinks at once: not even a killed run leaves it behind. It is
        # scratch: no journal, no waiting for the disk.
        self._db = sqlite3.connect("")
        self._db.executescript("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;" + _SCHEMA)
        self.skipped: list[dict[str, str]] = []

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Listing

    def add(self, image: SourceImage) -> None:
        self._db.execute("INSERT INTO listed VALUES (?, ?, ?, ?)",
                         (image.id, str(image.path), image.label, image.split))

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM listed").fetchone()[0]

    def images(self) -> Iterator[SourceImage]:
        """The listed files, by id."""
        for id_, path, label, split in self._db.execute(
                "SELECT id, path, label, split FROM listed ORDER BY id, rowid"):
            yield SourceImage(id_, Path(path), label, split)

    def classes(self) -> list[str]:
        return [row[0] for row in self._db.execute(
            "SELECT DISTINCT label FROM listed ORDER BY label")]

    # Decoding

    def ranked_paths(self) -> Iterator[Path]:
        """Every listed file in rank order, the order ``record`` expects the results in."""
        self._db.execute("DELETE FROM images")
        self._db.execute(f"INSERT INTO images (id, path, label, given) "
                         f"SELECT id, path, label, split FROM listed ORDER BY {_COPY_ORDER}")
        # Read in pages, not through one open cursor: ``record`` writes to these rows meanwhile.
        rank = 0
        while page := self._db.execute("SELECT rank, path FROM images WHERE rank > ? "
                                       "ORDER BY rank LIMIT 1024", (rank,)).fetchall():
            for rank, path in page:  # noqa: B007 (the last rank starts the next page)
                yield Path(path)

    def record(self, rank: int, decoded: DecodedFile, small: bool) -> None:
        """What decoding the file of ``rank`` (1, 2, ... in ``ranked_paths`` order) gave."""
        self._db.execute(
            "UPDATE images SET reason = ?, byte_sha256 = ?, pixel_sha256 = ?, stored_sha256 = ?, "
            "staging_file = ?, offset = ?, height = ?, width = ?, small = ?, sum_r = ?, "
            "sum_g = ?, sum_b = ?, square_r = ?, square_g = ?, square_b = ? WHERE rank = ?",
            (decoded.reason or None, decoded.byte_sha256, decoded.pixel_sha256,
             decoded.stored_sha256, decoded.staging_file, decoded.offset, *decoded.shape, small,
             *decoded.channel_sums, *decoded.channel_squares, rank))

    def left_out(self) -> list[dict[str, str]]:
        """Every file skipped, with its reason: those skipped while listing, by path (the
        order folders list their entries in differs between file systems), then those that
        did not decode, by rank."""
        return sorted(self.skipped, key=lambda entry: entry["path"]) + self.undecodable()

    def undecodable(self) -> list[dict[str, str]]:
        return [{"path": id_, "reason": reason} for id_, reason in self._db.execute(
            "SELECT id, reason FROM images WHERE reason IS NOT NULL ORDER BY rank")]

    # Curation: what a person decided about single images

    def matching(self, image: str) -> list[tuple[int, str, str]]:
        """The decoded files an entry names, as ``(rank, id, label)``: by id (path relative to
        the source), or by content id (a prefix of the pixel hash)."""
        if is_content_id(image):
            # A range, not LIKE, so that the index on the pixel hash is used.
            condition, args = "pixel_sha256 >= ? AND pixel_sha256 < ?", (image, image + "g")
        else:
            condition, args = "id = ?", (image,)
        return self._db.execute(f"SELECT rank, id, label FROM images WHERE {condition} AND "
                                "reason IS NULL ORDER BY rank", args).fetchall()

    def _matches(self, entries: list[Entry],
                 unmatched: list[str]) -> Iterator[tuple[Entry, int, str, str]]:
        """Each entry with each file it names; an entry naming none is added to
        ``unmatched`` (by where it was written)."""
        self._db.execute("CREATE INDEX IF NOT EXISTS picture ON images (pixel_sha256, rank)")
        self._db.execute("CREATE INDEX IF NOT EXISTS named ON images (id)")
        for entry in entries:
            rows = self.matching(entry.image)
            if not rows:
                unmatched.append(entry.where)
            for rank, id_, label in rows:
                yield entry, rank, id_, label

    def exclude(self, entries: list[Entry]) -> dict[str, Any]:
        """Leave out every file an entry names; returns what was left out, which entries
        named nothing, and the exact copies of a file named by its path that stay in."""
        excluded, unmatched, by_path = [], [], []
        for entry, rank, id_, _ in self._matches(entries, unmatched):
            self._db.execute("UPDATE images SET status = 'excluded' WHERE rank = ?", (rank,))
            excluded.append({"path": id_, "entry": entry.where})
            if not is_content_id(entry.image):
                by_path.append((entry, rank, id_))
        return {"excluded": excluded, "unmatched": unmatched,
                "copies_left": self._copies_left(by_path, other_label_only=False)}

    def relabel(self, entries: list[Entry], classes: list[str]) -> dict[str, Any]:
        """File every file an entry names under its new label; returns what changed, which
        entries named nothing (rows for another source, say) and which named excluded files.
        An entry that names a file and a label that is not one of ``classes``, or a file
        another entry (by its path, or by its id) gives another label, stops with one line."""
        relabelled, unmatched, by_path, of_excluded = [], [], [], []
        given: dict[int, Entry] = {}
        for entry, rank, id_, label in self._matches(entries, unmatched):
            excluded = self._excluded(rank)  # an excluded file is not relabelled
            if excluded:
                of_excluded.append({"path": id_, "entry": entry.where})
            if not is_content_id(entry.image) and not excluded:
                by_path.append((entry, rank, id_))
            if entry.label not in classes:
                raise not_a_class(entry, classes)
            earlier = given.setdefault(rank, entry)
            if earlier.label != entry.label:
                raise PipelineError(
                    f"{entry.where} (data.relabel): '{entry.image}' names {id_}, which "
                    f"{earlier.where} ('{earlier.image}') relabels '{earlier.label}'; here "
                    f"'{entry.label}': keep one")
            self._db.execute("UPDATE images SET label = ? WHERE rank = ?", (entry.label, rank))
            if label != entry.label and not excluded:
                relabelled.append({"path": id_, "from": label, "to": entry.label,
                                   "entry": entry.where})
        return {"relabelled": relabelled, "unmatched": unmatched, "of_excluded": of_excluded,
                "copies_left": self._copies_left(by_path, other_label_only=True)}

    def _excluded(self, rank: int) -> bool:
        return bool(self._db.execute("SELECT status IS 'excluded' FROM images WHERE rank = ?",
                                     (rank,)).fetchone()[0])

    def _copies_left(self, named: list[tuple[Entry, int, str]],
                     other_label_only: bool) -> list[dict[str, Any]]:
        """For each file an entry named by its path, the other copies of its picture (the same
        decoded pixels) not excluded, and with ``other_label_only`` not under the named file's
        label: those a path leaves as they were, and only the picture's id would reach."""
        label = " AND copy.label IS NOT named.label" if other_label_only else ""
        left, seen = [], set()
        for entry, rank, id_ in named:
            if rank in seen:  # one file named twice ('red/1.png', './red/1.png')
                continue
            seen.add(rank)
            rows = self._db.execute(
                "SELECT copy.id, copy.pixel_sha256 FROM images AS copy JOIN images AS named "
                "ON copy.pixel_sha256 = named.pixel_sha256 WHERE named.rank = ? AND "
                "copy.rank != named.rank AND copy.reason IS NULL AND "
                f"copy.status IS NOT 'excluded'{label} ORDER BY copy.rank", (rank,)).fetchall()
            if rows:
                left.append({"entry": entry.where, "path": id_, "copies": [r[0] for r in rows],
                             "id": content_id(rows[0][1])})
        return left

    # De-duplication

    def find_duplicates(self) -> None:
        """Keep the first copy of each picture; the later ones are duplicates."""
        self._db.executescript("""
            CREATE INDEX IF NOT EXISTS picture ON images (pixel_sha256, rank);
            UPDATE images SET status = 'duplicate' WHERE reason IS NULL AND status IS NULL;
            UPDATE images SET status = 'kept' WHERE rank IN (
                SELECT MIN(rank) FROM images WHERE status = 'duplicate' GROUP BY pixel_sha256);
        """)

    def small_images(self, limit: int) -> tuple[int, list[str]]:
        """How many kept pictures are small, and the ids of the first ``limit``."""
        count = self._db.execute(
            "SELECT COUNT(*) FROM images WHERE status = 'kept' AND small").fetchone()[0]
        ids = [row[0] for row in self._db.execute(
            "SELECT id FROM images WHERE status = 'kept' AND small ORDER BY rank LIMIT ?",
            (limit,))]
        return count, ids

    def exclude_conflicts(self) -> list[dict[str, list[str]]]:
        """Set aside every copy of a picture that is filed under several labels; returns the
        groups: their ids (in rank order) and labels."""
        usable = "reason IS NULL AND status IS NOT 'excluded'"
        pictures = [row[0] for row in self._db.execute(
            f"SELECT pixel_sha256 FROM images WHERE {usable} GROUP BY pixel_sha256 "
            "HAVING COUNT(DISTINCT label) > 1 ORDER BY MIN(rank)")]
        conflicts = []
        for picture in pictures:
            rows = self._db.execute(f"SELECT id, label FROM images WHERE pixel_sha256 = ? "
                                    f"AND {usable} ORDER BY rank", (picture,)).fetchall()
            conflicts.append({"paths": [id_ for id_, _ in rows],
                              "labels": sorted({label for _, label in rows})})
            self._db.execute(f"UPDATE images SET status = 'conflict' WHERE pixel_sha256 = ? "
                             f"AND {usable}", (picture,))
        return conflicts

    def duplicates(self) -> list[dict[str, str]]:
        """Each later copy with the id of the kept one and whether their bytes or only their
        decoded pixels are the same."""
        return [{"path": id_, "duplicate_of": first, "same": "bytes" if same else "pixels"}
                for id_, first, same in self._db.execute("""
                    SELECT copy.id, kept.id, copy.byte_sha256 = kept.byte_sha256
                    FROM images AS copy JOIN images AS kept
                        ON kept.pixel_sha256 = copy.pixel_sha256
                        AND kept.status IN ('kept', 'capped')
                    WHERE copy.status = 'duplicate' ORDER BY copy.rank""")]

    # Selection and splitting

    def kept_per_class(self) -> dict[str, int]:
        return dict(self._db.execute(
            "SELECT label, COUNT(*) FROM images WHERE status = 'kept' GROUP BY label"))

    def given_splits(self) -> set[str]:
        return {row[0] for row in self._db.execute(
            "SELECT DISTINCT given FROM images WHERE status = 'kept' AND given IS NOT NULL")}

    def cap_per_class(self, limit: int, order: Callable[[str], float]) -> int:
        """Keep the first ``limit`` images of each class by ``order`` of their pixel hash;
        returns how many were left out."""
        self._db.create_function("cap_order", 1, order, deterministic=True)
        return self._db.execute("""
            UPDATE images SET status = 'capped' WHERE rank IN (
                SELECT rank FROM (
                    SELECT rank, ROW_NUMBER() OVER (
                        PARTITION BY label ORDER BY cap_order(pixel_sha256), rank) AS place
                    FROM images WHERE status = 'kept')
                WHERE place > ?)""", (limit,)).rowcount

    def assign_splits(self, split_of: Callable[[str, str | None], str]) -> dict[str, int]:
        """Give each kept image ``split_of(pixel hash, given split)``; returns the totals."""
        self._db.create_function("split_of", 2, split_of, deterministic=True)
        self._db.execute("UPDATE images SET split = split_of(pixel_sha256, given) "
                         "WHERE status = 'kept'")
        totals = dict(self._db.execute(
            "SELECT split, COUNT(*) FROM images WHERE status = 'kept' GROUP BY split"))
        return {split: totals.get(split, 0) for split in SPLITS}

    def split_counts(self, classes: list[str]) -> dict[str, dict[str, int]]:
        """Per split, the number of images of each class."""
        counts = {split: dict.fromkeys(classes, 0) for split in SPLITS}
        for split, label, n in self._db.execute(
                "SELECT split, label, COUNT(*) FROM images WHERE status = 'kept' "
                "GROUP BY split, label"):
            counts[split][label] = n
        return counts

    def longest_id(self, split: str) -> int:
        return self._db.execute("SELECT MAX(LENGTH(id)) FROM images WHERE status = 'kept' "
                                "AND split = ?", (split,)).fetchone()[0] or 1

    def stored(self, split: str, *columns: str) -> Iterator[tuple]:
        """``columns`` (SQL over an image's row, or ``STORE_OFFSET``) of each image of
        ``split``, in store order (by id)."""
        cursor = self._db.execute(f"SELECT {', '.join(columns)} FROM images "
                                  "WHERE status = 'kept' AND split = ? ORDER BY id, rank",
                                  (split,))
        while page := cursor.fetchmany(1024):
            yield from page

    def pixel_sums(self, split: str) -> tuple[int, list[int], list[int]]:
        """The number of pixels of ``split``, and the per-channel sums of values and squares."""
        pixels, *sums = self._db.execute(
            "SELECT SUM(height * width), SUM(sum_r), SUM(sum_g), SUM(sum_b), SUM(square_r), "
            "SUM(square_g), SUM(square_b) FROM images WHERE status = 'kept' AND split = ?",
            (split,)).fetchone()
        return pixels, sums[:3], sums[3:]
