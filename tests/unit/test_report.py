"""report.html from data: the figures it shows, one row per VM and one bar per attempt, and staying small at scale."""

import html.parser
import re
from typing import Any

from cflow import report
from cflow.history import AttemptSpan, VmRecord
from cflow.protocol import EventKind
from cflow.report import FailedRow, ReportInput, compute_figures, render

T = 1_764_000_000.0
RUN = "1130-1412-a1b2"


def vm(number, created, gone, spot=True, preempted=None, machine_type="e2-small"):
    return VmRecord(f"cflow-worker-{RUN}-{number:04d}", "us-central1-a", machine_type, spot, created=created,
                    first_seen=created + 1, running=created + 2, preempted=preempted, gone=gone)


def small_run(**changes: Any) -> ReportInput:
    """3 VMs (one preempted, one standard), 5 items: done, preempted then done elsewhere, retried then failed, a duplicate."""
    vms = [vm(1, T, T + 60), vm(2, T, T + 25, preempted=T + 20), vm(3, T + 24, T + 64, spot=False)]
    spans = [
        AttemptSpan("000000", 1, vms[0].name, T + 4, T + 9, EventKind.DONE),
        AttemptSpan("000001", 1, vms[1].name, T + 5, T + 20, EventKind.PREEMPTED),
        AttemptSpan("000002", 1, vms[0].name, T + 10, T + 12, EventKind.RETRY),
        AttemptSpan("000002", 2, vms[0].name, T + 12, T + 15, EventKind.FAILED),
        AttemptSpan("000003", 1, vms[0].name, T + 15, T + 31, EventKind.DONE),
        AttemptSpan("000001", 1, vms[2].name, T + 29, T + 50, EventKind.DONE),
        AttemptSpan("000004", 1, vms[0].name, T + 31, T + 40, EventKind.DONE),
        AttemptSpan("000004", 1, vms[2].name, T + 50, T + 55, EventKind.DUPLICATE),
    ]
    labels = {"000000": "000000 (echo fine)", "000001": "000001 (slow rendezvous)", "000002": "000002 (poison bad)",
              "000003": "000003 (echo 3)", "000004": "000004 (echo 4)"}
    fields: dict[str, Any] = dict(
        run_id=RUN, state="finished", source=f"gs://b/cflow/runs/{RUN}/", created=T, generated=T + 70, total_items=5,
        done_times={"000000": T + 9, "000001": T + 50, "000003": T + 31, "000004": T + 40},
        failed=[FailedRow("000002", labels["000002"], 2, "exit status 7", "/stack/gcs/b/cflow/runs/x/logs/000002/attempt-2.log")],
        failed_count=1, labels=labels, spans=spans, vms=vms,
        prices={"e2-small": {"standard": 0.0168, "spot": 0.005}}, machine_type="e2-small", spot=True,
    )
    fields.update(changes)
    return ReportInput(**fields)


