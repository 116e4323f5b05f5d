"""Work items: where they come from, their ids, and their Pub/Sub messages.

An item is a tuple of argument strings that reaches the task's command as
argv, never through a shell. Its id is its index among the run's items,
zero-padded to a width that depends only on how many items there are, so a
resumed run derives the same ids from the same source. ``item_label`` names
an item in messages and the report by its id and its fields, shortened.

A run's items are an ``ItemList``: every item's fields in one buffer, a
``WorkItem`` made only when one is asked for, so a million items take tens
of megabytes, not the ~450 MB a list of objects would.
"""

import array
import dataclasses
import json
import logging
import re
import shlex
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from cflow.config import Config

from cflow.config import args_problem
from cflow.errors import ConfigError

logger = logging.getLogger(__name__)

ATTR_ITEM = "cflow_item"
ATTR_ATTEMPT = "cflow_attempt"
MIN_ID_WIDTH = 6
# Pub/Sub's limit on one message's data.
MAX_MESSAGE_BYTES = 10_000_000
# Most filesystems' limit on one file name, and well under Cloud Storage's 1024-byte object names.
MAX_NAME_BYTES = 255
ITEM_ID_RE = re.compile(r"[0-9]+")
# How many characters of an item's fields a message or the report shows.
FIELDS_SHOWN_CHARS = 40
ELLIPSIS = "\u2026"


class MessageError(ValueError):
    """A Pub/Sub message is not a CFlow work item."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One unit of work.

    Attributes:
        id: the index zero-padded (see ``item_id``); used in object names.
        index: position among the run's items, from 0.
        args: the fields appended to TASK_MODULE_CMD as argv.
    """

    id: str
    index: int
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        """The item as messages name it: ``000149 (poison-0)`` (see ``item_label``)."""
        return item_label(self.id, self.args)

    def to_dict(self) -> dict[str, Any]:
        """The item as JSON data: ``{"id", "index", "args"}`` (a work message's data, a line of items.jsonl)."""
        return {"id": self.id, "index": self.index, "args": list(self.args)}

    @classmethod
    def from_dict(cls, document: object) -> "WorkItem":
        """The item ``to_dict`` made.

        Raises:
            MessageError (a ValueError): not such a dict (keys, id, index and args are checked).
        """
        if not isinstance(document, Mapping) or set(document) != {"id", "index", "args"}:
            raise MessageError(f"must be a JSON object with keys id, index, args; got {str(document)[:80]!r}")
        raw_id, index, args = document["id"], document["index"], document["args"]
        try:
            validate_item_id(raw_id)
        except ValueError as error:
            raise MessageError(f"has a bad item id: {error}") from None
        if not isinstance(index, int) or isinstance(index, bool) or index != int(raw_id):
            raise MessageError(f"has index {index!r}, which does not match its id {raw_id!r}")
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise MessageError("has args that are not a list of strings")
        return cls(raw_id, index, tuple(args))


def id_width(count: int) -> int:
    """Digits in the ids of a run with ``count`` items: at least 6, more for over a million."""
    return max(MIN_ID_WIDTH, len(str(max(count, 1) - 1)))


def item_id(index: int, count: int) -> str:
    """The id of item ``index`` in a run of ``count`` items, e.g. ``"000042"``."""
    return str(index).zfill(id_width(count))


