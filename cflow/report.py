"""The run's report.html: one self-contained page that shows a run at a glance.

``render(ReportInput) -> str`` is pure: data in, HTML text out, no Google
imports and no network (inline CSS and SVG, one small script). What it shows:

- a summary header: items done and failed, attempts, retries, preemptions,
  VMs, VM time by machine type and Spot/standard, estimated cost, and where
  the VM time went (busy, lost to preemption, boot, idle: ``Figures``);
- a timeline: one row per VM (Spot or standard marked) with one bar per
  attempt from its start to its end, coloured by how it ended, the VM's life
  behind it, its boot hatched, and its creation, preemption and deletion
  marked; each bar's title names the item's fields, the attempt and its
  duration;
- throughput (items done per minute) and workers alive over time, on the
  timeline's time axis;
- the failed items (fields, attempts, reason, log) and the slowest items.

It stays readable and small at any size: beyond ``MAX_ROWS`` VMs the
timeline shows a sample of rows (every VM with a preemption or a failure
first), beyond ``MAX_BARS`` bars it merges neighbouring bars of the same
outcome, and it says so on the page; charts are binned. The data is gathered
by ``cflow.ops.report`` through the run view.
"""

import dataclasses
import datetime
import html
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from cflow.history import AttemptSpan, VmRecord
from cflow.protocol import EventKind

MAX_ROWS = 100
MAX_BARS = 4000
MAX_TABLE_ROWS = 200
SLOWEST_SHOWN = 10
THROUGHPUT_BINS = 60
WORKER_SAMPLES = 300

# Layout of the time charts, in SVG user units (the SVG scales to the page's width).
CHART_WIDTH = 1120
LABEL_WIDTH = 170
PLOT_LEFT = LABEL_WIDTH
PLOT_WIDTH = CHART_WIDTH - PLOT_LEFT - 16


@dataclasses.dataclass(frozen=True)
class OutcomeStyle:
    """How one kind of attempt ending is drawn and named."""

    css: str
    name: str
    colour: str  # Okabe-Ito palette: distinguishable with the common colour-vision deficiencies
    pattern: str | None = None


OUTCOMES: dict[EventKind, OutcomeStyle] = {
    EventKind.DONE: OutcomeStyle("done", "done", "#0072B2"),
    EventKind.RETRY: OutcomeStyle("retry", "failed, retried", "#D55E00", "stripes"),
    EventKind.FAILED: OutcomeStyle("failed", "failed for good", "#D55E00", "cross"),
    EventKind.PREEMPTED: OutcomeStyle("preempted", "handed back: preempted", "#E69F00"),
    EventKind.INTERRUPTED: OutcomeStyle("interrupted", "handed back: stopped", "#CC79A7"),
    EventKind.DUPLICATE: OutcomeStyle("duplicate", "duplicate or backup copy stopped", "#8C8C8C"),
}


@dataclasses.dataclass(frozen=True)
class FailedRow:
    """One failed item for the report's table."""

    item_id: str
    label: str  # id and shortened fields
    attempts: int | None
    reason: str
    log: str | None  # a file path, a `cflow logs` command, or a gs:// URL


@dataclasses.dataclass(frozen=True)
class ReportInput:
    """Everything the report shows, gathered from what the run keeps in Cloud Storage.

    Attributes:
        run_id, state: the run and its state ("finished", "cancelled", "in progress").
        source: the run's folder (``gs://BUCKET/cflow/runs/RUN_ID/``).
        created: when the run started (run.json), epoch seconds, if known.
        generated: when the report is made (the end of the time axis for a run still going).
        total_items: the run's item count.
        done_times: ``{item id: epoch seconds it was recorded done}``.
        failed: the failed items, in item order (``failed_count`` may be more).
        failed_count: how many items failed for good.
        labels: ``{item id: id and shortened fields}`` (``cflow.tasks.item_label``).
        spans: every attempt's span (``cflow.history.AttemptSpan``).
        vms: the VM history (``cflow.history.VmRecord``), possibly empty.
        prices: PRICES of the run: ``{machine type: {"standard": USD/h, "spot": USD/h}}``.
        machine_type, spot: the run's worker shape, for VMs the history does not know.
    """

    run_id: str
    state: str
    source: str
    created: float | None
    generated: float
    total_items: int
    done_times: Mapping[str, float]
    failed: Sequence[FailedRow]
    failed_count: int
    labels: Mapping[str, str]
    spans: Sequence[AttemptSpan]
    vms: Sequence[VmRecord]
    prices: Mapping[str, Mapping[str, float]]
    machine_type: str
    spot: bool


# ---------------------------------------------------------------- the figures


@dataclasses.dataclass
class VmLife:
    """One VM on the timeline: its record, when it lived, and its attempts."""

    record: VmRecord
    start: float
    end: float
    spans: list[AttemptSpan]

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)

    @property
    def busy(self) -> float:
        return sum(_clipped(span, self.start, self.end) for span in self.spans)

    @property
    def lost_to_preemption(self) -> float:
        return sum(_clipped(span, self.start, self.end) for span in self.spans if span.outcome == EventKind.PREEMPTED)

    @property
    def boot(self) -> float:
        """From when it was asked for until its first task started (its whole life if it never ran one)."""
        first = min((span.started for span in self.spans), default=self.end)
        return min(max(first - self.start, 0.0), self.seconds)

    @property
    def has_trouble(self) -> bool:
        return self.record.preempted is not None or any(span.outcome != EventKind.DONE for span in self.spans)


