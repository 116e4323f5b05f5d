"""cflow.tasks: parsing, ids, item sources, messages, name checks; and cflow.demo_data."""

import csv
import io
import json
import random
import shlex
import sys
import textwrap
import time

import pytest

from cflow import demo_data, tasks
from cflow.config import load_config
from cflow.errors import ConfigError
from cflow.tasks import (
    MessageError,
    WorkItem,
    decode_message,
    encode_message,
    id_width,
    item_id,
    load_items,
    make_items,
    parse_tasks_text,
    validate_item_id,
    validate_output_name,
)


@pytest.fixture
def project(tmp_path):
    """A user's folder with task/task.sh; returns a loader of Config from a const.py body."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.sh").write_text("echo\n")

    def load(body, tasks_text=None):
        if tasks_text is not None:
            (tmp_path / "tasks.txt").write_bytes(tasks_text if isinstance(tasks_text, bytes) else tasks_text.encode())
        (tmp_path / "const.py").write_text(textwrap.dedent(body))
        return load_config(tmp_path / "const.py")

    load.dir = tmp_path  # an attribute of the fixture's function
    return load


# ---------------------------------------------------------------- parsing


def test_blank_and_comment_lines_are_skipped():
    text = "# header\n\n   \n  # indented comment\na b\n\tc\n"
    assert parse_tasks_text(text) == [["a", "b"], ["c"]]


def test_quotes_and_escapes_split_like_a_shell():
    text = textwrap.dedent(
        r"""
        'single quoted' "double quoted"
        a\ b c\"d
        "she said \"hi\"" 'it'\''s'
        "" x
        mixed"quo ted"word
        """
    )
    assert parse_tasks_text(text) == [
        ["single quoted", "double quoted"],
        ["a b", 'c"d'],
        ['she said "hi"', "it's"],
        ["", "x"],
        ["mixedquo tedword"],
    ]


def test_shell_metacharacters_reach_args_literally():
    text = "$(rm -rf /) ; | & > out `id` $HOME *.csv ~ 'a#b' x#y # not-a-comment\n"
    assert parse_tasks_text(text) == [
        ["$(rm", "-rf", "/)", ";", "|", "&", ">", "out", "`id`", "$HOME", "*.csv", "~", "a#b", "x#y", "#", "not-a-comment"]
    ]
    assert parse_tasks_text("'$(rm -rf /); echo pwned'\n") == [["$(rm -rf /); echo pwned"]]


def test_unicode_fields_and_line_endings():
    text = "\ufeffkafé 日本語 'emoji 🎉'\r\nsecond\u2028still-second\n"
    assert parse_tasks_text(text) == [["kafé", "日本語", "emoji 🎉"], ["second\u2028still-second"]]


@pytest.mark.parametrize("line", ["a 'b", 'a "b', "a b\\"])
def test_unsplittable_line_names_file_and_line(line):
    with pytest.raises(ConfigError) as caught:
        parse_tasks_text(f"# header\nok\n{line}\n", source="tasks.txt")
    message = str(caught.value)
    assert message.startswith("tasks.txt:3: cannot split the line into fields")
    assert "\n" not in message


def test_nul_in_a_line_is_refused():
    with pytest.raises(ConfigError, match=r"^tasks.txt:1: the line has a field with a NUL"):
        parse_tasks_text("a\0b\n", source="tasks.txt")


# ---------------------------------------------------------------- ids


def test_id_width_depends_only_on_count():
    assert id_width(0) == 6
    assert id_width(1) == 6
    assert id_width(1_000_000) == 6  # last index 999999 still fits
    assert id_width(1_000_001) == 7
    assert item_id(42, 125) == "000042"
    assert item_id(1_000_000, 1_000_001) == "1000000"
    assert item_id(5, 1_000_001) == "0000005"


def test_ids_are_stable_and_sort_in_item_order():
    first = make_items([["a"], ["b"], ["c"]] * 5)
    again = make_items([["a"], ["b"], ["c"]] * 5)
    assert first == again
    assert [item.id for item in first] == sorted(item.id for item in first)
    assert first[14] == WorkItem("000014", 14, ("c",))


# ---------------------------------------------------------------- sources


def test_load_items_from_a_file_relative_to_const(project, monkeypatch, tmp_path_factory):
    config = project("TASKS = 'tasks.txt'\n", tasks_text="# items\nx 1\n\ny '2 3'\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    assert load_items(config) == [WorkItem("000000", 0, ("x", "1")), WorkItem("000001", 1, ("y", "2 3"))]


def test_load_items_file_errors_name_the_file(project):
    config = project("TASKS = 'tasks.txt'\n", tasks_text="# only comments\n\n")
    with pytest.raises(ConfigError, match=r"tasks.txt: the tasks file has no items"):
        load_items(config)
    config = project("TASKS = 'tasks.txt'\n", tasks_text="ok\n'bad\n")
    with pytest.raises(ConfigError, match=r"tasks.txt:2: cannot split"):
        load_items(config)
    config = project("TASKS = 'tasks.txt'\n", tasks_text=b"caf\xe9\n")
    with pytest.raises(ConfigError, match=r"tasks.txt: the tasks file is not UTF-8 text"):
        load_items(config)


def test_load_items_from_a_list(project):
    config = project("TASKS = ['a b', ['c d', 'e'], '\"$(x)\"']\n", tasks_text="unused\n")
    assert [item.args for item in load_items(config)] == [("a", "b"), ("c d", "e"), ("$(x)",)]


def test_empty_list_has_no_items(project):
    config = project("TASKS = []\n")
    with pytest.raises(ConfigError, match=r"^const.py: TASKS is an empty list, so there are no items"):
        load_items(config)


def test_load_items_from_a_gcs_prefix(project):
    calls = []

    def list_objects(bucket, prefix):
        calls.append((bucket, prefix))
        return iter(["in/b.csv", "in/", "in/a.csv", "in/sub/c d.csv"])

    config = project("TASKS = 'gs://data-bucket/in/'\n")
    items = load_items(config, list_objects=list_objects)
    assert calls == [("data-bucket", "in/")]
    assert [item.args for item in items] == [
        ("gs://data-bucket/in/a.csv",),
        ("gs://data-bucket/in/b.csv",),
        ("gs://data-bucket/in/sub/c d.csv",),
    ]
    assert [item.id for item in items] == ["000000", "000001", "000002"]


def test_empty_gcs_prefix_and_missing_lister(project):
    config = project("TASKS = 'gs://data-bucket/in/'\n")
    with pytest.raises(ConfigError, match=r"TASKS prefix gs://data-bucket/in/ has no items"):
        load_items(config, list_objects=lambda bucket, prefix: ["in/"])
    with pytest.raises(TypeError):
        load_items(config)


# ---------------------------------------------------------------- messages


def test_message_layout():
    data, attributes = encode_message(WorkItem("000007", 7, ("a", "ü")), 1)
    assert json.loads(data.decode("utf-8")) == {"id": "000007", "index": 7, "args": ["a", "ü"]}
    assert "ü".encode() in data
    assert attributes == {"cflow_item": "000007", "cflow_attempt": "1"}


# Code points from every plane, quotes, whitespace and shell syntax; no NUL
# (argv cannot carry it) and no lone surrogates (not encodable as UTF-8).
SPECIAL_CHARACTERS = " \t\n\r'\"\\$`;|&<>(){}[]*?~#!%\u2028\u200b\ufeff"


def random_field(rng):
    characters = []
    for _ in range(rng.randrange(12)):
        kind = rng.random()
        if kind < 0.4:
            characters.append(rng.choice(SPECIAL_CHARACTERS))
        elif kind < 0.7:
            characters.append(chr(rng.randrange(1, 0x80)))
        else:
            code_point = rng.randrange(0x80, 0x110000)
            characters.append(chr(code_point if not 0xD800 <= code_point <= 0xDFFF else 0xE000))
    return "".join(characters)


def test_message_round_trip_of_random_items():
    rng = random.Random(1234)
    for _ in range(500):
        index = rng.randrange(10**7)
        item = WorkItem(item_id(index, index + 1), index, tuple(random_field(rng) for _ in range(rng.randrange(6))))
        attempt = rng.randrange(1, 1000)
        data, attributes = encode_message(item, attempt)
        assert isinstance(data, bytes)
        assert all(isinstance(key, str) and isinstance(value, str) for key, value in attributes.items())
        assert decode_message(data, attributes) == (item, attempt)


def test_round_trip_of_nasty_fields():
    args = ("$(rm -rf /)", "; | & > `id`", 'q"uo\'te', "new\nline", "\\back\\slash", "", "  spaced  ", "🎉\u2028")
    item = make_items([args])[0]
    assert decode_message(*encode_message(item, 3)) == (item, 3)


@pytest.mark.parametrize(
    "data, attributes, complaint",
    [
        (b"\xff\xfe", {"cflow_item": "000000", "cflow_attempt": "1"}, "not UTF-8 JSON"),
        (b"not json", {"cflow_item": "000000", "cflow_attempt": "1"}, "not UTF-8 JSON"),
        (b"[1, 2]", {"cflow_item": "000000", "cflow_attempt": "1"}, "keys id, index, args"),
        (b'{"id": "000000", "index": 0}', {"cflow_item": "000000", "cflow_attempt": "1"}, "keys id, index, args"),
        (b'{"id": "../x00", "index": 0, "args": []}', {"cflow_item": "../x00", "cflow_attempt": "1"}, "bad item id"),
        (b'{"id": "000001", "index": 0, "args": []}', {"cflow_item": "000001", "cflow_attempt": "1"}, "does not match"),
        (b'{"id": "000000", "index": true, "args": []}', {"cflow_item": "000000", "cflow_attempt": "1"}, "does not match"),
        (b'{"id": "000000", "index": 0, "args": [1]}', {"cflow_item": "000000", "cflow_attempt": "1"}, "list of strings"),
        (b'{"id": "000000", "index": 0, "args": "a"}', {"cflow_item": "000000", "cflow_attempt": "1"}, "list of strings"),
        (b'{"id": "000000", "index": 0, "args": []}', {"cflow_item": "000009", "cflow_attempt": "1"}, "cflow_item"),
        (b'{"id": "000000", "index": 0, "args": []}', {"cflow_item": "000000"}, "cflow_attempt"),
        (b'{"id": "000000", "index": 0, "args": []}', {"cflow_item": "000000", "cflow_attempt": "0"}, "cflow_attempt"),
        (b'{"id": "000000", "index": 0, "args": []}', {"cflow_item": "000000", "cflow_attempt": "-1"}, "cflow_attempt"),
        (b'{"id": "000000", "index": 0, "args": []}', None, "cflow_item"),
    ],
)
def test_garbage_messages_raise_a_clear_value_error(data, attributes, complaint):
    with pytest.raises(MessageError) as caught:
        decode_message(data, attributes)
    assert isinstance(caught.value, ValueError)
    assert complaint in str(caught.value)


def test_an_item_is_json_data_one_way_and_checked_the_other():
    item = WorkItem("000007", 7, ("a b", "ünï"))
    assert item.to_dict() == {"id": "000007", "index": 7, "args": ["a b", "ünï"]}
    assert WorkItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item
    with pytest.raises(MessageError, match="keys id, index, args"):
        WorkItem.from_dict({"id": "000007", "index": 7})
    with pytest.raises(MessageError, match="does not match"):
        WorkItem.from_dict({"id": "000007", "index": 8, "args": []})


@pytest.mark.parametrize("attempt", [0, -1, True, "1", 1.0])
def test_encode_refuses_bad_attempts(attempt):
    with pytest.raises(ValueError):
        encode_message(WorkItem("000000", 0, ()), attempt)


def test_encode_refuses_oversized_items():
    with pytest.raises(ValueError, match="Pub/Sub allows"):
        encode_message(WorkItem("000000", 0, ("x" * 10_000_001,)), 1)


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\\b", "a\0b", "a\nb", "tab\tname", "bell\x07", "del\x7f", "x" * 256, "\ud800", 3, None],
)
def test_unsafe_output_names_are_rejected(name):
    with pytest.raises(ValueError, match="output file name"):
        validate_output_name(name)


@pytest.mark.parametrize("name", ["out.csv", "result.part-1.txt", ".hidden", "..dots", "naïve 結果.csv", "x" * 255])
def test_safe_output_names_pass(name):
    assert validate_output_name(name) == name


@pytest.mark.parametrize("value", ["000000", "1234567"])
def test_item_ids_pass(value):
    assert validate_item_id(value) == value


@pytest.mark.parametrize("value", ["", "12345", "../000000", "00000a", "٠١٢٣٤٥", "000000\n", 7])
def test_bad_item_ids_are_rejected(value):
    with pytest.raises(ValueError):
        validate_item_id(value)


# ---------------------------------------------------------------- demo data


def test_demo_shards_are_deterministic_and_seeded():
    assert demo_data.make_shards(count=5, rows=20) == demo_data.make_shards(count=5, rows=20)
    assert demo_data.make_shards(count=5, rows=20, seed=8) != demo_data.make_shards(count=5, rows=20)
    # A shard's bytes do not depend on how many shards are made.
    few = demo_data.make_shards(count=3, rows=20)
    many = demo_data.make_shards(count=30, rows=20)
    assert few["shards/part-002.csv"] == many["shards/part-002.csv"]


def test_demo_shards_format_and_relation():
    shards = demo_data.make_shards()
    assert len(shards) == 125
    assert next(iter(shards)) == "shards/part-000.csv" and list(shards)[-1] == "shards/part-124.csv"
    for data in list(shards.values())[:3]:
        rows = list(csv.reader(io.StringIO(data.decode("ascii"))))
        assert rows[0] == ["x1", "x2", "x3", "y"]
        assert len(rows) == 401
        assert data.endswith(b"\n")
        for x1, x2, x3, y in (map(float, row) for row in rows[1:]):
            expected = demo_data.INTERCEPT + sum(c * x for c, x in zip(demo_data.COEFFICIENTS, (x1, x2, x3)))
            assert abs(y - expected) < 6 * demo_data.NOISE_SD


# ---------------------------------------------------------------- naming an item in messages


def test_an_item_is_named_by_its_id_and_its_fields():
    assert tasks.item_label("000149", ["poison-0"]) == "000149 (poison-0)"
    assert tasks.item_label("000001", ["a b", "c"]) == "000001 ('a b' c)"  # one field with a space reads as one
    assert tasks.item_label("000002", []) == "000002"
    assert tasks.WorkItem("000003", 3, ("x",)).label == "000003 (x)"


def test_long_fields_keep_their_start_and_their_end_around_an_ellipsis():
    shown = tasks.short_fields(["gs://cflow-local-cflow/cflow/demo/shards/part-007.csv"])

    assert len(shown) == tasks.FIELDS_SHOWN_CHARS
    assert shown.startswith("gs://cflow-") and shown.endswith("/shards/part-007.csv") and "\u2026" in shown


def test_control_characters_in_fields_never_break_a_line():
    shown = tasks.short_fields(["line\nbreak", "tab\there", "\x1b[31mred"])

    assert "\n" not in shown and "\t" not in shown and "\x1b" not in shown
    assert "line\\nbreak" in shown


# ---------------------------------------------------------------- the compact item list


def test_an_item_list_is_the_items_a_list_of_work_items_would_be():
    arg_lists = [["a b", "c"], [""], [], ["ünï", "日本語"], ["x"] * 3]
    items = make_items(arg_lists)
    expected = [WorkItem(tasks.item_id(index, 5), index, tuple(args)) for index, args in enumerate(arg_lists)]
    assert items == expected and expected == items and list(items) == expected
    assert [items[index] for index in range(5)] == expected and items[-1] == expected[-1]
    assert items[1:3] == expected[1:3]
    assert len(items) == 5 and items != expected[:4]
    with pytest.raises(IndexError):
        items[5]
    with pytest.raises(TypeError):
        hash(items)


def test_an_item_list_refuses_a_nul_and_knows_its_ids_without_a_string_each():
    with pytest.raises(ValueError, match="NUL"):
        tasks.ItemList([["a\0b"]])
    items = make_items([[str(number)] for number in range(1001)])
    assert "000000" in items.ids and "001000" in items.ids
    assert "001001" not in items.ids and "1000" not in items.ids and "00100a" not in items.ids and 5 not in items.ids
    assert list(items.ids) == [item.id for item in items]
    assert tasks.ids_of(items) is not None and "000999" in tasks.ids_of(list(items))


def test_plain_lines_split_as_shlex_splits_them():
    chooser = random.Random(7)
    alphabet = "ab#$()|;&*?~=\u00a0\u2028\x0b\x0c\x1c\x85é \t\t  \r"
    for _ in range(3000):
        line = "".join(chooser.choice(alphabet) for _ in range(chooser.randint(1, 12)))
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            assert parse_tasks_text(line) == []
        else:
            assert parse_tasks_text(line) == [shlex.split(line, comments=False, posix=True)], repr(line)


def test_a_million_lines_load_in_seconds_into_tens_of_megabytes(project):
    config = project('TASKS = "tasks.txt"\n', "".join(f"input-{number:07d}.csv {number}\n" for number in range(1_000_000)))
    started = time.process_time()
    items = load_items(config)
    assert time.process_time() - started < 20  # shlex took ~17 s alone (2 cores, loaded); this takes ~2.5 s
    assert len(items) == 1_000_000 and items[999_999] == WorkItem("999999", 999_999, ("input-0999999.csv", "999999"))
    assert sys.getsizeof(items._data) + sys.getsizeof(items._ends) < 40 * 2**20


def test_item_of_finds_an_item_by_id_in_an_item_list_and_in_a_plain_sequence():
    items = tasks.make_items([["a"], ["b", "c"], ["d"]])
    assert tasks.item_of(items, items[1].id) == tasks.WorkItem(items[1].id, 1, ("b", "c"))
    plain = list(items)
    assert tasks.item_of(plain, items[2].id).args == ("d",)
    for missing in ("000003", "1", "x"):
        with pytest.raises(KeyError):
            tasks.item_of(items, missing)
        with pytest.raises(KeyError):
            tasks.item_of(plain, missing)