def short_fields(args: Sequence[str], limit: int = FIELDS_SHOWN_CHARS) -> str:
    """An item's fields on one line, at most ``limit`` characters: ``poison-0``, ``'a b' c``.

    Fields are quoted as a shell would need them (so one field with a space
    reads as one), control characters are escaped (a newline in a field never
    breaks a message's line), and a longer text keeps its start and its end,
    where a path's file name is, around an ellipsis.
    """
    text = shlex.join(args)
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    if len(text) <= limit:
        return text
    head = max((limit - 1) // 3, 1)
    tail = max(limit - 1 - head, 1)
    return f"{text[:head]}{ELLIPSIS}{text[-tail:]}"


def item_label(item_id: str, args: Sequence[str] | None, limit: int = FIELDS_SHOWN_CHARS) -> str:
    """``000149 (poison-0)``: an item's id and its shortened fields; the id alone when the fields are unknown or none."""
    fields = short_fields(args, limit) if args else ""
    return f"{item_id} ({fields})" if fields else item_id


# Ends each field in an ItemList's buffer: argv cannot hold NUL (``args_problem``), so no field has one.
FIELD_END = "\0"


class ItemIds(Collection[str]):
    """The ids of a run of ``count`` items, without a string each: ``"000042" in ids``."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.width = id_width(count)

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, str) and len(value) == self.width and value.isascii() and value.isdigit()
                and int(value) < self.count)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return (str(index).zfill(self.width) for index in range(self.count))


class ItemList(Sequence[WorkItem]):
    """A run's work items in order, held compactly; ``items[i]`` makes the ``WorkItem``.

    Every item's fields live in one UTF-8 buffer, each field ended by NUL,
    with one 8-byte offset an item; ids come from positions (``item_id``).
    Equal to any sequence of the same ``WorkItem`` values.

    Args:
        arg_lists: each item's fields, in order (more can be ``append``-ed).
    Raises:
        ValueError: a field holds NUL.
    """

    def __init__(self, arg_lists: Iterable[Sequence[str]] = ()) -> None:
        self._data = bytearray()
        self._ends = array.array("Q")
        for args in arg_lists:
            self.append(args)

    def append(self, args: Sequence[str]) -> None:
        """Add an item with these fields at the end."""
        text = "".join(args)
        if FIELD_END in text:
            raise ValueError("a work item's field holds a NUL character, which a command line cannot carry")
        self._data += "".join(arg + FIELD_END for arg in args).encode("utf-8")
        self._ends.append(len(self._data))

    def __len__(self) -> int:
        return len(self._ends)

    def _args(self, index: int) -> tuple[str, ...]:
        start = self._ends[index - 1] if index else 0
        return tuple(self._data[start:self._ends[index]].decode("utf-8").split(FIELD_END)[:-1])

    @overload
    def __getitem__(self, index: int) -> WorkItem: ...

    @overload
    def __getitem__(self, index: slice) -> list[WorkItem]: ...

    def __getitem__(self, index: int | slice) -> WorkItem | list[WorkItem]:
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("item index out of range")
        return WorkItem(item_id(index, count), index, self._args(index))

    def __iter__(self) -> Iterator[WorkItem]:
        count, width, start = len(self), id_width(len(self)), 0
        for index, end in enumerate(self._ends):
            fields = self._data[start:end].decode("utf-8").split(FIELD_END)[:-1]
            yield WorkItem(str(index).zfill(width), index, tuple(fields))
            start = end
        assert count == len(self), "items appended while iterating"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemList):
            return self._ends == other._ends and self._data == other._data
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other))


    def __hash__(self) -> int:
        raise TypeError("unhashable type: 'ItemList' (it is mutable, as a list)")

    def __repr__(self) -> str:
        return f"ItemList({len(self)} items)"

    @property
    def ids(self) -> ItemIds:
        """The items' ids, as a container (no string is made until one is asked for)."""
        return ItemIds(len(self))


def ids_of(items: Sequence[WorkItem]) -> Collection[str]:
    """The ids of ``items``, for ``in``: compact for an ``ItemList``, a set for another sequence."""
    return items.ids if isinstance(items, ItemList) else {item.id for item in items}


def item_of(items: Sequence[WorkItem], item_id: str) -> WorkItem:
    """The item of ``items`` whose id is ``item_id``: by position in an ``ItemList``, else by a scan. Raises KeyError."""
    if isinstance(items, ItemList):
        if item_id not in items.ids:
            raise KeyError(item_id)
        return items[int(item_id)]
    for item in items:
        if item.id == item_id:
            return item
    raise KeyError(item_id)


def make_items(arg_lists: Iterable[Iterable[str]]) -> ItemList:
    """Number a sequence of argument lists as WorkItems, ids by position."""
    return ItemList(tuple(args) for args in arg_lists)


# Only these make a line more than whitespace-separated words to a POSIX shell's
# splitting (comments=False); a line without them splits on shlex's own whitespace.
_SHELL_SYNTAX_RE = re.compile(r"""['"\\]""")
_SHELL_WHITESPACE_RE = re.compile(r"[ \t\r]+")


def parse_tasks_text(text: str, source: str = "tasks file") -> list[list[str]]:
    """Split a tasks file's text into items, one per line (see ``iter_tasks_text``)."""
    return list(iter_tasks_text(text, source))


def iter_tasks_text(text: str, source: str = "tasks file") -> Iterator[list[str]]:
    """Split a tasks file's text into items, one per line.

    Blank lines and lines whose first non-blank character is ``#`` are
    skipped. Fields are split as a POSIX shell splits words (quotes and
    backslashes work), but nothing is expanded or run: ``$(rm -rf /)`` is
    just a field. A ``#`` after a field is a field too, not a comment. Only
    ``\\n`` (with an optional ``\\r`` before it) ends a line, so other Unicode
    line separators stay inside fields.

    Args:
        text: the file's contents.
        source: the file's name, for error messages.
    Yields:
        Each item, a list of strings.
    Raises:
        ConfigError: a line cannot be split (unbalanced quote, trailing
            backslash) or holds a NUL; the message names source and line.
    """
    # Text from a file is valid Unicode; only a NUL can make a field unfit for argv.
    check_fields = "\0" in text
    for lineno, raw_line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw_line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not _SHELL_SYNTAX_RE.search(line):
            # shlex, pure Python, costs ~17 s per million lines; this is what it would do here.
            args = _SHELL_WHITESPACE_RE.split(line.strip(" \t\r"))
        else:
            try:
                args = shlex.split(line, comments=False, posix=True)
            except ValueError as error:
                raise ConfigError(
                    f"{source}:{lineno}: cannot split the line into fields: {error} "
                    "(balance the quotes, or escape a literal quote with a backslash)"
                ) from None
        problem = args_problem(args) if check_fields else None
        if problem:
            raise ConfigError(f"{source}:{lineno}: the line {problem} (remove that character)")
        yield args


def _read_tasks_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the tasks file: {error.strerror or error} (check TASKS in const.py)") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: the tasks file is not UTF-8 text ({error.reason} at byte {error.start}) (save it as UTF-8)") from None


