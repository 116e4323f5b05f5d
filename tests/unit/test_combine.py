"""cflow.combine.combine_concat against in-memory outputs."""

import io
import threading

import pytest

from cflow.combine import combine_concat


class FakeOutputs:
    """Outputs per item in a dict; records reads to check streaming order."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.reads = []

    def list_output_names(self, item_id):
        return list(self.outputs.get(item_id, {}))

    def read_output(self, item_id, name):
        self.reads.append((item_id, name))
        return self.outputs[item_id][name]


def combine(outputs, dest_dir, item_ids=None):
    fake = FakeOutputs(outputs)
    written = combine_concat(item_ids or list(outputs), fake.list_output_names, fake.read_output, dest_dir)
    return {name: path.read_bytes() for name, path in written.items()}, fake


def test_csv_header_is_kept_once(tmp_path):
    outputs = {
        "000000": {"out.csv": b"a,b\n1,2\n"},
        "000001": {"out.csv": b"a,b\n3,4\n5,6\n"},
        "000002": {"out.csv": b"a,b\r\n7,8\r\n"},  # CRLF header counts as the same header
    }
    result, _ = combine(outputs, tmp_path)
    assert result == {"out.csv": b"a,b\n1,2\n3,4\n5,6\n7,8\r\n"}


def test_plain_files_are_concatenated_whole_in_item_order(tmp_path):
    outputs = {
        "000002": {"log.txt": b"same first line\nthird\n"},
        "000000": {"log.txt": b"same first line\nfirst\n"},
        "000001": {"log.txt": b"same first line\nsecond\n"},
    }
    result, fake = combine(outputs, tmp_path, item_ids=["000000", "000001", "000002"])
    assert result["log.txt"] == b"same first line\nfirst\nsame first line\nsecond\nsame first line\nthird\n"
    assert [item for item, _ in fake.reads] == ["000000", "000001", "000002"]


def test_missing_trailing_newline_gets_one_between_files(tmp_path):
    outputs = {
        "000000": {"a.txt": b"one", "b.csv": b"h\n1"},
        "000001": {"a.txt": b"two", "b.csv": b"h\n2"},
        "000002": {"a.txt": b"three", "b.csv": b"h\n3"},
    }
    result, _ = combine(outputs, tmp_path)
    # The last file is left as it is: only a following file needs the separator.
    assert result == {"a.txt": b"one\ntwo\nthree", "b.csv": b"h\n1\n2\n3"}


def test_differing_csv_headers_keep_every_header(tmp_path):
    outputs = {
        "000000": {"out.csv": b"a,b\n1,2\n"},
        "000001": {"out.csv": b"a,b\n3,4"},
        "000002": {"out.csv": b"a,b\n5,6\n"},
        "000003": {"out.csv": b"x,y\n7,8\n"},
        "000004": {"out.csv": b"a,b\n9,9\n"},
    }
    result, fake = combine(outputs, tmp_path)
    assert result["out.csv"] == b"a,b\n1,2\na,b\n3,4\na,b\n5,6\nx,y\n7,8\na,b\n9,9\n"
    assert len(fake.reads) == 5  # each output is read once, even when headers are restored
    assert [path.name for path in tmp_path.iterdir()] == ["out.csv"]


def test_header_only_outputs(tmp_path):
    agreeing = {"000000": {"o.csv": b"h1,h2"}, "000001": {"o.csv": b"h1,h2"}, "000002": {"o.csv": b"h1,h2\nr\n"}}
    result, _ = combine(agreeing, tmp_path / "agree")
    assert result["o.csv"] == b"h1,h2\nr\n"
    differing = {"000000": {"o.csv": b"h"}, "000001": {"o.csv": b"h"}, "000002": {"o.csv": b"h"}, "000003": {"o.csv": b"k\n"}}
    result, _ = combine(differing, tmp_path / "differ")
    assert result["o.csv"] == b"h\nh\nh\nk\n"


def test_empty_outputs_and_items_without_a_file(tmp_path):
    outputs = {
        "000000": {"o.csv": b""},
        "000001": {"o.csv": b"a\n1\n", "extra.txt": b"x\n"},
        "000002": {},
        "000003": {"o.csv": b"a\n2\n"},
    }
    result, fake = combine(outputs, tmp_path)
    assert result == {"extra.txt": b"x\n", "o.csv": b"a\n1\n2\n"}
    assert ("000002", "o.csv") not in fake.reads


def test_only_csv_names_get_header_handling(tmp_path):
    outputs = {"000000": {"t.tsv": b"h\n1\n", "U.CSV": b"h\n1\n"}, "000001": {"t.tsv": b"h\n2\n", "U.CSV": b"h\n2\n"}}
    result, _ = combine(outputs, tmp_path)
    assert result == {"U.CSV": b"h\n1\n2\n", "t.tsv": b"h\n1\nh\n2\n"}


@pytest.mark.parametrize("parallel", [1, 3])
def test_memory_holds_at_most_parallel_copies(tmp_path, parallel):
    """Item k's copy is read only once all but the last ``parallel - 1`` copies before it are on disk."""
    copy_size = 256 * 1024
    on_disk_before_read = {}
    dest = tmp_path / "out"

    def read_output(item_id, name):
        temporaries = [path for path in dest.iterdir() if path.name.startswith(".cflow-combine-")]
        on_disk_before_read[int(item_id)] = sum(path.stat().st_size for path in temporaries)
        return item_id.encode()[-1:] * (copy_size - 1) + b"\n"

    ids = [f"{index:06d}" for index in range(8)]
    combine_concat(ids, lambda item_id: ["big.txt"], read_output, dest, parallel=parallel)
    # Allow for what a write buffer may still hold.
    for index, seen in on_disk_before_read.items():
        assert seen >= max(0, index - parallel + 1) * copy_size - io.DEFAULT_BUFFER_SIZE
    assert (dest / "big.txt").stat().st_size == 8 * copy_size


