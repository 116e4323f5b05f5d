"""Combining in the bucket (cflow.combine): the worker's shapes, the plan, the compose tree, and the same bytes as the old way."""

import itertools
import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cflow import combine
from cflow.combine import (
    MAX_HEADER_BYTES,
    OutputShape,
    body_offset,
    combine_concat,
    compose_tree,
    concat_plan,
    shape_output,
    shapes_from_metadata,
    shapes_metadata,
    shapes_to_json,
)
from cflow.gcp import layout


class MemoryBucket:
    """A CombineStore over a dict of the run's objects (relative name -> bytes), as a worker left them."""

    def __init__(self):
        self.objects = {}
        self.markers = {}  # item_id -> the done marker's JSON
        self.listed_metadata = {}  # item_id -> the done marker's metadata
        self.calls = []

    def record_done(self, tmp_path, item_id, files, keep_headers_apart=True, in_listing=True):
        """Leave an item's outputs and done marker as a worker does (``files``: {name: bytes})."""
        shapes = {}
        for name, data in sorted(files.items()):
            path = tmp_path / f"{item_id}-{name}"
            path.write_bytes(data)
            shape = shape_output(path, keep_headers_apart and combine.is_csv_name(name))
            self.objects[layout.output(item_id, name)] = data[body_offset(shape):]
            shapes[name] = shape
        info = {"item": item_id, "outputs": sorted(files), "output_shapes": shapes_to_json(shapes)}
        self.markers[item_id] = info
        self.listed_metadata[item_id] = shapes_metadata(info) if in_listing else {}

    def record_done_without_shapes(self, item_id, files):
        """As a worker before shapes: whole files, a marker listing the names."""
        for name, data in files.items():
            self.objects[layout.output(item_id, name)] = data
        self.markers[item_id] = {"item": item_id, "outputs": sorted(files)}
        self.listed_metadata[item_id] = {}

    def done_output_shapes(self):
        self.calls.append(("list",))
        return {item_id: shapes_from_metadata(metadata) for item_id, metadata in self.listed_metadata.items()}

    def recorded_outputs(self, item_id):
        self.calls.append(("marker", item_id))
        marker = self.markers[item_id]
        return marker["outputs"], combine.shapes_from_json(marker.get("output_shapes"))

    def read_output(self, item_id, name):
        self.calls.append(("read", item_id, name))
        return self.objects[layout.output(item_id, name)]

    def compose(self, sources, destination):
        assert 1 <= len(sources) <= combine.MAX_COMPOSE_SOURCES
        self.calls.append(("compose", len(sources)))
        self.objects[destination] = b"".join(self.objects[source] for source in sources)

    def upload_bytes(self, relative, data):
        self.objects[relative] = data

    def upload_file(self, relative, path):
        self.calls.append(("upload", relative))
        self.objects[relative] = Path(path).read_bytes()

    def download_file(self, relative, path):
        self.calls.append(("download", relative))
        Path(path).write_bytes(self.objects[relative])

    def delete_object(self, relative):
        self.objects.pop(relative, None)

    def url(self, relative=""):
        return f"gs://bucket/run/{relative}"


def old_way(tmp_path, outputs):
    """What combining through the controller writes from the whole files: ``{name: bytes}``."""
    item_ids = sorted(outputs)
    written = combine_concat(item_ids, lambda item_id: list(outputs[item_id]), lambda item_id, name: outputs[item_id][name],
                             tmp_path / "old-way")
    return {name: path.read_bytes() for name, path in written.items()}


def read(file):
    """The downloaded file's bytes."""
    assert file.path is not None
    return file.path.read_bytes()


def new_way(tmp_path, outputs, download=True, **record):
    bucket = MemoryBucket()
    for item_id, files in sorted(outputs.items()):
        bucket.record_done(tmp_path, item_id, files, **record)
    dest = tmp_path / "new-way" if download else None
    combined = combine.combine_outputs(bucket, sorted(outputs), dest)
    return bucket, combined


COPIES = [b"", b"h,k\n", b"h,k", b"h,k\r\n", b"h,k\n1,2\n", b"h,k\n1,2", b"h,k\r\n1,2\r\n", b"h,k\n\n", b"h,k\n3,4\n5,6\n"]


