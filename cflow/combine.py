"""Combining the items' output files into one result, in the bucket or through the controller.

COMBINE = "concat" calls ``combine_outputs``; COMBINE = "none" is the caller's
branch: it calls nothing here and leaves each item's outputs where the
workers put them in the bucket.

Two ways, chosen per output name:

- **in the bucket** (``concat_plan``, ``compose_tree``): Cloud Storage's
  compose joins up to 32 objects per call; a tree of calls, run in
  parallel, joins any number into ``combined/NAME``, and the controller
  downloads only that one object (or none: COMBINE_DOWNLOAD = False). For a
  CSV, the worker uploaded each output's first line apart from its body (it
  rides in the done marker, see ``OutputShape``), so the result is the
  header once, then every body. What needs no reading is known from each
  done marker's listing metadata: sizes, final newlines, headers.
- **through the controller** (``combine_concat``, the way it always was):
  every item's copy is read, in item order, a few at a time, and written
  locally. Used where the CSV headers differ (each copy is then kept whole)
  and for runs whose workers recorded no shapes.

Both give the same bytes. The storage is reached through a ``CombineStore``
(``cflow.gcp.storage.RunStorage`` is the real one), so this module needs no
cloud and is tested with in-memory stand-ins.
"""

import collections
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TypeVar

from cflow.gcp import layout
from cflow.tasks import validate_output_name

logger = logging.getLogger(__name__)

A = TypeVar("A")
R = TypeVar("R")

COPY_CHUNK_BYTES = 1 << 20
# Reads in flight at once. Each is one Cloud Storage GET: at ~20-50 ms each,
# 100,000 items read one after another take about an hour, 8 at a time a few
# minutes. Memory holds at most this many items' copies of a file. Kept under
# the storage client's pool of 10 connections, so none is opened and dropped.
PARALLEL_READS = 8


def _first_line(data: bytes) -> bytes:
    """The first line of ``data`` including its line ending (the whole data if it has none)."""
    end = data.find(b"\n")
    return data if end < 0 else data[: end + 1]


def _line_text(line: bytes) -> bytes:
    """A line without its ending, so b'a,b\\r\\n' and b'a,b\\n' count as the same header."""
    return line.rstrip(b"\r\n")


class _ConcatFile:
    """Appends the items' copies of one output file, in item order, to ``path``.

    For a ``.csv`` name, a first line equal to the first file's is dropped
    (the header is kept once). Should a later file's first line differ, the
    headers are not all identical after all: the dropped ones are put back,
    so every file appears exactly as it was.
    """

    def __init__(self, path: Path, is_csv: bool) -> None:
        self.path = path
        self.is_csv = is_csv
        self.header: bytes | None = None
        self.headers_agree = True
        # (offset in the output, bytes dropped there), to undo when headers differ.
        self.dropped: list[tuple[int, bytes]] = []
        self.ends_with_newline = True
        self.out = open(path, "wb")

    def append(self, data: bytes) -> None:
        if not data:
            return
        if self.is_csv and self.headers_agree:
            line = _first_line(data)
            if self.header is None:
                self.header = _line_text(line)
            elif _line_text(line) == self.header:
                self._write(b"", dropped=line)
                data = data[len(line):]
            else:
                self.headers_agree = False
        self._write(data)

    def _write(self, data: bytes, dropped: bytes | None = None) -> None:
        if not data and dropped is None:
            return
        # Files are appended whole; one that lacks a final newline would fuse
        # its last line with the next file's first, so it gets one here.
        if not self.ends_with_newline:
            self.out.write(b"\n")
            self.ends_with_newline = True
        if dropped is not None:
            self.dropped.append((self.out.tell(), dropped))
        if data:
            self.out.write(data)
            self.ends_with_newline = data.endswith(b"\n")

    def close(self) -> None:
        self.out.close()
        if not self.headers_agree and self.dropped:
            self._restore_dropped_headers()

    def _restore_dropped_headers(self) -> None:
        logger.info("%s: the items' CSV headers differ, so every item's header is kept", self.path.name)
        restored = self.path.with_name(self.path.name + ".restore")
        try:
            self._copy_with_headers(restored)
        except BaseException:
            restored.unlink(missing_ok=True)
            raise
        os.replace(restored, self.path)

    def _copy_with_headers(self, restored: Path) -> None:
        size = self.path.stat().st_size
        with open(self.path, "rb") as source, open(restored, "wb") as target:
            position = 0
            for number, (offset, header) in enumerate(self.dropped):
                _copy_bytes(source, target, offset - position)
                target.write(header)
                # A header-only copy without a final newline gets one when
                # anything follows it, as every other copy does.
                followed = offset < size or number + 1 < len(self.dropped)
                if followed and not header.endswith(b"\n"):
                    target.write(b"\n")
                position = offset
            shutil.copyfileobj(source, target, COPY_CHUNK_BYTES)


