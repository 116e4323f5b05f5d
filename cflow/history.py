"""What a run keeps of its own history for the report: where and when each attempt ran, and each VM's life.

- ``AttemptSpan``: one run of an item's task on one VM, from its start to its
  end, and how it ended (the kind of the end event the worker published:
  done, retry, failed, duplicate, preempted, interrupted). Workers write the
  span into what they already write when an attempt ends: the done marker and
  the attempt marker carry its fields, and an attempt that leaves no marker
  of its own (handed back, or a duplicate) gets a small timeline record.
  Each of those objects also carries the span as custom metadata
  (``to_metadata``), so one listing of the run's folders reads every span
  back without opening each object (``from_metadata``).
- ``VmRecord`` and ``VmHistory``: each VM as the scheduler saw it (name,
  zone, machine type, Spot or not, created, first seen running, preempted,
  gone), kept by the scheduler's step and written to the run's vms.json now
  and then and at the end.

Object names are in ``cflow.gcp.layout``; reading and writing them in
``cflow.gcp.storage``. Everything here is plain data: no Google imports.
"""

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from cflow.protocol import ITEM_END_EVENTS, EventKind

log = logging.getLogger(__name__)

# The marker fields (and custom metadata keys) that make up a span.
SPAN_FIELDS = ("attempt", "vm", "started", "ended", "outcome")
VM_HISTORY_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class AttemptSpan:
    """One run of an item's task on one VM.

    Attributes:
        item: the item's id.
        attempt: the attempt number (a preempted run and its rerun share it).
        vm: the worker VM's name.
        started, ended: epoch seconds on the worker.
        outcome: how it ended, one of ``cflow.protocol.ITEM_END_EVENTS``.
    """

    item: str
    attempt: int
    vm: str
    started: float
    ended: float
    outcome: EventKind

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 0.0)

    def fields(self) -> dict[str, Any]:
        """The span's fields as a marker's JSON carries them (the item's id is the marker's own)."""
        return {"attempt": self.attempt, "vm": self.vm, "started": round(self.started, 3), "ended": round(self.ended, 3),
                "outcome": self.outcome.value}

    def to_metadata(self) -> dict[str, str]:
        """The span as an object's custom metadata (string values), which a listing returns."""
        return {key: str(value) for key, value in self.fields().items()}

    @classmethod
    def from_fields(cls, item_id: str, fields: Mapping[str, Any]) -> "AttemptSpan | None":
        """The span in a marker's JSON or an object's metadata; None when it has none (an older run) or a bad one."""
        if not all(key in fields for key in SPAN_FIELDS):
            return None
        try:
            outcome = EventKind(fields["outcome"])
            span = cls(item_id, int(fields["attempt"]), str(fields["vm"]), float(fields["started"]), float(fields["ended"]), outcome)
        except (TypeError, ValueError):
            log.debug("item %s: an unreadable span %r", item_id, dict(fields))
            return None
        if outcome not in ITEM_END_EVENTS or not (math.isfinite(span.started) and math.isfinite(span.ended)):
            return None
        return span

    @classmethod
    def from_metadata(cls, item_id: str, metadata: Mapping[str, str] | None) -> "AttemptSpan | None":
        """The span ``to_metadata`` wrote, or None."""
        return cls.from_fields(item_id, metadata or {})


def span_metadata(info: Mapping[str, Any]) -> dict[str, str] | None:
    """The custom metadata for a marker whose JSON ``info`` carries a span's fields; None if it carries none."""
    item_id = info.get("item")
    span = AttemptSpan.from_fields(item_id if isinstance(item_id, str) else "", info)
    return span.to_metadata() if span is not None else None


def is_spot(instance_properties: Mapping[str, Any]) -> bool:
    """True for the instance properties of a Spot (or preemptible) VM."""
    scheduling = instance_properties.get("scheduling") or {}
    return scheduling.get("provisioningModel") == "SPOT" or bool(scheduling.get("preemptible"))


@dataclasses.dataclass
class VmRecord:
    """One VM of the run, as the scheduler saw it. Times are epoch seconds on the controller; None: not seen.

    Attributes:
        created: when the scheduler asked for it (None: first seen in a listing,
            e.g. created by a scheduler that ran before a resume).
        first_seen: when a listing, or an event from its worker, first showed it.
        running: when a listing first showed it RUNNING, or its worker was first heard from.
        preempted: when it was preempted (its hand-back event, or its status).
        gone: when a listing no longer showed it, or the fleet was deleted at the end.
    """

    name: str
    zone: str
    machine_type: str
    spot: bool
    created: float | None = None
    first_seen: float | None = None
    running: float | None = None
    preempted: float | None = None
    gone: float | None = None

    @property
    def born(self) -> float | None:
        """When it started to exist (and to bill, roughly): asked for, else first seen."""
        return self.created if self.created is not None else self.first_seen

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "VmRecord":
        """A record ``to_dict`` wrote. Raises KeyError, TypeError or ValueError on a malformed one."""
        def when(key: str) -> float | None:
            value = document.get(key)
            return None if value is None else float(value)

        return cls(
            name=str(document["name"]),
            zone=str(document.get("zone") or ""),
            machine_type=str(document.get("machine_type") or ""),
            spot=bool(document.get("spot")),
            created=when("created"),
            first_seen=when("first_seen"),
            running=when("running"),
            preempted=when("preempted"),
            gone=when("gone"),
        )