def test_reads_run_in_parallel_and_land_in_item_order(tmp_path):
    third_read_started = threading.Event()

    def read_output(item_id, name):
        if item_id == "000000":
            # The first read finishes only once the third has begun: they overlap.
            assert third_read_started.wait(10), "reads did not run in parallel"
        if item_id == "000002":
            third_read_started.set()
        return f"{item_id}\n".encode()

    ids = [f"{index:06d}" for index in range(5)]
    written = combine_concat(ids, lambda item_id: ["r.txt"], read_output, tmp_path, parallel=3)
    assert written["r.txt"].read_bytes() == b"".join(f"{i}\n".encode() for i in ids)


@pytest.mark.parametrize("bad_name", ["../escape.csv", "/abs.csv", "sub/dir.csv", "..", "", "nul\0.csv"])
def test_unsafe_names_are_rejected_before_anything_is_written(tmp_path, bad_name):
    outputs = {"000000": {"fine.csv": b"a\n"}, "000001": {bad_name: b"evil\n"}}
    with pytest.raises(ValueError, match="output file name"):
        combine(outputs, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []
    assert not (tmp_path / "escape.csv").exists()


def test_a_failing_read_leaves_no_partial_file(tmp_path):
    def read_output(item_id, name):
        if item_id == "000001":
            raise OSError("storage went away")
        return b"a\n"

    with pytest.raises(OSError, match="storage went away"):
        combine_concat(["000000", "000001"], lambda item_id: ["r.txt"], read_output, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_existing_result_is_replaced_and_dest_created(tmp_path):
    dest = tmp_path / "a" / "b"
    dest.mkdir(parents=True)
    (dest / "r.txt").write_bytes(b"old\n")
    written = combine_concat(["000000"], lambda item_id: ["r.txt"], lambda item_id, name: b"new\n", dest)
    assert written == {"r.txt": dest / "r.txt"}
    assert (dest / "r.txt").read_bytes() == b"new\n"
    assert combine_concat([], lambda item_id: [], None, tmp_path / "fresh") == {}
    assert (tmp_path / "fresh").is_dir()
