"""Combining the items' output files into one result.

COMBINE = "concat" calls ``combine_concat``. COMBINE = "none" is the caller's
branch: it calls nothing here and leaves each item's outputs where the
workers put them in the bucket.

The storage is reached through two functions passed in, so this module needs
no cloud and is tested with plain dicts.
"""

import collections
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, TypeVar

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
    Returns:
        ``{name: Path}`` of the files written, in name order.
    Raises:
        ValueError: an output name is unsafe (see ``validate_output_name``).
        Whatever the two functions raise; nothing is left half-written.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="combine")
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
        # On an error, reads not yet started are dropped rather than waited for.
        pool.shutdown(wait=True, cancel_futures=True)
