"""cflow.launch: what a run prepares while the stack starts, the order of its records, and publishing beside the loop."""

import shutil
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from cflow import tasks
from cflow.errors import CloudError
from cflow.launch import BackgroundPublisher, Preparation, write_run_records


class Journal:
    """A RunStorage stand-in whose writes land in one journal, in the order they end."""

    def __init__(self, fail=None):
        self.entries = []
        self.fail = fail
        self.lock = threading.Lock()

    def _write(self, what):
        if what == self.fail:
            raise CloudError(f"{what} refused")
        with self.lock:
            self.entries.append(what)

    def upload_package(self, data):
        self._write("package")
        return "gs://b/package"

    def write_items(self, items):
        self._write("items")

    def write_manifest(self, manifest):
        self._write("run.json")

    def mark_published(self, count, now):
        self._write(("published", count))


def test_run_json_is_written_last_and_not_at_all_when_an_upload_fails():
    storage: Any = Journal()
    write_run_records(storage, b"tar", tasks.make_items([["a"]]), {"run_id": "r"})
    assert sorted(storage.entries[:2]) == ["items", "package"] and storage.entries[2] == "run.json"

    failing: Any = Journal(fail="items")
    with pytest.raises(CloudError):
        write_run_records(failing, b"tar", tasks.make_items([["a"]]), {"run_id": "r"})
    assert "run.json" not in failing.entries


def fake_scheduler(items, done=(), fail=None):
    published = []

    def publish_items(chosen):
        for item in chosen:
            if fail:
                raise fail
            published.append(item.id)
        return len(published)

    scheduler: Any = types.SimpleNamespace(items=items, done_ids=set(done), failed_ids=set(), publish_items=publish_items)
    return scheduler, published


def test_publisher_sends_the_unfinished_items_once_started_and_says_so_once():
    items = tasks.make_items([[str(number)] for number in range(5)])
    scheduler, published = fake_scheduler(items, done={"000001"})
    storage: Any = Journal()
    publisher = BackgroundPublisher(scheduler, storage, wall_clock=lambda: 7.0)
    assert publisher.news() is None and published == []

    publisher.start()
    publisher.start()  # once
    assert publisher.wait() == 4
    assert published == ["000000", "000002", "000003", "000004"]
    assert storage.entries == [("published", 4)]
    assert publisher.news() == "published 4 work item(s)"
    assert publisher.news() is None


def test_a_publishing_error_reaches_the_run_loop():
    scheduler, _published = fake_scheduler(tasks.make_items([["a"]]), fail=CloudError("the topic is gone"))
    storage: Any = Journal()
    publisher = BackgroundPublisher(scheduler, storage)
    publisher.start()
    with pytest.raises(CloudError, match="topic is gone"):
        publisher.wait()
    with pytest.raises(CloudError):
        publisher.news()


def project_folder(root, tasks_text):
    """A CFlow project folder with the worker scripts, task/t.sh and tasks.txt; returns its Config."""
    from cflow.config import load_config

    repo = Path(__file__).resolve().parents[2]
    for name in ("init.sh", "startup-signal.py", "shutdown-signal.py"):
        shutil.copy2(repo / name, root / name)
    (root / "task").mkdir()
    (root / "task" / "t.sh").write_text("echo\n")
    (root / "tasks.txt").write_text(tasks_text)
    (root / "const.py").write_text('TASK_MODULE_CMD = "bash task/t.sh"\n')
    return load_config(root / "const.py")


def test_preparation_builds_the_package_and_loads_the_items_beside_the_caller(tmp_path):
    config = project_folder(tmp_path, "a 1\nb 2\n")
    preparation = Preparation(config, resume=False)
    preparation.wait_for_imports()
    prepared = preparation.result()
    preparation.settle()

    assert prepared.package and prepared.items == [tasks.WorkItem("000000", 0, ("a", "1")), tasks.WorkItem("000001", 1, ("b", "2"))]
    assert Preparation(config, resume=True).result().package is None


def test_a_preparation_error_is_the_caller_s_when_it_asks(tmp_path):
    from cflow.errors import ConfigError

    preparation = Preparation(project_folder(tmp_path, "'unbalanced\n"), resume=False)
    with pytest.raises(ConfigError, match=r"tasks\.txt:1"):
        preparation.result()