def _copy_bytes(source: BinaryIO, target: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = source.read(min(count, COPY_CHUNK_BYTES))
        if not chunk:
            raise OSError(f"{source.name} ended {count} bytes early while restoring CSV headers")
        target.write(chunk)
        count -= len(chunk)


def _read_named(read_output: Callable[[str, str], bytes], name: str, item_id: str) -> bytes:
    return read_output(item_id, name)


def _in_order(pool: ThreadPoolExecutor, function: Callable[[A], R], arguments: Iterable[A], window: int) -> Iterator[R]:
    """``function(argument)`` for each argument, run in ``pool``, yielded in argument order.

    At most ``window`` calls are running or finished but not yet taken, so
    the results held at once stay bounded however many arguments there are.
    """
    pending: collections.deque[Future[R]] = collections.deque()
    for argument in arguments:
        pending.append(pool.submit(function, argument))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def combine_concat(
    item_ids: Iterable[str],
    list_output_names: Callable[[str], Iterable[str]],
    read_output: Callable[[str, str], bytes],
    dest_dir: str | Path,
    parallel: int = PARALLEL_READS,
    pool: ThreadPoolExecutor | None = None,
) -> dict[str, Path]:
    """Concatenate each output file name across items into ``dest_dir``.

    For every file name any item produced, ``dest_dir/NAME`` becomes that
    file from each item that has it, in item order. Up to ``parallel``
    items are listed or read at once and written in item order, so memory
    holds at most that many items' copies of a file, not the whole result.

    CSV (names ending ``.csv``): when the first lines of all the non-empty
    copies are identical, that header appears once at the top; when they
    differ, every copy is kept as is. A copy not ending in a newline gets one
    before the next copy is appended.

    Args:
        item_ids: the items' ids, in item order.
        list_output_names: ``list_output_names(item_id) -> list[str]``, the
            output file names of one item.
        read_output: ``read_output(item_id, name) -> bytes``.
        dest_dir: folder for the result (created if missing). Each file is
            written under a temporary name and renamed when complete.
        parallel: calls of the two functions in flight at once (from
            threads: they must be safe to call concurrently).
        pool: the threads to call them in (None: a pool of ``parallel`` for this call).
    Returns:
        ``{name: Path}`` of the files written, in name order.
    Raises:
        ValueError: an output name is unsafe (see ``validate_output_name``).
        Whatever the two functions raise; nothing is left half-written.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="combine")
    try:
        items_by_name: dict[str, list[str]] = {}
        item_ids = list(item_ids)
        for item_id, names in zip(item_ids, _in_order(pool, list_output_names, item_ids, parallel)):
            for name in names:
                validate_output_name(name)
                holders = items_by_name.setdefault(name, [])
                if not holders or holders[-1] != item_id:
                    holders.append(item_id)

        written: dict[str, Path] = {}
        for name in sorted(items_by_name):
            final_path = dest_dir / name
            file_handle, temporary = tempfile.mkstemp(dir=dest_dir, prefix=".cflow-combine-")
            os.close(file_handle)
            concat = _ConcatFile(Path(temporary), is_csv=name.lower().endswith(".csv"))
            try:
                try:
                    for data in _in_order(pool, functools.partial(_read_named, read_output, name), items_by_name[name], parallel):
                        concat.append(data)
                finally:
                    concat.close()
                os.replace(temporary, final_path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
            logger.debug("combined %s from %d items", name, len(items_by_name[name]))
            written[name] = final_path
        return written
    finally:
        if own_pool:
            # On an error, reads not yet started are dropped rather than waited for.
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- what a worker records of an output

# A first line longer than this is not kept apart: the file is uploaded whole,
# and its name is combined through the controller.
MAX_HEADER_BYTES = 16 * 1024
# The done marker's listing metadata carries the shapes when they fit in this
# many bytes (Cloud Storage allows 8 KiB of custom metadata per object, the
# attempt's span uses ~150); otherwise combining reads the marker itself.
MAX_SHAPES_METADATA_BYTES = 6 * 1024
SHAPES_METADATA_KEY = "outputs"


def is_csv_name(name: str) -> bool:
    """A CSV output, whose shared header is kept once."""
    return name.lower().endswith(".csv")


@dataclasses.dataclass(frozen=True)
class OutputShape:
    """What combining needs to know of one item's output file, without reading it.

    Attributes:
        size: bytes of the uploaded object: the file's body when ``header`` is
            set, else the whole file.
        final_newline: the file as the task wrote it ends with a newline (True for an empty file).
        header: the file's first line, line ending included, when the worker
            kept it apart from the uploaded body (a CSV output of a run that
            combines); None: the object is the whole file.
    """

    size: int
    final_newline: bool
    header: str | None = None

    @property
    def empty(self) -> bool:
        """The task wrote nothing to this file."""
        return self.size == 0 and not self.header

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"size": self.size, "newline": self.final_newline}
        if self.header is not None:
            document["header"] = self.header
        return document

    @classmethod
    def from_json(cls, document: object) -> "OutputShape":
        """The shape ``to_json`` made. Raises ValueError for anything else."""
        if not isinstance(document, Mapping):
            raise ValueError(f"an output shape must be an object, got {document!r:.80}")
        size, newline, header = document.get("size"), document.get("newline"), document.get("header")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(newline, bool):
            raise ValueError(f"an output shape needs a size and a newline flag, got {dict(document)!r:.80}")
        if header is not None and (not isinstance(header, str) or not header):
            raise ValueError(f"an output shape's header must be text, got {header!r:.80}")
        return cls(size, newline, header)


def shapes_to_json(shapes: Mapping[str, OutputShape]) -> dict[str, dict[str, Any]]:
    """``{name: shape}`` as a done marker's ``output_shapes``."""
    return {name: shape.to_json() for name, shape in shapes.items()}


def shapes_from_json(document: object) -> dict[str, OutputShape] | None:
    """A done marker's ``output_shapes`` (or its listing metadata, parsed); None if absent or unreadable."""
    if not isinstance(document, Mapping):
        return None
    try:
        return {str(name): OutputShape.from_json(shape) for name, shape in document.items()}
    except ValueError as error:
        logger.debug("unreadable output shapes: %s", error)
        return None


def shapes_metadata(info: Mapping[str, Any]) -> dict[str, str]:
    """The done marker's listing metadata for the shapes in its JSON ``info``; {} if none or too long."""
    shapes = info.get("output_shapes")
    if not isinstance(shapes, Mapping):
        return {}
    text = json.dumps(shapes, separators=(",", ":"), sort_keys=True)
    return {SHAPES_METADATA_KEY: text} if len(text.encode()) <= MAX_SHAPES_METADATA_BYTES else {}


def shapes_from_metadata(metadata: Mapping[str, str]) -> dict[str, OutputShape] | None:
    """The shapes ``shapes_metadata`` put in a listing's metadata; None when they are not there."""
    text = metadata.get(SHAPES_METADATA_KEY)
    if text is None:
        return None
    try:
        return shapes_from_json(json.loads(text))
    except ValueError:
        return None


def shape_output(path: Path, keep_header_apart: bool) -> OutputShape:
    """The shape of the output file at ``path``, its first line kept apart if asked and possible.

    Only local reads: the first line (at most ``MAX_HEADER_BYTES``) and the
    last byte. The first line is kept apart only when it is that short and
    is UTF-8 text (it travels in JSON); otherwise the file stays whole.

    Args:
        path: the output file.
        keep_header_apart: a CSV output of a run that combines.
    Returns:
        The ``OutputShape``; upload the file from byte ``len(header)`` on
        (``body_offset``) when it has a header.
    """
    size = path.stat().st_size
    with open(path, "rb") as stream:
        header = None
        if keep_header_apart and size:
            line = stream.readline(MAX_HEADER_BYTES + 1)
            if line.endswith(b"\n") or len(line) == size:
                try:
                    header = line.decode("utf-8") if len(line) <= MAX_HEADER_BYTES else None
                except UnicodeDecodeError:
                    header = None
        final_newline = True
        if size:
            stream.seek(size - 1)
            final_newline = stream.read(1) == b"\n"
    if header is None:
        return OutputShape(size, final_newline)
    return OutputShape(size - len(header.encode("utf-8")), final_newline, header)


def body_offset(shape: OutputShape) -> int:
    """Where the uploaded body starts in the file: after the header kept apart, if any."""
    return len(shape.header.encode("utf-8")) if shape.header is not None else 0


# ---------------------------------------------------------------- combining in the bucket

HEADER = "header"
NEWLINE = "newline"
# GCS compose takes at most this many sources per call.
MAX_COMPOSE_SOURCES = 32
# Compose calls in flight at once (under the storage client's 10 connections, as the reads).
PARALLEL_COMPOSES = 8


@dataclasses.dataclass(frozen=True)
class Piece:
    """One source of a combined object, in order: the shared header, a newline, or an item's body."""

    kind: str  # HEADER, NEWLINE, or "body"
    item_id: str | None = None
    header: bytes | None = None


NEWLINE_PIECE = Piece(NEWLINE)


def concat_plan(name: str, shapes: Sequence[tuple[str, OutputShape]]) -> list[Piece] | None:
    """The pieces whose concatenation is exactly what ``combine_concat`` writes for ``name``, or None.

    None means the bucket cannot join them as they are: a CSV whose
    non-empty copies do not all have a header kept apart, or whose headers
    differ (every copy is then kept whole, which needs each header back in
    its place). Empty copies are left out, a copy not ending in a newline
    gets one when another follows, and a CSV's header (the first copy's, as
    written) comes once.

    Args:
        name: the output's name (``.csv``: the header is kept once).
        shapes: ``(item_id, shape)`` of the items that have the output, in item order.
    """
    present = [(item_id, shape) for item_id, shape in shapes if not shape.empty]
    is_csv = is_csv_name(name)
    if is_csv and present:
        headers = [shape.header for _, shape in present]
        if any(header is None for header in headers):
            return None
        if len({_line_text(header.encode("utf-8")) for header in headers if header is not None}) > 1:
            return None
    pieces: list[Piece] = []
    ends_with_newline = True
    for number, (item_id, shape) in enumerate(present):
        if is_csv and number == 0:
            assert shape.header is not None
            pieces.append(Piece(HEADER, header=shape.header.encode("utf-8")))
            ends_with_newline = shape.header.endswith("\n")
        elif not ends_with_newline:
            pieces.append(NEWLINE_PIECE)
            ends_with_newline = True
        if shape.size:
            pieces.append(Piece("body", item_id=item_id))
            ends_with_newline = shape.final_newline
    return pieces


def compose_tree(
    compose: Callable[[Sequence[str], str], None],
    sources: Sequence[str],
    destination: str,
    temporary_name: Callable[[int, int], str],
    pool: ThreadPoolExecutor,
    made: list[str],
    fan_in: int = MAX_COMPOSE_SOURCES,
) -> None:
    """Join ``sources`` into ``destination`` with calls of at most ``fan_in`` sources, a level's calls in parallel.

    Each level joins runs of ``fan_in`` objects into temporaries until at
    most ``fan_in`` are left, which the last call joins into ``destination``:
    about ``len(sources) / (fan_in - 1)`` calls in all.

    Args:
        compose: ``compose(sources, destination)``, safe to call from threads.
        sources: the object names, in order (at least one).
        destination: the final object's name.
        temporary_name: ``temporary_name(level, index)``, unique per pair.
        pool: where the calls run.
        made: each temporary is appended before it is asked for, for the
            caller to delete (also after an error).
    Raises:
        Whatever ``compose`` raises (the first error, once that level's calls have ended).
    """
    if not sources:
        raise ValueError("compose_tree needs at least one source")
    level, current = 0, list(sources)
    while len(current) > fan_in:
        level += 1
        groups = [current[start:start + fan_in] for start in range(0, len(current), fan_in)]
        names = [temporary_name(level, index) for index in range(len(groups))]
        made.extend(names)
        futures = [pool.submit(compose, group, target) for group, target in zip(groups, names)]
        for future in futures:
            future.result()
        current = names
    compose(current, destination)


class CombineStore(Protocol):
    """The Cloud Storage calls combining makes, object names relative to the run's folder.

    Every method may raise ``cflow.errors.CloudError``; the real one is
    ``cflow.gcp.storage.RunStorage``.
    """

    def done_output_shapes(self) -> dict[str, dict[str, OutputShape] | None]:
        """``{item_id: {name: shape}}`` from one listing of the done markers; None for a marker whose metadata has no shapes."""
        ...

    def recorded_outputs(self, item_id: str) -> tuple[list[str], dict[str, OutputShape] | None]:
        """The recorded attempt's output names, and their shapes (None: its worker recorded none), from its done marker."""
        ...

    def read_output(self, item_id: str, name: str) -> bytes:
        """The uploaded object: the body when its shape has a header, else the whole file."""
        ...

    def compose(self, sources: Sequence[str], destination: str) -> None:
        """Join the objects ``sources`` (at most 32) into ``destination``, replacing it."""
        ...

    def upload_bytes(self, relative: str, data: bytes) -> None: ...

    def upload_file(self, relative: str, path: Path) -> None: ...

    def download_file(self, relative: str, path: Path) -> None: ...

    def delete_object(self, relative: str) -> None:
        """Delete the object; one already gone is fine."""
        ...

    def url(self, relative: str = "") -> str:
        """``gs://BUCKET/cflow/runs/RUN_ID/RELATIVE``."""
        ...


@dataclasses.dataclass(frozen=True)
class Combined:
    """One combined output: its object in the bucket, where it was downloaded (None: left in the bucket), and how."""

    name: str
    url: str
    path: Path | None
    in_bucket: bool  # joined by compose; False: through the controller


def combine_outputs(
    store: CombineStore,
    item_ids: Sequence[str],
    dest_dir: str | Path | None,
    parallel: int = PARALLEL_COMPOSES,
) -> dict[str, Combined]:
    """Combine each output name of the done items ``item_ids`` into ``combined/NAME``; download it into ``dest_dir``.

    Names whose copies the bucket can join (``concat_plan``) are composed
    there; the rest are combined through the controller
    (``combine_concat``) and uploaded. The temporaries are deleted.

    Args:
        store: the run's ``CombineStore``.
        item_ids: the done items, in item order.
        dest_dir: where to download each combined file (created if
            missing); None leaves them in the bucket (COMBINE_DOWNLOAD = False).
        parallel: calls in flight at once.
    Returns:
        ``{name: Combined}`` in name order.
    Raises:
        ValueError: an output name is unsafe (see ``validate_output_name``).
        CloudError: a call failed; temporaries already made are deleted.
    """
    with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="combine") as pool:
        holders = _holders_by_name(store, item_ids, pool, parallel)
        combined: dict[str, Combined] = {}
        deletions: list[Future[None]] = []
        try:
            for name in sorted(holders):
                shapes = holders[name]
                known = [(item_id, shape) for item_id, shape in shapes if shape is not None]
                plan = concat_plan(name, known) if len(known) == len(shapes) else None
                if plan is not None:
                    combined[name] = _compose_in_bucket(store, name, plan, dest_dir, pool, deletions)
                else:
                    reason = "the items' CSV headers differ" if len(known) == len(shapes) else "some items recorded no output shapes"
                    logger.info("%s: combining through the controller (%s)", name, reason)
                    combined[name] = _through_controller(store, name, shapes, dest_dir, pool, parallel)
        finally:
            _wait_for_deletions(store, deletions)
        return combined