class Page(html.parser.HTMLParser):
    """The elements of a rendered page that the tests look at."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.bars, self.titles, self.scripts_with_src, self.links = [], [], [], [], []
        self._open_title = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "g" and "vm-row" in classes:
            self.rows.append(attrs)
        if tag == "rect" and "bar" in classes:
            self.bars.append(attrs)
            self._open_title = attrs
        if tag == "script" and attrs.get("src"):
            self.scripts_with_src.append(attrs["src"])
        if tag in ("link", "img", "iframe"):
            self.links.append(tag)

    def handle_data(self, data):
        if self._open_title is not None and self.lasttag == "title":
            self.titles.append(data)
            self._open_title = None


def test_figures_count_vm_time_by_where_it_went_and_cost_by_machine_type():
    figures = compute_figures(small_run())

    assert figures.attempts == 8
    assert figures.retries == 1
    assert figures.preemptions == 1
    assert figures.vm_seconds == 60 + 25 + 40
    assert figures.busy == 5 + 15 + 2 + 3 + 16 + 21 + 9 + 5
    assert figures.lost_to_preemption == 15
    assert figures.boot == 4 + 5 + 5  # created -> first task, per VM
    assert figures.idle == figures.vm_seconds - figures.busy - figures.boot
    spot, standard = figures.costs
    assert (spot.spot, spot.vms, spot.seconds) == (True, 2, 85)
    assert (standard.spot, standard.vms, standard.seconds) == (False, 1, 40)
    assert figures.cost is not None and abs(figures.cost - (85 / 3600 * 0.005 + 40 / 3600 * 0.0168)) < 1e-12
    assert figures.efficiency == figures.busy / figures.vm_seconds


def test_timeline_has_one_row_per_vm_and_one_bar_per_attempt_with_its_item_attempt_and_duration():
    data = small_run()
    page = Page(render(data))

    assert [row["data-vm"] for row in page.rows] == [record.name for record in data.vms]
    assert len(page.bars) == len(data.spans)
    assert sorted(bar["data-outcome"] for bar in page.bars) == sorted(
        ["done", "preempted", "retry", "failed", "done", "done", "done", "duplicate"])
    preempted = next(title for title in page.titles if "preempted" in title)
    assert preempted.startswith("000001 (slow rendezvous) · attempt 1 · 15.0 s · handed back: preempted")
    assert [row["class"].split()[-1] for row in page.rows] == ["spot", "spot", "standard"]


def test_page_is_self_contained_and_names_failures_by_their_fields_with_their_log():
    text = render(small_run())

    assert Page(text).scripts_with_src == [] and Page(text).links == []
    assert "@import" not in text and "url(http" not in text
    assert "000002 (poison bad)" in text and "exit status 7" in text
    assert 'href="file:///stack/gcs/b/cflow/runs/x/logs/000002/attempt-2.log"' in text
    assert "preemption" in text and "handed back: preempted" in text  # the legend


def test_fields_are_escaped():
    labels = {"000000": "000000 ('<script>alert(1)</script>')"}
    spans = [AttemptSpan("000000", 1, "vm-1", T, T + 1, EventKind.DONE)]
    text = render(small_run(labels=labels, spans=spans, vms=[], done_times={"000000": T + 1}, failed=[], failed_count=0))

    assert "<script>alert(1)" not in text
    assert "&lt;script&gt;alert(1)" in text


def test_a_vm_missing_from_the_history_still_gets_its_row():
    data = small_run(vms=[])
    figures = compute_figures(data)

    assert sorted(life.record.name for life in figures.lives) == sorted({span.vm for span in data.spans})
    assert len(Page(render(data)).rows) == 3


def test_a_run_still_going_ends_its_axis_now_and_keeps_live_vms_to_now():
    data = small_run(state="in progress", generated=T + 100, vms=[vm(1, T, None)], spans=[])

    figures = compute_figures(data)

    assert figures.end == T + 100
    assert figures.lives[0].end == T + 100
    assert figures.idle == 100 - figures.boot


def many_vms(count, attempts_per_vm, trouble_every=50):
    vms, spans, labels, done = [], [], {}, {}
    for n in range(count):
        record = vm(n + 1, T + n * 0.01, T + 3600, preempted=T + 1800 if n % trouble_every == 0 else None)
        vms.append(record)
        for k in range(attempts_per_vm):
            item = f"{n * attempts_per_vm + k:06d}"
            labels[item] = f"{item} (gs://bucket/inputs/shard-{item}.csv)"
            start = T + 60 + k * (3000 / attempts_per_vm)
            spans.append(AttemptSpan(item, 1, record.name, start, start + 3000 / attempts_per_vm - 0.05, EventKind.DONE))
            done[item] = start + 3000 / attempts_per_vm
    return small_run(vms=vms, spans=spans, labels=labels, done_times=done, total_items=len(done), failed=[], failed_count=0)


def test_beyond_a_screen_of_vms_rows_are_sampled_with_every_troubled_vm_and_the_page_says_so():
    data = many_vms(1000, 10)

    text = render(data)
    page = Page(text)

    assert len(page.rows) == report.MAX_ROWS
    shown = {row["data-vm"] for row in page.rows}
    assert {record.name for record in data.vms if record.preempted is not None} <= shown
    assert re.search(r"Showing 100 of 1,000 VMs: 20 with a preemption or a failure", text)
    assert f'data-vms="{len(data.vms)}"' in text


def test_ten_thousand_items_merge_into_fewer_bars_and_stay_under_2_mb():
    data = many_vms(100, 100)  # 10,000 attempts on 100 VMs

    text = render(data)
    page = Page(text)

    assert len(text.encode()) < 2_000_000
    assert len(page.bars) <= report.MAX_BARS
    assert "10,000 attempts are drawn as" in text
    merged = sum(int(bar.get("data-merged", 1)) for bar in page.bars)
    assert merged == 10_000  # every attempt is in exactly one bar


def test_throughput_bins_are_round_and_few_enough_to_hold_items():
    assert report.throughput_bin_seconds(3600, 10_000) == 60  # 60 bins of a minute
    assert report.throughput_bin_seconds(60, 4) == 10  # at least 6 bins
    assert report.throughput_bin_seconds(600, 10) == 60  # ~2 items a bin