def vm_records_from_document(document: object) -> list[VmRecord]:
    """The records in a vms.json document (``VmHistory.to_document``); malformed entries are skipped."""
    if not isinstance(document, Mapping) or not isinstance(document.get("vms"), list):
        return []
    records = []
    for entry in document["vms"]:
        try:
            records.append(VmRecord.from_dict(entry))
        except (KeyError, TypeError, ValueError):
            log.debug("skipping a malformed VM record %r", entry)
    return records


class VmHistory:
    """The scheduler's record of every VM of its run: what it asked for, what the listings showed, what ended.

    The scheduler tells it what it does and sees; ``dirty`` says whether
    there is news since the last ``to_document``. All times are wall-clock
    epoch seconds.
    """

    def __init__(self, records: Iterable[VmRecord] = ()) -> None:
        self.records: dict[str, VmRecord] = {record.name: record for record in records}
        self.dirty = False

    def asked_for(self, names: Iterable[str], zone: str, instance_properties: Mapping[str, Any], now: float) -> None:
        """VMs asked for in one bulkInsert."""
        machine_type = str(instance_properties.get("machineType", "")).rsplit("/", 1)[-1]
        spot = is_spot(instance_properties)
        for name in names:
            self.records[name] = VmRecord(name, zone, machine_type, spot, created=now)
        self.dirty = True

    def never_created(self, names: Iterable[str]) -> None:
        """VMs asked for whose creation failed (a stockout, a quota): they never existed."""
        for name in names:
            record = self.records.get(name)
            if record is not None and record.first_seen is None:
                del self.records[name]
                self.dirty = True

    def listed(self, vms: Iterable[tuple[str, str, str, bool]], now: float, live_states: Iterable[str],
               default_machine_type: str, default_spot: bool) -> None:
        """One listing of the run's VMs: ``(name, zone, status, preempted)`` each.

        A VM that the last listing showed and this one does not is gone; a VM
        the history does not know (made before a resume) is added.
        """
        live = set(live_states)
        seen = set()
        for name, zone, status, preempted in vms:
            seen.add(name)
            record = self.records.get(name)
            if record is None:
                record = self.records[name] = VmRecord(name, zone, default_machine_type, default_spot)
            if record.first_seen is None:
                record.first_seen = now
                self.dirty = True
            if record.gone is not None and status in live:
                record.gone = None  # listed again (a listing that lagged): not gone after all
                self.dirty = True
            if status == "RUNNING" and record.running is None:
                record.running = now
                self.dirty = True
            if preempted and record.preempted is None:
                self.mark_preempted(name, now)
        for record in self.records.values():
            if record.gone is None and record.first_seen is not None and record.name not in seen:
                record.gone = now
                self.dirty = True

    def heard_from(self, name: str | None, when: float) -> None:
        """An event came from the VM ``name``'s worker at ``when``: it exists and runs (maybe between two listings)."""
        record = self.records.get(name or "")
        if record is None:
            return
        if record.first_seen is None:
            record.first_seen = when
            self.dirty = True
        if record.running is None:
            record.running = when
            self.dirty = True

    def mark_preempted(self, name: str | None, when: float) -> None:
        """The VM ``name`` was preempted at ``when`` (the first news of it counts)."""
        record = self.records.get(name or "")
        if record is not None and record.preempted is None:
            record.preempted = when
            self.dirty = True

    def all_gone(self, now: float) -> None:
        """The run's fleet was deleted: every VM not gone yet is gone now."""
        for record in self.records.values():
            if record.gone is None:
                record.gone = now
                self.dirty = True

    def to_document(self) -> dict[str, Any]:
        """vms.json: ``{"format": 1, "vms": [record, ...]}`` in the order the VMs were created; clears ``dirty``."""
        self.dirty = False
        ordered = sorted(self.records.values(), key=lambda record: (record.born or math.inf, record.name))
        return {"format": VM_HISTORY_FORMAT, "vms": [record.to_dict() for record in ordered]}
