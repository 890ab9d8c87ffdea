"""What a person decided about single images, kept in Git: which to leave out, which to relabel.

``data.exclude`` names a text file, one image per line; ``data.relabel`` a CSV file with the
header ``image,label``. An image is named by its path relative to the source (as in
``reports/data.json``) or by its id: the first hex digits of the SHA-256 of its decoded pixels
(as in ``reports/audit.json``; capitals are read too), which stays the same when files are
added, removed, renamed or moved between class folders. Lines starting with ``#`` and blank
lines are ignored; in the exclude file, text after whitespace and ``#`` is a comment. A file
missing from its default place (``data/exclude.txt``, ``data/relabel.csv``) decides nothing;
one missing from a place ``params.yaml`` names is an error.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from transfer.artifacts import read_utf8
from transfer.errors import PipelineError, one_line
from transfer.layout import EXCLUDE_FILE, RELABEL_FILE

# An image id: the first ID_DIGITS hex digits of the SHA-256 of its decoded pixels. An entry of
# 16 to 64 hex digits is read as an id (a prefix of the hash); anything else as a path.
ID_DIGITS = 16
_ID = re.compile(r"[0-9a-f]{16,64}")
_ANY_CASE_ID = re.compile(r"[0-9a-fA-F]{16,64}")
_TRAILING_COMMENT = re.compile(r"\s+#.*$")
RELABEL_HEADER = ["image", "label"]


def content_id(pixel_sha256: str) -> str:
    """The image id of a picture, from the SHA-256 of its decoded pixels."""
    return pixel_sha256[:ID_DIGITS]


def is_content_id(entry: str) -> bool:
    return bool(_ID.fullmatch(entry))


@dataclass(frozen=True)
class Entry:
    """One image named in a curation file, with where it was named (``file:line``)."""

    image: str
    where: str
    label: str = ""


@dataclass(frozen=True)
class Curation:
    """The entries of both files (either may be empty)."""

    exclude_file: str = ""
    relabel_file: str = ""
    exclude: list[Entry] = field(default_factory=list)
    relabel: list[Entry] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.exclude and not self.relabel

    def relative_to(self, root: str) -> Curation:
        """The entries with paths written from the repository (``data/raw/set/cats/1.jpg``, as
        ``find`` gives them) or absolute (as a file manager copies them) made relative to the
        source's ``root``, as ``reports/data.json`` and ``reports/audit.json`` write them."""
        return replace(self, exclude=[relative_to(e, root) for e in self.exclude],
                       relabel=[relative_to(e, root) for e in self.relabel])


def relative_to(entry: Entry, root: str) -> Entry:
    """``entry`` with a path written from the repository or absolute made relative to the
    source's ``root``; an id, or a path already relative to the root, as it was."""
    if is_content_id(entry.image):
        return entry
    inside = os.path.relpath(os.path.abspath(entry.image), os.path.abspath(root))
    if inside == os.curdir or inside.split(os.sep)[0] == os.pardir:
        return entry  # already relative to the root, or elsewhere
    return replace(entry, image=Path(inside).as_posix())


def read_curation(exclude_file: str | Path, relabel_file: str | Path) -> Curation:
    """Read and check both files; a file that is missing or malformed stops with one line
    naming it."""
    return Curation(str(exclude_file), str(relabel_file), read_exclude(exclude_file),
                    read_relabel(relabel_file))


def _lines(path: str | Path, key: str) -> list[tuple[int, str]]:
    try:
        text = read_utf8(path)
    except FileNotFoundError as err:
        if Path(path) in (EXCLUDE_FILE, RELABEL_FILE):
            return []  # the default place, with nothing decided yet
        raise PipelineError(f"{path} (data.{key}): missing; create it (an empty file changes "
                            f"nothing) or point data.{key} at another file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path} (data.{key}): cannot be read as UTF-8 text "
                            f"({one_line(str(err))})") from err
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def _image(text: str) -> str:
    """An image as a curation file names it: a path (without a leading ``./``), or an id, in
    lower case however it was typed."""
    text = text.strip().removeprefix("./")
    return text.lower() if _ANY_CASE_ID.fullmatch(text) else text


def read_exclude(path: str | Path) -> list[Entry]:
    """The images listed in the exclude file, one per line."""
    return [Entry(_image(_TRAILING_COMMENT.sub("", line)), f"{path}:{number}")
            for number, line in _lines(path, "exclude")]


def read_relabel(path: str | Path) -> list[Entry]:
    """The ``image,label`` rows of the relabel file; one image given two labels is refused."""
    lines = _lines(path, "relabel")
    if not lines:
        return []
    rows = list(csv.reader([line for _, line in lines]))
    if [cell.strip() for cell in rows[0]] != RELABEL_HEADER:
        raise PipelineError(f"{path}:{lines[0][0]} (data.relabel): the first row must be the "
                            f"header {','.join(RELABEL_HEADER)}, got "
                            f"'{one_line(lines[0][1])[:60]}'")
    entries: list[Entry] = []
    seen: dict[str, Entry] = {}
    for (number, text), row in zip(lines[1:], rows[1:], strict=True):
        where = f"{path}:{number}"
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise PipelineError(f"{where} (data.relabel): expected two cells, image,label; got "
                                f"'{one_line(text)[:60]}'")
        entry = Entry(_image(row[0]), where, row[1].strip())
        earlier = seen.setdefault(entry.image, entry)
        if earlier.label != entry.label:
            raise PipelineError(f"{where} (data.relabel): '{entry.image}' is relabelled "
                                f"'{entry.label}' here and '{earlier.label}' at "
                                f"{earlier.where}; keep one")
        entries.append(entry)
    return entries


def not_a_class(entry: Entry, classes: list[str]) -> PipelineError:
    """The error for a relabel entry that names an image and a label that is not a class."""
    return PipelineError(f"{entry.where} (data.relabel): '{entry.label}' is not a class; "
                         f"classes: {', '.join(classes)}")