@pytest.mark.parametrize("copies", list(itertools.product(COPIES, repeat=3)), ids=lambda copies: "|".join(map(repr, copies)))
def test_a_csv_joined_in_the_bucket_is_the_old_way_byte_for_byte(tmp_path, copies):
    outputs = {f"{number:06d}": {"out.csv": data} for number, data in enumerate(copies)}
    bucket, combined = new_way(tmp_path, outputs)

    assert combined["out.csv"].path.read_bytes() == old_way(tmp_path, outputs)["out.csv"]
    assert combined["out.csv"].in_bucket
    assert bucket.objects[layout.combined("out.csv")] == combined["out.csv"].path.read_bytes()
    assert not [call for call in bucket.calls if call[0] in ("read", "marker")]  # nothing read item by item


@pytest.mark.parametrize("copies", list(itertools.product([b"", b"a", b"a\n", b"a\nb", b"\n"], repeat=3)), ids=repr)
def test_other_files_joined_in_the_bucket_are_the_old_way_byte_for_byte(tmp_path, copies):
    outputs = {f"{number:06d}": {"log.txt": data} for number, data in enumerate(copies)}
    _bucket, combined = new_way(tmp_path, outputs)

    assert combined["log.txt"].path.read_bytes() == old_way(tmp_path, outputs)["log.txt"]


def test_random_runs_are_the_old_way_byte_for_byte(tmp_path):
    chooser = random.Random(15)
    for round_number in range(40):
        outputs = {}
        for number in range(chooser.randint(1, 80)):
            files = {}
            for name in ("a.csv", "b.CSV", "c.txt"):
                if chooser.random() < 0.8:
                    header = chooser.choice([b"x,y", b"x,y", b"x,y", b"z"]) if name != "c.txt" or chooser.random() < 0.5 else b"free"
                    rows = b"".join(b"%d,%d\n" % (chooser.randint(0, 9), number) for _ in range(chooser.randint(0, 3)))
                    ending = chooser.choice([b"\n", b"\r\n", b""])
                    data = header + ending + rows
                    if rows and chooser.random() < 0.2:
                        data = data.rstrip(b"\n")
                    files[name] = chooser.choice([data, data, data, b""])
            outputs[f"{number:06d}"] = files
        folder = tmp_path / str(round_number)
        folder.mkdir()
        _bucket, combined = new_way(folder, outputs)
        assert {name: file.path.read_bytes() for name, file in combined.items()} == old_way(folder, outputs)


def test_differing_csv_headers_are_combined_through_the_controller_with_every_header_kept(tmp_path):
    outputs = {"000000": {"out.csv": b"a,b\n1,2\n"}, "000001": {"out.csv": b"c,d\n3,4\n"}}
    bucket, combined = new_way(tmp_path, outputs)

    assert combined["out.csv"].path.read_bytes() == b"a,b\n1,2\nc,d\n3,4\n" == old_way(tmp_path, outputs)["out.csv"]
    assert not combined["out.csv"].in_bucket
    assert ("upload", layout.combined("out.csv")) in bucket.calls


def test_items_whose_workers_recorded_no_shapes_are_combined_the_old_way(tmp_path):
    bucket = MemoryBucket()
    bucket.record_done(tmp_path, "000000", {"out.csv": b"a,b\n1,2\n"})
    bucket.record_done_without_shapes("000001", {"out.csv": b"a,b\n3,4\n", "extra.txt": b"x\n"})

    combined = combine.combine_outputs(bucket, ["000000", "000001"], tmp_path / "result")

    assert read(combined["out.csv"]) == b"a,b\n1,2\n3,4\n"
    assert read(combined["extra.txt"]) == b"x\n"
    assert not combined["out.csv"].in_bucket


def test_shapes_too_long_for_the_listing_are_read_from_the_marker(tmp_path):
    outputs = {f"{number:06d}": {"wide.csv": b"c" * 7000 + b"\n1\n"} for number in range(3)}
    bucket, combined = new_way(tmp_path, outputs)

    assert combined["wide.csv"].in_bucket
    assert [call for call in bucket.calls if call[0] == "marker"] == [("marker", item_id) for item_id in sorted(outputs)]
    assert combined["wide.csv"].path.read_bytes() == old_way(tmp_path, outputs)["wide.csv"]


def test_left_in_the_bucket_when_not_downloaded(tmp_path):
    outputs = {"000000": {"out.csv": b"a\n1\n"}, "000001": {"out.csv": b"a\n2\n"}, "000002": {"odd.csv": b"b\n1\n"}}
    outputs["000003"] = {"odd.csv": b"c\n2\n"}  # differing headers: through the controller, then uploaded
    bucket, combined = new_way(tmp_path, outputs, download=False)

    assert {name: file.path for name, file in combined.items()} == {"odd.csv": None, "out.csv": None}
    assert bucket.objects[layout.combined("out.csv")] == b"a\n1\n2\n"
    assert bucket.objects[layout.combined("odd.csv")] == b"b\n1\nc\n2\n"
    assert not [call for call in bucket.calls if call[0] == "download"]
    assert not list(tmp_path.glob("new-way*"))