def _clipped(span: AttemptSpan, start: float, end: float) -> float:
    return max(min(span.ended, end) - max(span.started, start), 0.0)


@dataclasses.dataclass
class CostLine:
    """VM time and cost of one machine type and provisioning model."""

    machine_type: str
    spot: bool
    vms: int = 0
    seconds: float = 0.0
    hourly: float | None = None

    @property
    def cost(self) -> float | None:
        return None if self.hourly is None else self.seconds / 3600 * self.hourly


@dataclasses.dataclass
class Figures:
    """The numbers the report shows, computed once from a ``ReportInput``."""

    start: float
    end: float
    lives: list[VmLife]
    attempts: int
    retries: int
    preemptions: int
    vm_seconds: float
    busy: float
    lost_to_preemption: float
    boot: float
    idle: float
    costs: list[CostLine]

    @property
    def cost(self) -> float | None:
        known = [line.cost for line in self.costs if line.cost is not None]
        return sum(known) if known else None

    @property
    def efficiency(self) -> float | None:
        return self.busy / self.vm_seconds if self.vm_seconds > 0 else None


def compute_figures(data: ReportInput) -> Figures:
    """The report's numbers: time range, each VM's life, VM time and where it went, cost."""
    spans_by_vm: dict[str, list[AttemptSpan]] = defaultdict(list)
    for span in sorted(data.spans, key=lambda span: span.started):
        spans_by_vm[span.vm].append(span)
    records = {record.name: record for record in data.vms}
    for vm, spans in spans_by_vm.items():
        if vm not in records:  # a VM the history does not know (it was never written, or an older run)
            records[vm] = VmRecord(vm, "", data.machine_type, data.spot, first_seen=spans[0].started, gone=max(s.ended for s in spans))
    times = [t for record in records.values() for t in (record.born, record.gone) if t is not None]
    times += [t for span in data.spans for t in (span.started, span.ended)]
    times += list(data.done_times.values())
    start = min([data.created, *times] if data.created is not None else times, default=data.generated)
    going = data.state == "in progress"
    end = data.generated if going else max(times, default=data.generated)
    end = max(end, start + 1.0)
    lives = []
    for record in records.values():
        spans = spans_by_vm.get(record.name, [])
        born = record.born if record.born is not None else (spans[0].started if spans else start)
        gone = record.gone if record.gone is not None else (end if going or not spans else max(s.ended for s in spans))
        lives.append(VmLife(record, born, max(gone, born), spans))
    lives.sort(key=lambda life: (life.start, life.record.name))
    costs: dict[tuple[str, bool], CostLine] = {}
    for life in lives:
        key = (life.record.machine_type or data.machine_type, life.record.spot)
        line = costs.setdefault(key, CostLine(*key, hourly=_price(data.prices, *key)))
        line.vms += 1
        line.seconds += life.seconds
    preempted_vms = {life.record.name for life in lives if life.record.preempted is not None}
    preempted_vms |= {span.vm for span in data.spans if span.outcome == EventKind.PREEMPTED}
    vm_seconds = sum(life.seconds for life in lives)
    busy = sum(life.busy for life in lives)
    boot = sum(life.boot for life in lives)
    return Figures(
        start=start,
        end=end,
        lives=lives,
        attempts=len(data.spans),
        retries=sum(1 for span in data.spans if span.outcome == EventKind.RETRY),
        preemptions=len(preempted_vms),
        vm_seconds=vm_seconds,
        busy=busy,
        lost_to_preemption=sum(life.lost_to_preemption for life in lives),
        boot=boot,
        idle=max(vm_seconds - busy - boot, 0.0),
        costs=sorted(costs.values(), key=lambda line: (line.machine_type, not line.spot)),
    )


def _price(prices: Mapping[str, Mapping[str, float]], machine_type: str, spot: bool) -> float | None:
    entry = prices.get(machine_type)
    if not entry:
        return None
    price = entry.get("spot" if spot else "standard")
    return float(price) if isinstance(price, int | float) else None


# ---------------------------------------------------------------- text


def _duration(seconds: float) -> str:
    """``850 ms``, ``42.1 s``, ``3 min 05 s``, ``2 h 03 min``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _clock(epoch: float, with_date: bool = False) -> str:
    moment = datetime.datetime.fromtimestamp(epoch).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z" if with_date else "%H:%M:%S")


def _offset(seconds: float) -> str:
    """An axis label: ``0:45``, ``12:30``, ``1:05:00`` from the run's start."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _money(amount: float | None) -> str:
    if amount is None:
        return "no price"
    if amount == 0:
        return "$0"
    if amount < 0.0001:
        return "< $0.0001"
    return f"${amount:,.4f}" if amount < 10 else f"${amount:,.2f}"


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _n(value: float) -> str:
    """A coordinate, short."""
    return f"{value:.1f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------- the time axis


@dataclasses.dataclass(frozen=True)
class TimeAxis:
    """Maps epoch seconds onto the plot's x (shared by the timeline and the charts)."""

    start: float
    end: float

    def x(self, epoch: float) -> float:
        fraction = (epoch - self.start) / (self.end - self.start)
        return PLOT_LEFT + min(max(fraction, 0.0), 1.0) * PLOT_WIDTH

    @property
    def seconds_per_unit(self) -> float:
        return (self.end - self.start) / PLOT_WIDTH

    def ticks(self) -> list[float]:
        """Round offsets from the start, about 8 of them."""
        span = self.end - self.start
        steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]
        step = next((s for s in steps if span / s <= 9), 86400 * math.ceil(span / 86400 / 9))
        return [offset for offset in range(0, int(span) + 1, step)]

    def grid(self, top: float, bottom: float, labels: bool) -> str:
        parts = []
        for offset in self.ticks():
            x = _n(self.x(self.start + offset))
            parts.append(f'<line class="grid" x1="{x}" x2="{x}" y1="{_n(top)}" y2="{_n(bottom)}"/>')
            if labels:
                parts.append(f'<text class="tick" x="{x}" y="{_n(bottom + 14)}" text-anchor="middle">{_offset(offset)}</text>')
        return "".join(parts)