def _wait_for_deletions(store: CombineStore, deletions: list["Future[None]"]) -> None:
    """Wait for the temporaries' deletions; a failure leaves litter, not a wrong result, so it is only logged."""
    failed = 0
    for deletion in deletions:
        error = deletion.exception()
        if error is not None:
            failed += 1
            logger.debug("deleting a temporary failed: %s", error)
    if failed:
        logger.warning("%d temporary object(s) of combining could not be deleted; they are under %s", failed,
                       store.url(layout.COMBINING))


Holders = list[tuple[str, OutputShape | None]]


def _holders_by_name(store: CombineStore, item_ids: Sequence[str], pool: ThreadPoolExecutor, parallel: int) -> dict[str, Holders]:
    """Each output name's ``(item_id, shape)``, in item order; the shape is None where the item's worker recorded none.

    One listing of the done markers gives the shapes; only a marker whose
    metadata lacks them (too long, or an older worker) is read.
    """
    listed = store.done_output_shapes()
    unknown = [item_id for item_id in item_ids if listed.get(item_id) is None]
    read: dict[str, tuple[list[str], dict[str, OutputShape] | None]] = dict(
        zip(unknown, _in_order(pool, store.recorded_outputs, unknown, parallel)))
    holders: dict[str, Holders] = {}
    for item_id in item_ids:
        shapes = listed.get(item_id)
        if shapes is None:
            names, shapes = read[item_id]
            if shapes is None:
                for name in names:
                    holders.setdefault(validate_output_name(name), []).append((item_id, None))
                continue
        for name in sorted(shapes):
            holders.setdefault(validate_output_name(name), []).append((item_id, shapes[name]))
    return holders