def load_items(config: "Config", list_objects: Callable[[str, str], Iterable[str]] | None = None) -> ItemList:
    """The run's work items, in order, from ``config.tasks``.

    Args:
        config: a ``cflow.config.Config``.
        list_objects: ``list_objects(bucket, prefix) -> iterable of object
            names``; required when TASKS is a ``gs://`` prefix. Names ending
            in ``/`` (folder placeholders) are skipped; the rest are sorted so
            a resumed run derives the same ids.
    Returns:
        A non-empty ``ItemList``.
    Raises:
        ConfigError: the source cannot be read or split, or has no items.
        TypeError: TASKS is a gs:// prefix and no ``list_objects`` was given.
    """
    gcs = config.tasks_gcs
    if (path := config.tasks_file) is not None:
        items = ItemList(iter_tasks_text(_read_tasks_file(path), source=str(path)))
        empty = f"{path}: the tasks file has no items (write one item per line; lines starting with # are comments)"
    elif gcs is None:
        items = ItemList(list(args) for args in config.tasks)
        empty = f"{config.config_path.name}: TASKS is an empty list, so there are no items (add items, or point TASKS at a tasks file)"
    else:
        if list_objects is None:
            raise TypeError("load_items needs list_objects for a gs:// TASKS")
        bucket, prefix = gcs
        names = sorted(name for name in list_objects(bucket, prefix) if not name.endswith("/"))
        items = ItemList([f"gs://{bucket}/{name}"] for name in names)
        empty = (
            f"{config.config_path.name}: TASKS prefix {config.tasks} has no items, no objects are under it "
            "(upload the inputs there, or fix the prefix)"
        )
    if not items:
        raise ConfigError(empty)
    return items