# ---------------------------------------------------------------- the timeline


@dataclasses.dataclass
class Bar:
    """One drawn bar: an attempt, or neighbouring attempts of one outcome merged."""

    started: float
    ended: float
    outcome: EventKind
    spans: list[AttemptSpan]


def _sample_rows(lives: list[VmLife], limit: int) -> tuple[list[VmLife], str | None]:
    """The rows to draw, in creation order, and a note when they are a sample."""
    if len(lives) <= limit:
        return lives, None
    trouble = [index for index, life in enumerate(lives) if life.has_trouble][: limit // 2]
    picked = set(trouble)
    others = [index for index in range(len(lives)) if index not in picked]
    room = limit - len(trouble)
    step = len(others) / room if room else math.inf
    sampled = {others[int(k * step)] for k in range(room)} if room else set()
    chosen = sorted(set(trouble) | sampled)
    note = (f"Showing {len(chosen):,} of {len(lives):,} VMs: {len(trouble):,} with a preemption or a failure"
            f" and every {step:.0f}th of the others. The charts and the summary count every VM.")
    return [lives[index] for index in chosen], note


def _bars(rows: list[VmLife], axis: TimeAxis, limit: int) -> tuple[dict[str, list[Bar]], str | None]:
    """Each row's bars, merging neighbours of one outcome (closer than a growing gap) until at most ``limit`` remain."""
    bars = {life.record.name: [Bar(s.started, s.ended, s.outcome, [s]) for s in life.spans] for life in rows}
    total = sum(len(row) for row in bars.values())
    if total <= limit:
        return bars, None
    attempts = total
    gap_units = 1.0
    while total > limit:
        gap = gap_units * axis.seconds_per_unit
        for name, row in bars.items():
            merged: list[Bar] = []
            for bar in row:
                last = merged[-1] if merged else None
                if last is not None and last.outcome == bar.outcome and bar.started - last.ended <= gap:
                    last.ended = max(last.ended, bar.ended)
                    last.spans.extend(bar.spans)
                else:
                    merged.append(bar)
            bars[name] = merged
        total = sum(len(row) for row in bars.values())
        gap_units *= 2
    return bars, (f"{attempts:,} attempts are drawn as {total:,} bars: neighbouring attempts of one outcome "
                  "closer than a few pixels are merged (hover a bar for what it holds).")


def _bar_title(bar: Bar, labels: Mapping[str, str]) -> str:
    style = OUTCOMES[bar.outcome]
    if len(bar.spans) == 1:
        span = bar.spans[0]
        return (f"{labels.get(span.item, span.item)} · attempt {span.attempt} · {_duration(span.seconds)} · {style.name}\n"
                f"{_clock(span.started)}–{_clock(span.ended)} on {span.vm}")
    first, last = bar.spans[0], bar.spans[-1]
    return (f"{len(bar.spans)} attempts, {style.name} · items {first.item} … {last.item}\n"
            f"{_clock(bar.started)}–{_clock(bar.ended)} on {first.vm}")


def _short_vm_name(name: str, run_id: str) -> str:
    """``cflow-worker-0612-1530-ab12-0003`` -> ``worker 0003``: the run's id says nothing on its own rows."""
    marker = f"-{run_id}-"
    if marker in name:
        prefix, number = name.split(marker, 1)
        return f"{prefix.rsplit('-', 1)[-1]} {number}"
    return name if len(name) <= 22 else name[:10] + "…" + name[-11:]


def render_timeline(data: ReportInput, figures: Figures, axis: TimeAxis) -> tuple[str, list[str]]:
    """The timeline's SVG and the notes about sampling and merging."""
    rows, row_note = _sample_rows(figures.lives, MAX_ROWS)
    bars, bar_note = _bars(rows, axis, MAX_BARS)
    row_height = max(10.0, min(26.0, 640.0 / max(len(rows), 1)))
    bar_height = max(row_height - (8 if row_height > 16 else 3), 4.0)
    top = 8.0
    height = top + row_height * len(rows) + 24
    parts = [f'<svg class="timeline" viewBox="0 0 {CHART_WIDTH} {_n(height)}" role="img" '
             f'aria-label="Timeline: one row per VM, one bar per attempt" data-rows="{len(rows)}" '
             f'data-vms="{len(figures.lives)}">', axis.grid(top, top + row_height * len(rows), labels=True)]
    name_size = min(12.0, row_height - 1)
    for index, life in enumerate(rows):
        record = life.record
        y = top + index * row_height
        middle = y + row_height / 2
        kind = "spot" if record.spot else "standard"
        vm_title = (f"{record.name} · {'Spot' if record.spot else 'standard'} {record.machine_type} {record.zone}".rstrip()
                    + f"\nlived {_duration(life.seconds)}: {_clock(life.start)}–{_clock(life.end)}"
                    + (f", preempted at {_clock(record.preempted)}" if record.preempted is not None else "")
                    + f"\nbusy {_percent(life.busy, life.seconds)}, boot {_duration(life.boot)}, {len(life.spans)} attempt(s)")
        parts.append(f'<g class="vm-row {kind}" data-vm="{_e(record.name)}"><title>{_e(vm_title)}</title>')
        if index % 2:
            parts.append(f'<rect class="stripe" x="0" y="{_n(y)}" width="{CHART_WIDTH}" height="{_n(row_height)}"/>')
        parts.append(f'<text class="vm-name" x="8" y="{_n(middle + name_size / 3)}" style="font-size:{_n(name_size)}px">'
                     f'{_e(_short_vm_name(record.name, data.run_id))}</text>')
        badge_y = middle - min(row_height - 6, 14) / 2
        badge_h = min(row_height - 6, 14)
        parts.append(f'<rect class="badge {kind}" x="{PLOT_LEFT - 46}" y="{_n(badge_y)}" width="38" height="{_n(badge_h)}" rx="3"/>')
        if badge_h >= 9:
            parts.append(f'<text class="badge-text" x="{PLOT_LEFT - 27}" y="{_n(middle + 3.5)}" text-anchor="middle">'
                         f'{"Spot" if record.spot else "Std"}</text>')
        x0, x1 = axis.x(life.start), axis.x(life.end)
        parts.append(f'<line class="life" x1="{_n(x0)}" x2="{_n(x1)}" y1="{_n(middle)}" y2="{_n(middle)}"/>')
        first_start = min((span.started for span in life.spans), default=life.end)
        boot_end = axis.x(min(first_start, life.end))
        if boot_end - x0 >= 0.5:
            parts.append(f'<rect class="boot" x="{_n(x0)}" y="{_n(middle - bar_height / 4)}" width="{_n(boot_end - x0)}" '
                         f'height="{_n(bar_height / 2)}"><title>boot: {_e(_duration(life.boot))}</title></rect>')
        for bar in bars[record.name]:
            bx = axis.x(bar.started)
            width = max(axis.x(bar.ended) - bx, 1.0)
            style = OUTCOMES[bar.outcome]
            item = f' data-item="{_e(bar.spans[0].item)}"' if len(bar.spans) == 1 else f' data-merged="{len(bar.spans)}"'
            fill = f' style="fill:url(#p-{style.css})"' if style.pattern else ""
            parts.append(f'<rect class="bar o-{style.css}" x="{_n(bx)}" y="{_n(middle - bar_height / 2)}" width="{_n(width)}" '
                         f'height="{_n(bar_height)}" rx="1.5" data-outcome="{style.css}"{item}{fill}>'
                         f'<title>{_e(_bar_title(bar, data.labels))}</title></rect>')
        mark = min(row_height / 2 - 1, 6)
        parts.append(f'<path class="mark created" d="M{_n(x0)} {_n(middle - mark)}v{_n(2 * mark)}"><title>created '
                     f'{_clock(life.start)}</title></path>')
        if record.gone is not None:
            parts.append(f'<path class="mark deleted" d="M{_n(x1)} {_n(middle - mark)}v{_n(2 * mark)}"><title>gone '
                         f'{_clock(life.end)}</title></path>')
        if record.preempted is not None:
            px = axis.x(record.preempted)
            parts.append(f'<path class="mark preemption" d="M{_n(px - mark)} {_n(middle - mark - 1)}h{_n(2 * mark)}'
                         f'l{_n(-mark)} {_n(mark + 1)}z"><title>preempted {_clock(record.preempted)}</title></path>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts), [note for note in (row_note, bar_note) if note]


def _patterns() -> str:
    """The page's one set of fill patterns: stripes for failed attempts (so they differ from the other
    colours by more than hue) and hatching for boot. Every SVG of the page refers to them."""
    colour = OUTCOMES[EventKind.RETRY].colour
    return (
        '<svg class="defs" width="0" height="0" aria-hidden="true"><defs>'

        f'<pattern id="p-retry" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        f'<rect width="6" height="6" fill="{colour}"/><rect width="2" height="6" fill="#fff" opacity=".45"/></pattern>'
        f'<pattern id="p-failed" width="6" height="6" patternUnits="userSpaceOnUse">'
        f'<rect width="6" height="6" fill="{colour}"/><path d="M0 0L6 6M6 0L0 6" stroke="#3b1200" stroke-width="1.2"/></pattern>'
        '<pattern id="p-boot" width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="5" height="5" fill="#e6e8ec"/><rect width="1.6" height="5" fill="#a8adb7"/></pattern>'
        "</defs></svg>"
    )


# ---------------------------------------------------------------- charts


def _done_times(data: ReportInput) -> list[float]:
    """When each item was done: its done attempt's end, else its marker's time."""
    ends = {span.item: span.ended for span in data.spans if span.outcome == EventKind.DONE}
    return sorted(ends.get(item, at) for item, at in data.done_times.items())


def throughput_bin_seconds(span: float, done: int) -> float:
    """A round bin width: at most ``THROUGHPUT_BINS`` bins, at least 6, and few enough that a bin holds ~5 items on average."""
    wanted = max(span / THROUGHPUT_BINS, min(span / 6, span / max(done / 5, 1.0)), 1.0)
    steps = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 21600, 43200, 86400)
    step = next((step for step in steps if step >= wanted), math.ceil(wanted / 86400) * 86400)
    if span / step < 6:  # rounding up left too few bins to show a shape
        step = max((s for s in steps if s <= span / 6), default=1)
    return float(step)


def render_throughput(data: ReportInput, axis: TimeAxis) -> str:
    """Items done per minute, binned over the run."""
    times = _done_times(data)
    span = axis.end - axis.start
    bin_seconds = throughput_bin_seconds(span, len(times))
    counts = [0] * (int(span // bin_seconds) + 1)
    for moment in times:
        counts[min(max(int((moment - axis.start) // bin_seconds), 0), len(counts) - 1)] += 1
    rates = [count * 60 / bin_seconds for count in counts]
    peak = _nice_ceiling(max(rates, default=0))
    height, top = 150.0, 18.0
    bottom = top + height
    parts = [f'<svg class="chart throughput" viewBox="0 0 {CHART_WIDTH} {_n(bottom + 22)}" role="img" '
             f'aria-label="Items done per minute">', axis.grid(top, bottom, labels=True)]
    parts.append(_y_axis(peak, top, bottom, "done/min"))
    for index, rate in enumerate(rates):
        if not rate:
            continue
        x0 = axis.x(axis.start + index * bin_seconds)
        x1 = axis.x(min(axis.start + (index + 1) * bin_seconds, axis.end))
        bar_height = rate / peak * height
        parts.append(f'<rect class="rate" x="{_n(x0 + 0.5)}" y="{_n(bottom - bar_height)}" width="{_n(max(x1 - x0 - 1, 0.8))}" '
                     f'height="{_n(bar_height)}"><title>{_offset(index * bin_seconds)}–{_offset((index + 1) * bin_seconds)}: '
                     f'{counts[index]} done ({rate:.1f}/min)</title></rect>')
    parts.append(f'<line class="axis" x1="{PLOT_LEFT}" x2="{PLOT_LEFT + PLOT_WIDTH}" y1="{_n(bottom)}" y2="{_n(bottom)}"/></svg>')
    return "".join(parts)


def _y_axis(peak: float, top: float, bottom: float, unit: str) -> str:
    """Gridlines and labels at 0, half and the top of a scale whose top is ``peak``."""
    parts = []
    for fraction in (0.0, 0.5, 1.0):
        value = peak * fraction
        y = bottom - fraction * (bottom - top)
        parts.append(f'<line class="grid" x1="{PLOT_LEFT}" x2="{PLOT_LEFT + PLOT_WIDTH}" y1="{_n(y)}" y2="{_n(y)}"/>')
        parts.append(f'<text class="tick" x="{PLOT_LEFT - 8}" y="{_n(y + 4)}" text-anchor="end">{value:g}</text>')
    parts.append(f'<text class="unit" x="{PLOT_LEFT - 8}" y="{_n(top - 9)}" text-anchor="end">{_e(unit)}</text>')
    return "".join(parts)


def _nice_ceiling(value: float) -> float:
    """A chart's top: the smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^n) at least ``value``."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for factor in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if factor * magnitude >= value * (1 - 1e-9):
            return float(f"{factor * magnitude:.6g}")
    return 10.0 * magnitude


def workers_alive(lives: Iterable[VmLife], axis: TimeAxis, samples: int = WORKER_SAMPLES) -> list[tuple[float, float, float]]:
    """``(time, VMs alive, VMs running a task)`` over ``samples`` equal slices of the run, each the slice's average.

    Averages, not values at instants: the gap between two tasks is milliseconds,
    and an instant that falls into one would show a worker idle that was not.
    """
    alive: list[tuple[float, int]] = []
    busy: list[tuple[float, int]] = []
    for life in lives:
        alive += [(life.start, 1), (life.end, -1)]
        for span in life.spans:
            busy += [(span.started, 1), (span.ended, -1)]
    edges = [axis.start + (axis.end - axis.start) * k / samples for k in range(samples + 1)]
    alive_areas, busy_areas = _areas(alive, edges), _areas(busy, edges)
    return [((edges[k] + edges[k + 1]) / 2, alive_areas[k] / (edges[k + 1] - edges[k]), busy_areas[k] / (edges[k + 1] - edges[k]))
            for k in range(samples)]


def _areas(changes: list[tuple[float, int]], edges: list[float]) -> list[float]:
    """The integral of a count that steps by each ``(time, +1/-1)``, over each slice between two ``edges``."""
    changes = sorted(changes)
    areas = [0.0] * (len(edges) - 1)
    level, at, index = 0, edges[0], 0
    while index < len(changes) and changes[index][0] <= edges[0]:
        level += changes[index][1]
        index += 1
    for k in range(len(edges) - 1):
        while index < len(changes) and changes[index][0] < edges[k + 1]:
            moment, step = changes[index]
            areas[k] += max(level, 0) * (moment - at)
            level, at = level + step, moment
            index += 1
        areas[k] += max(level, 0) * (edges[k + 1] - at)
        at = edges[k + 1]
    return areas


def render_workers(figures: Figures, axis: TimeAxis) -> str:
    """Workers alive (area) and running a task (line) over the run."""
    points = workers_alive(figures.lives, axis)
    most = math.ceil(max((alive for _, alive, _ in points), default=0) - 1e-9)
    # A count of VMs: a small one gets an even top, so the half-way line is a whole VM too.
    peak = float(most + most % 2) if most < 10 else _nice_ceiling(most)
    peak = peak or 2.0
    height, top = 110.0, 18.0
    bottom = top + height

    def y(value: float) -> float:
        return bottom - value / peak * height

    alive_path = [f"M{PLOT_LEFT} {_n(bottom)}"]
    busy_path = []
    for index, (moment, alive, working) in enumerate(points):
        x = _n(axis.x(moment))
        alive_path.append(f"L{x} {_n(y(alive))}")
        busy_path.append(f"{'M' if index == 0 else 'L'}{x} {_n(y(working))}")
    alive_path.append(f"L{PLOT_LEFT + PLOT_WIDTH} {_n(bottom)}Z")
    return (f'<svg class="chart workers" viewBox="0 0 {CHART_WIDTH} {_n(bottom + 22)}" role="img" aria-label="Workers alive">'
            + axis.grid(top, bottom, labels=True) + _y_axis(peak, top, bottom, "VMs")
            + f'<path class="alive" d="{"".join(alive_path)}"><title>VMs alive (at most {most})</title></path>'
            + f'<path class="working" d="{"".join(busy_path)}"><title>VMs running a task</title></path>'
            + f'<line class="axis" x1="{PLOT_LEFT}" x2="{PLOT_LEFT + PLOT_WIDTH}" y1="{_n(bottom)}" y2="{_n(bottom)}"/></svg>')


# ---------------------------------------------------------------- the page


def _log_cell(location: str | None) -> str:
    if not location:
        return '<span class="muted">none uploaded</span>'
    if location.startswith("/"):
        return f'<a href="{_e("file://" + location)}"><code>{_e(location)}</code></a>'
    if location.startswith("gs://"):
        bucket_and_path = location[len("gs://"):]
        url = "https://console.cloud.google.com/storage/browser/_details/" + bucket_and_path
        return f'<a href="{_e(url)}"><code>{_e(location)}</code></a>'
    return f"<code>{_e(location)}</code>"


def _failed_table(data: ReportInput) -> str:
    if not data.failed_count:
        return '<p class="muted">No item failed.</p>'
    rows = []
    for row in data.failed[:MAX_TABLE_ROWS]:
        rows.append(f"<tr><td><code>{_e(row.label)}</code></td><td class=num>{_e(row.attempts or '-')}</td>"
                    f"<td>{_e(row.reason)}</td><td>{_log_cell(row.log)}</td></tr>")
    more = data.failed_count - min(len(data.failed), MAX_TABLE_ROWS)
    note = f'<p class="muted">… and {more:,} more: <code>cflow logs {_e(data.run_id)}</code> lists them all.</p>' if more > 0 else ""
    return ('<table><thead><tr><th>item</th><th class=num>attempts</th><th>last attempt</th><th>log</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{note}")


def _slowest_table(data: ReportInput) -> str:
    done = [span for span in data.spans if span.outcome == EventKind.DONE]
    if not done:
        return '<p class="muted">No attempt was recorded done with its times.</p>'
    attempts = Counter(span.item for span in data.spans)
    slowest = sorted(done, key=lambda span: span.seconds, reverse=True)[:SLOWEST_SHOWN]
    median = sorted(span.seconds for span in done)[len(done) // 2]
    rows = [f"<tr><td><code>{_e(data.labels.get(span.item, span.item))}</code></td><td class=num>{_e(_duration(span.seconds))}</td>"
            f"<td class=num>{attempts[span.item]}</td><td><code>{_e(span.vm)}</code></td><td>{_clock(span.started)}</td></tr>"
            for span in slowest]
    return (f'<p class="muted">Median done attempt: {_e(_duration(median))} over {len(done):,} items.</p>'
            '<table><thead><tr><th>item</th><th class=num>took</th><th class=num>attempts</th><th>VM</th><th>started</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _cost_table(figures: Figures) -> str:
    rows = []
    for line in figures.costs:
        hourly = f"${line.hourly:g}/h" if line.hourly is not None else "not in PRICES"
        rows.append(f"<tr><td><code>{_e(line.machine_type or '?')}</code></td><td>{'Spot' if line.spot else 'standard'}</td>"
                    f"<td class=num>{line.vms:,}</td><td class=num>{line.seconds:,.0f}</td><td class=num>{_e(_duration(line.seconds))}</td>"
                    f"<td class=num>{_e(hourly)}</td><td class=num>{_e(_money(line.cost))}</td></tr>")
    if not rows:
        return '<p class="muted">No VM is known to this run yet.</p>'
    return ('<table><thead><tr><th>machine type</th><th>model</th><th class=num>VMs</th><th class=num>VM-seconds</th>'
            '<th class=num>VM time</th><th class=num>price</th><th class=num>est. cost</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _time_split(figures: Figures) -> str:
    """Where the VM time went: one stacked bar and its legend."""
    total = figures.vm_seconds
    parts = [
        ("useful", "busy (attempts not preempted)", figures.busy - figures.lost_to_preemption),
        ("lost", "lost to preemption", figures.lost_to_preemption),
        ("boot", "boot (created → first task)", figures.boot),
        ("idle", "idle", figures.idle),
    ]
    if total <= 0:
        return '<p class="muted">No VM time recorded.</p>'
    segments = "".join(f'<span class="seg {css}" style="width:{100 * max(value, 0) / total:.2f}%" title="{_e(label)}: '
                       f'{_e(_duration(value))}"></span>' for css, label, value in parts if value > 0)
    legend = "".join(f'<li><i class="swatch {css}"></i>{_e(label)} <b>{_e(_duration(max(value, 0)))}</b> '
                     f'<span class="muted">{_percent(max(value, 0), total)}</span></li>' for css, label, value in parts)
    return f'<div class="split">{segments}</div><ul class="split-legend">{legend}</ul>'


def _legend() -> str:
    items = []
    for style in OUTCOMES.values():
        fill = f"url(#p-{style.css})" if style.pattern else style.colour
        items.append(f'<li><svg width="22" height="12" aria-hidden="true">'
                     f'<rect width="22" height="12" rx="2" style="fill:{fill}"/></svg>{_e(style.name)}</li>')
    items.append('<li><svg width="22" height="12" aria-hidden="true"><rect y="3" width="22" height="6" '
                 'fill="url(#p-boot)"/></svg>boot</li>')
    items.append('<li><svg width="14" height="12" aria-hidden="true"><path d="M1 1h12l-6 8z" class="mark preemption"/></svg>'
                 "preemption</li>")
    items.append('<li><svg width="14" height="12" aria-hidden="true"><path d="M3 0v12M11 0v12" class="mark created" '
                 'style="stroke-width:2"/></svg>VM created / gone</li>')
    items.append('<li><span class="badge-sample spot">Spot</span><span class="badge-sample standard">Std</span>provisioning</li>')
    return f'<ul class="legend">{"".join(items)}</ul>'


def _card(label: str, value: str, detail: str = "", css: str = "") -> str:
    return (f'<div class="card {css}"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
            f'<div class="detail">{detail}</div></div>')


def render(data: ReportInput) -> str:
    """The report of one run as one self-contained HTML page (no network needed to show it)."""
    figures = compute_figures(data)
    axis = TimeAxis(figures.start, figures.end)
    timeline, notes = render_timeline(data, figures, axis)
    spot_vms = sum(1 for life in figures.lives if life.record.spot)
    done = len(data.done_times)
    efficiency = figures.efficiency
    cards = [
        _card("items done", f"{done:,}<small> / {data.total_items:,}</small>",
              _e(f"{_percent(done, data.total_items)} of the run's items"), "good"),
        _card("failed", f"{data.failed_count:,}", "items failed for good" if data.failed_count else "none",
              "bad" if data.failed_count else ""),
        _card("attempts", f"{figures.attempts:,}", _e(f"{figures.retries:,} retried after a failure")),
        _card("preemptions", f"{figures.preemptions:,}", "VMs taken back; their items ran again elsewhere",
              "warn" if figures.preemptions else ""),
        _card("VMs", f"{len(figures.lives):,}", _e(f"{spot_vms:,} Spot, {len(figures.lives) - spot_vms:,} standard")),
        _card("VM time", _e(_duration(figures.vm_seconds)), _e(f"{figures.vm_seconds:,.0f} VM-seconds")),
        _card("estimated cost", _e(_money(figures.cost)), "from PRICES of the run; yours to check"),
        _card("efficiency", _e(f"{100 * efficiency:.0f}%" if efficiency is not None else "-"),
              "busy VM time / all VM time"),
    ]
    wall = figures.end - figures.start
    header_times = (f"{_e(_clock(figures.start, with_date=True))} → {_e(_clock(figures.end, with_date=True))}"
                    f" · {_e(_duration(wall))}")
    notes_html = "".join(f'<p class="note">{_e(note)}</p>' for note in notes)
    state_css = {"finished": "ok", "cancelled": "bad"}.get(data.state, "going")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>CFlow run {_e(data.run_id)}</title>
<style>{STYLE}</style></head>
<body data-run="{_e(data.run_id)}">
{_patterns()}
<header>
  <div class="title"><span class="brand">CFlow run</span> <h1>{_e(data.run_id)}</h1>
    <span class="state {state_css}">{_e(data.state)}</span></div>
  <div class="when">{header_times}</div>
  <div class="source muted"><code>{_e(data.source)}</code></div>
</header>
<main>
<section class="cards">{"".join(cards)}</section>
<section class="panel"><h2>Where the VM time went</h2>{_time_split(figures)}{_cost_table(figures)}</section>
<section class="panel"><h2>Timeline</h2>
<p class="muted">One row per VM, one bar per attempt from its start to its end. Hover a bar for its item, attempt and
duration; hover a row's label for the VM. Times are minutes:seconds from the run's start.</p>
{_legend()}{notes_html}
<div class="scroll">{timeline}</div></section>
<section class="panel"><h2>Throughput</h2><p class="muted">Items done per minute.</p>{render_throughput(data, axis)}
<h2>Workers</h2><p class="muted"><i class="swatch alive"></i>VMs alive
<i class="swatch working"></i>VMs running a task</p>{render_workers(figures, axis)}</section>
<section class="panel"><h2>Failed items</h2>{_failed_table(data)}</section>
<section class="panel"><h2>Slowest items</h2>{_slowest_table(data)}</section>
</main>
<footer class="muted">Made by <code>cflow report</code> at {_e(_clock(data.generated, with_date=True))} from what the run keeps
in Cloud Storage. Costs are estimates from PRICES.</footer>
<script>{script(data.run_id)}</script>
</body></html>
"""
    return page


def script(run_id: str) -> str:
    """The page's one script: highlight an item's attempts across VMs on hover, and mark that it ran."""
    return ("(function(){var d=document.documentElement;"
            "window.addEventListener('error',function(e){d.setAttribute('data-script-error',String(e.message));});"
            "var svg=document.querySelector('svg.timeline');"
            "if(svg){svg.addEventListener('mouseover',function(e){var i=e.target.getAttribute&&e.target.getAttribute('data-item');"
            "if(!i)return;svg.querySelectorAll('rect.bar[data-item=\"'+i+'\"]').forEach(function(r){r.classList.add('hl');});});"
            "svg.addEventListener('mouseout',function(){svg.querySelectorAll('rect.bar.hl').forEach(function(r){"
            "r.classList.remove('hl');});});}"
            f"d.setAttribute('data-report',{json.dumps(run_id)});"
            "d.setAttribute('data-bars',String(document.querySelectorAll('svg.timeline rect.bar').length));"
            "d.setAttribute('data-rows',String(document.querySelectorAll('svg.timeline g.vm-row').length));"
            "d.setAttribute('data-script','ok');})();")


STYLE = """
:root{--ink:#1d2330;--muted:#667085;--line:#e4e7ec;--panel:#fff;--bg:#f5f6f8;--accent:#0072B2}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
header{padding:22px 32px 14px;background:#fff;border-bottom:1px solid var(--line)}
header>div{max-width:1176px;margin:0 auto}
.title{display:flex;align-items:baseline;gap:12px;flex-wrap:wrap}
.brand{color:var(--muted);font-weight:600;letter-spacing:.02em}
h1{margin:0;font-size:24px;font-weight:700}
h2{font-size:16px;margin:0 0 6px}
.when{margin-top:4px;font-size:15px}
.state{font-size:12px;font-weight:600;padding:2px 10px;border-radius:99px;text-transform:uppercase;letter-spacing:.04em}
.state.ok{background:#e3f0fa;color:#005a8c}.state.bad{background:#fbe6dc;color:#8f3300}.state.going{background:#fff1d6;color:#7a5200}
main{padding:18px 32px 8px;max-width:1240px;margin:0 auto}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-bottom:16px}
@media (max-width:760px){.cards{grid-template-columns:repeat(2,1fr)}}
.card{background:var(--panel);border:1px solid var(--line);border-radius:10px;padding:12px 14px;border-top:3px solid #d0d5dd}
.card.good{border-top-color:#0072B2}.card.bad{border-top-color:#D55E00}.card.warn{border-top-color:#E69F00}
.card .label{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.card .value{font-size:22px;font-weight:700;margin:2px 0;font-variant-numeric:tabular-nums;white-space:nowrap}
.card .value small{font-size:14px;color:var(--muted);font-weight:500}
.card .detail{color:var(--muted);font-size:12px}
.panel{background:var(--panel);border:1px solid var(--line);border-radius:10px;padding:16px 18px;margin-bottom:16px}
.panel h2+p{margin-top:0}
.muted{color:var(--muted)}
.note{background:#f2f4f7;border-left:3px solid #98a2b3;padding:6px 10px;margin:6px 0;font-size:13px}
.scroll{overflow-x:auto}
svg.defs{position:absolute}
svg.timeline,svg.chart{width:100%;height:auto;display:block;min-width:720px}
.grid{stroke:#eef0f3;stroke-width:1}
.axis{stroke:#98a2b3;stroke-width:1}
.tick{fill:var(--muted);font-size:11px;font-variant-numeric:tabular-nums}
.unit{fill:var(--muted);font-size:10px}
.stripe{fill:#f8f9fb}
.vm-name{fill:var(--ink);font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.badge.spot{fill:#e7f1fb;stroke:#7fb2d9}.badge.standard{fill:#f1f2f4;stroke:#b3b8c2}
.badge-text{font-size:10px;font-weight:600;fill:#344054}
.life{stroke:#c4c9d2;stroke-width:2;stroke-linecap:round}
.boot{fill:url(#p-boot)}
.bar{stroke:#fff;stroke-width:.6}
.bar:hover,.bar.hl{stroke:#111;stroke-width:1.6}
.o-done{fill:#0072B2}.o-retry,.o-failed{fill:#D55E00}.o-preempted{fill:#E69F00}.o-interrupted{fill:#CC79A7}.o-duplicate{fill:#8C8C8C}
.mark{stroke:#344054;stroke-width:1.5;fill:none}
.mark.deleted{stroke:#98a2b3}
.mark.preemption{fill:#E69F00;stroke:#5c3b00;stroke-width:1}
.rate{fill:#0072B2;opacity:.85}
.alive{fill:#56B4E9;opacity:.35;stroke:#56B4E9}
.working{fill:none;stroke:#0072B2;stroke-width:1.6}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;list-style:none;padding:0;margin:8px 0 10px}
.legend li{display:flex;align-items:center;gap:6px;font-size:13px}
.badge-sample{font-size:10px;font-weight:600;padding:0 5px;border-radius:3px;border:1px solid #b3b8c2;background:#f1f2f4}
.badge-sample.spot{background:#e7f1fb;border-color:#7fb2d9}
.split{display:flex;height:22px;border-radius:6px;overflow:hidden;background:#eef0f3;margin:8px 0}
.seg.useful,.swatch.useful{background:#0072B2}.seg.lost,.swatch.lost{background:#E69F00}
.seg.boot,.swatch.boot{background:repeating-linear-gradient(45deg,#e6e8ec 0 3px,#a8adb7 3px 5px)}
.seg.idle,.swatch.idle{background:#d0d5dd}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;vertical-align:-2px;margin-right:6px}
.swatch.alive{background:#56B4E9;opacity:.5}.swatch.working{background:#0072B2;height:3px;vertical-align:3px;margin-left:14px}
.split-legend{display:flex;flex-wrap:wrap;gap:4px 22px;list-style:none;padding:0;margin:0 0 12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th{text-align:left;color:var(--muted);font-weight:600;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:hover{background:#f8f9fb}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
a{color:#005a8c}
footer{padding:6px 32px 28px;font-size:12px;max-width:1240px;margin:0 auto}
"""