def _compose_in_bucket(
    store: CombineStore, name: str, plan: list[Piece], dest_dir: str | Path | None, pool: ThreadPoolExecutor,
    deletions: list["Future[None]"],
) -> Combined:
    """Join ``plan`` into combined/NAME in the bucket; its temporaries' deletions go on in ``pool`` (added to ``deletions``)."""
    destination = layout.combined(name)
    made: list[str] = []
    try:
        sources = []
        for piece in plan:
            if piece.kind == "body":
                assert piece.item_id is not None
                sources.append(layout.output(piece.item_id, name))
                continue
            relative = layout.combining_piece(name, piece.kind)
            if relative not in made:
                made.append(relative)
                store.upload_bytes(relative, piece.header if piece.kind == HEADER and piece.header is not None else b"\n")
            sources.append(relative)
        if sources:
            compose_tree(store.compose, sources, destination, functools.partial(layout.combining_part, name), pool, made)
        else:
            store.upload_bytes(destination, b"")  # every copy was empty
    finally:
        # They are no part of the result: deleted while the result downloads.
        deletions.extend(pool.submit(store.delete_object, relative) for relative in made)
    logger.debug("combined %s in the bucket from %d pieces", name, len(plan))
    path = _download(store, destination, Path(dest_dir), name) if dest_dir is not None else None
    return Combined(name, store.url(destination), path, in_bucket=True)