def encode_message(item: WorkItem, attempt: int) -> tuple[bytes, dict[str, str]]:
    """The Pub/Sub message for one attempt at ``item``.

    Args:
        item: the WorkItem.
        attempt: 1 on the first try, counting failed attempts only.
    Returns:
        ``(data, attributes)``: UTF-8 JSON ``{"id", "index", "args"}`` and
        ``{"cflow_item": id, "cflow_attempt": str(attempt)}``.
    Raises:
        ValueError: attempt is not a positive int, or the message is over Pub/Sub's 10 MB.
    """
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        raise ValueError(f"attempt must be an integer of at least 1, got {attempt!r}")
    data = json.dumps(item.to_dict(), ensure_ascii=False).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"item {item.id} is {len(data)} bytes as a message; Pub/Sub allows {MAX_MESSAGE_BYTES} (shorten its fields)")
    return data, {ATTR_ITEM: item.id, ATTR_ATTEMPT: str(attempt)}


def decode_message(data: bytes, attributes: Mapping[str, str] | None) -> tuple[WorkItem, int]:
    """The WorkItem and attempt number in a message made by ``encode_message``.

    Args:
        data: the message's bytes.
        attributes: its attributes (any mapping with ``get``).
    Returns:
        ``(WorkItem, attempt)``.
    Raises:
        MessageError (a ValueError): the message is not a well-formed CFlow item.
    """
    try:
        payload = json.loads(bytes(data).decode("utf-8"))
    except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"message data is not UTF-8 JSON: {error}") from None
    try:
        item = WorkItem.from_dict(payload)
    except MessageError as error:
        raise MessageError(f"message data {error}") from None
    raw_id = item.id
    attributes = attributes or {}
    if attributes.get(ATTR_ITEM) != raw_id:
        raise MessageError(f"message attribute {ATTR_ITEM}={attributes.get(ATTR_ITEM)!r} does not match its id {raw_id!r}")
    attempt_text = attributes.get(ATTR_ATTEMPT)
    if not isinstance(attempt_text, str) or not ITEM_ID_RE.fullmatch(attempt_text) or int(attempt_text) < 1:
        raise MessageError(f"message attribute {ATTR_ATTEMPT} must be a positive integer, got {attempt_text!r}")
    return item, int(attempt_text)


def _name_problem(name: object) -> str | None:
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return f"is {name!r}, which names a folder"
    if "/" in name or "\\" in name:
        return f"{name!r} contains a path separator"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return f"{name!r} contains a control character"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{name!r} is not valid Unicode text"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is {len(encoded)} bytes long, more than {MAX_NAME_BYTES}"
    return None


def validate_output_name(name: str) -> str:
    """Check a task's output file name is one plain file name that stays under its item's prefix.

    Rejects empty names, ``.``/``..``, ``/`` and ``\\`` (so no absolute
    paths or subfolders), control characters including NUL, invalid
    Unicode, and names over 255 bytes.

    Returns:
        ``name`` unchanged.
    Raises:
        ValueError: the name is unsafe, saying why.
    """
    problem = _name_problem(name)
    if problem:
        raise ValueError(f"output file name {problem}")
    return name


def validate_item_id(value: str) -> str:
    """Check an item id is one CFlow makes: ASCII digits only, at least 6 of them.

    Returns:
        ``value`` unchanged.
    Raises:
        ValueError: it is not such an id.
    """
    if not isinstance(value, str) or not value.isascii() or not ITEM_ID_RE.fullmatch(value) or len(value) < MIN_ID_WIDTH:
        raise ValueError(f"item id must be at least {MIN_ID_WIDTH} ASCII digits, got {value!r}")
    return value