def test_temporaries_are_deleted_and_the_tree_has_at_most_32_sources_per_call(tmp_path):
    bucket = MemoryBucket()
    outputs = {f"{number:06d}": {"r.csv": b"h\n%d" % number} for number in range(2000)}  # no final newlines: a piece each
    for item_id, files in outputs.items():
        bucket.record_done(tmp_path, item_id, files)

    combined = combine.combine_outputs(bucket, sorted(outputs), tmp_path / "result")

    assert read(combined["r.csv"]) == old_way(tmp_path, outputs)["r.csv"]
    assert not [name for name in bucket.objects if name.startswith(layout.COMBINING)]
    composes = [call for call in bucket.calls if call[0] == "compose"]
    # 2,000 bodies, 1,999 newlines and a header: 4,000 sources, joined 32 at a time: 125 joins, 4 of those, 1 of those.
    assert len(composes) == 125 + 4 + 1
    assert bucket.calls.count(("list",)) == 1


def test_compose_tree_joins_in_order_and_records_its_temporaries_before_asking():
    objects = {f"s{number}": str(number).encode() + b"," for number in range(100)}
    made: list[str] = []

    def compose(sources, destination):
        assert len(sources) <= 4 and all(name in objects for name in sources)
        assert destination in made or destination == "final"
        objects[destination] = b"".join(objects[name] for name in sources)

    with ThreadPoolExecutor(4) as pool:
        compose_tree(compose, [f"s{number}" for number in range(100)], "final", lambda level, index: f"t{level}-{index}", pool, made,
                     fan_in=4)

    assert objects["final"] == b"".join(str(number).encode() + b"," for number in range(100))
    assert len(made) == 25 + 7 + 2


def test_a_failed_join_leaves_its_temporaries_named_for_deletion():
    made: list[str] = []

    def compose(sources, destination):
        raise OSError("refused")

    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError):
        compose_tree(compose, ["a", "b", "c"], "final", lambda level, index: f"t{level}-{index}", pool, made, fan_in=2)
    assert made == ["t1-0", "t1-1"]


def test_concat_plan_puts_the_header_once_and_newlines_only_where_missing():
    shapes = [("000000", OutputShape(4, False, "h\n")), ("000001", OutputShape(0, True)), ("000002", OutputShape(4, True, "h\r\n"))]
    plan = concat_plan("x.csv", shapes)
    assert plan is not None
    assert [(piece.kind, piece.item_id) for piece in plan] == [("header", None), ("body", "000000"), ("newline", None), ("body", "000002")]
    assert plan[0].header == b"h\n"
    assert concat_plan("x.csv", [("000000", OutputShape(4, True, "h\n")), ("000001", OutputShape(4, True, "g\n"))]) is None
    assert concat_plan("x.csv", [("000000", OutputShape(4, True))]) is None  # a header not kept apart


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a,b\n1,2\n", OutputShape(4, True, "a,b\n")),
        (b"a,b", OutputShape(0, False, "a,b")),
        (b"", OutputShape(0, True)),
        (b"\xff\xfe,b\n1\n", OutputShape(7, True)),  # not UTF-8: stays whole
        (b"h" * (MAX_HEADER_BYTES + 1) + b"\n1\n", OutputShape(MAX_HEADER_BYTES + 4, True)),  # too long: stays whole
        (b"h" * MAX_HEADER_BYTES, OutputShape(0, False, "h" * MAX_HEADER_BYTES)),
    ],
)
def test_shape_of_an_output(tmp_path, data, expected):
    path = tmp_path / "out.csv"
    path.write_bytes(data)
    shape = shape_output(path, keep_header_apart=True)
    assert shape == expected
    assert data[body_offset(shape):] == data[len((shape.header or "").encode()):]


def test_shapes_ride_in_the_listing_only_when_they_fit():
    small = {"output_shapes": shapes_to_json({"a.csv": OutputShape(3, True, "h\n")})}
    assert shapes_from_metadata(shapes_metadata(small)) == {"a.csv": OutputShape(3, True, "h\n")}
    wide = {"output_shapes": shapes_to_json({"a.csv": OutputShape(3, True, "h" * 7000 + "\n")})}
    assert shapes_metadata(wide) == {}
    assert shapes_from_metadata({}) is None
    assert shapes_from_metadata({"outputs": json.dumps({"a": {"size": -1, "newline": True}})}) is None