def _download(store: CombineStore, relative: str, dest_dir: Path, name: str) -> Path:
    """Download ``relative`` to ``dest_dir/name`` (through a temporary name, renamed when complete)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    file_handle, temporary = tempfile.mkstemp(dir=dest_dir, prefix=".cflow-combine-")
    os.close(file_handle)
    try:
        store.download_file(relative, Path(temporary))
        final_path = dest_dir / name
        os.replace(temporary, final_path)
        return final_path
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _whole_copy(store: CombineStore, shapes: Mapping[str, OutputShape | None], item_id: str, name: str) -> bytes:
    """One item's copy of ``name`` as its task wrote it: the header kept apart (if any) before the uploaded body."""
    data = store.read_output(item_id, name)
    shape = shapes.get(item_id)
    return shape.header.encode("utf-8") + data if shape is not None and shape.header is not None else data


def _through_controller(
    store: CombineStore, name: str, holders: Holders, dest_dir: str | Path | None, pool: ThreadPoolExecutor, parallel: int
) -> Combined:
    """Combine ``name`` as it always was: read every copy, write it here, upload it; keep the local file unless asked not to."""
    scratch = tempfile.mkdtemp(prefix="cflow-combine-") if dest_dir is None else None
    try:
        folder = Path(dest_dir) if dest_dir is not None else Path(str(scratch))
        written = combine_concat([item_id for item_id, _ in holders], lambda item_id: [name],
                                 functools.partial(_whole_copy, store, dict(holders)), folder, parallel, pool=pool)
        store.upload_file(layout.combined(name), written[name])
        return Combined(name, store.url(layout.combined(name)), written[name] if dest_dir is not None else None, in_bucket=False)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
