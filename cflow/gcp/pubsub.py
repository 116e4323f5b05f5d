"""Pub/Sub: a run's own topics and subscriptions, and the messages on them.

Each run has four topics, each with one pull subscription, named from the
user's prefixes and the run id so that no other run's messages leak in:

    work      one message per work item: the Spot lane, workers pull it one at a time
    standard  the standard lane: items preempted too often on Spot (``cflow.lanes``)
    events    what workers report (started, done, retry, failed, preempted)
    dead      work messages delivered too many times without a result

Attempts: a failed attempt is handed back by republishing the item with its
attempt count raised, then acking the old message; a preemption is handed back
by republishing it with its preemption count raised (``cflow.lanes``), or by
a nack (deadline 0), which keeps the message and so its attempt count.

Every method raises only CFlow's ``CloudError`` classes (``cflow.errors``): a
run's topics that are gone are a ``NotFound``.
"""

import collections
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions as google_exceptions

from cflow.gcp.errors import translated
from cflow.protocol import Lane

log = logging.getLogger(__name__)

# Pub/Sub's own ceiling for max_delivery_attempts. It is a safety net against a
# message that kills the worker itself; ordinary failures are counted by CFlow.
MAX_DELIVERY_ATTEMPTS = 100

# Messages publish_many lets wait for the service at once: a few of the
# controller's 1,000-message batches in flight keep the throughput, and a run
# of 100,000 items does not hold 100,000 futures.
PUBLISH_WINDOW = 5000


@dataclass(frozen=True)
class RunTopics:
    """The names of one run's topics and subscriptions (full resource paths)."""

    project: str
    work_topic: str
    work_subscription: str
    events_topic: str
    events_subscription: str
    dead_topic: str
    dead_subscription: str
    # The standard lane ("" in the record of a run made before lanes: it has none).
    standard_topic: str = ""
    standard_subscription: str = ""

    @classmethod
    def for_run(cls, project: str, run_id: str, topic_prefix: str, subscription_prefix: str) -> "RunTopics":
        def topic(kind: str) -> str:
            return f"projects/{project}/topics/{topic_prefix}-{kind}-{run_id}"

        def subscription(kind: str) -> str:
            return f"projects/{project}/subscriptions/{subscription_prefix}-{kind}-{run_id}"

        return cls(
            project=project,
            work_topic=topic("work"),
            work_subscription=subscription("work"),
            events_topic=topic("events"),
            events_subscription=subscription("events"),
            dead_topic=topic("dead"),
            dead_subscription=subscription("dead"),
            standard_topic=topic("standard"),
            standard_subscription=subscription("standard"),
        )

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, document: Mapping[str, str]) -> "RunTopics":
        return cls(**document)

    def lane_topic(self, lane: Lane) -> str:
        """The work topic of a lane (the Spot lane's for a run without a standard lane)."""
        return self.standard_topic if lane == Lane.STANDARD and self.standard_topic else self.work_topic

    def lane_subscription(self, lane: Lane) -> str:
        """The work subscription of a lane (the Spot lane's for a run without a standard lane)."""
        return self.standard_subscription if lane == Lane.STANDARD and self.standard_subscription else self.work_subscription

    def _work_pairs(self) -> list[tuple[str, str]]:
        pairs = [(self.work_topic, self.work_subscription)]
        if self.standard_topic:
            pairs.append((self.standard_topic, self.standard_subscription))
        return pairs

    def all_topics(self) -> list[str]:
        return [topic for topic, _ in self._work_pairs()] + [self.events_topic, self.dead_topic]

    def all_subscriptions(self) -> list[str]:
        return [subscription for _, subscription in self._work_pairs()] + [self.events_subscription, self.dead_subscription]


@dataclass(frozen=True)
class Received:
    """One pulled message: its payload, attributes and the ack id to settle it."""

    ack_id: str
    data: bytes
    attributes: dict[str, str]
    delivery_attempt: int


class PubSub:
    """Topics, subscriptions, publish and synchronous pull.

    Args:
        publisher: a ``pubsub_v1.PublisherClient`` (with batch settings of the caller's choice).
        subscriber: a ``pubsub_v1.SubscriberClient``.
        project: the project, named in error messages (optional).
    """

    def __init__(self, publisher: Any, subscriber: Any, project: str | None = None) -> None:
        self.publisher = publisher
        self.subscriber = subscriber
        self.project = project

    # -- lifecycle ---------------------------------------------------------

    @translated("pubsub")
    def create_run_topics(self, topics: RunTopics, ack_deadline_seconds: int) -> bool:
        """Create the run's topics and subscriptions; existing ones are kept.

        The three topics are created at once, then the three subscriptions
        (a subscription needs its topic, the work one the dead-letter topic too).

        Returns:
            True if the work subscription was created now, False if it already
            existed (a resumed run whose queue survived).
        """
        # Topics, then subscriptions, each group in parallel: a round trip each on GCP, and the fleet waits on them.
        dead_letter_policy = {"dead_letter_topic": topics.dead_topic, "max_delivery_attempts": MAX_DELIVERY_ATTEMPTS}
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="create-topics") as pool:
            for created in [pool.submit(self._create_topic, topic) for topic in topics.all_topics()]:
                created.result()
            work = pool.submit(self._create_subscription, topics.work_subscription, topics.work_topic, ack_deadline_seconds, dead_letter_policy)
            others = [pool.submit(self._create_subscription, topics.events_subscription, topics.events_topic, 60),
                      pool.submit(self._create_subscription, topics.dead_subscription, topics.dead_topic, 60)]
            if topics.standard_topic:
                others.append(pool.submit(self._create_subscription, topics.standard_subscription, topics.standard_topic,
                                          ack_deadline_seconds, dead_letter_policy))
            for other in others:
                other.result()
            return work.result()

    def _create_topic(self, topic: str) -> None:
        try:
            self.publisher.create_topic(name=topic)
        except google_exceptions.AlreadyExists:
            pass

    def _create_subscription(self, name: str, topic: str, ack_deadline_seconds: int, dead_letter_policy: dict[str, Any] | None = None) -> bool:
        request: dict[str, Any] = {
            "name": name,
            "topic": topic,
            "ack_deadline_seconds": ack_deadline_seconds,
            # A nacked item should go back out at once, not after a backoff.
            "retry_policy": {"minimum_backoff": {"seconds": 0}, "maximum_backoff": {"seconds": 10}},
        }
        if dead_letter_policy:
            request["dead_letter_policy"] = dead_letter_policy
        try:
            self.subscriber.create_subscription(request=request)
            return True
        except google_exceptions.AlreadyExists:
            return False

    @translated("pubsub")
    def delete_run_topics(self, topics: RunTopics) -> None:
        """Delete the run's subscriptions and topics; ones already gone are skipped."""
        for subscription in topics.all_subscriptions():
            try:
                self.subscriber.delete_subscription(subscription=subscription)
            except google_exceptions.NotFound:
                log.debug("subscription %s already gone", subscription)
        for topic in topics.all_topics():
            try:
                self.publisher.delete_topic(topic=topic)
            except google_exceptions.NotFound:
                log.debug("topic %s already gone", topic)

    # -- publish -----------------------------------------------------------

    @translated("pubsub")
    def publish_many(
        self,
        topic: str,
        messages: Iterable[tuple[bytes, Mapping[str, str]]],
        on_progress: Callable[[int], None] | None = None,
        max_outstanding: int = PUBLISH_WINDOW,
    ) -> int:
        """Publish ``(data, attributes)`` pairs; the client batches them.

        At most ``max_outstanding`` messages wait for the service at a time,
        so memory stays flat however many items a run has.

        Args:
            on_progress: called with the count so far after every 1,000 acknowledged.
        Returns:
            The number published, once every one is acknowledged by the service.
        Raises:
            CloudError: of the first message that failed; later ones may not
                have been sent.
        """
        in_flight: collections.deque[Future[str]] = collections.deque()
        count = 0

        def settle_oldest() -> None:
            nonlocal count
            in_flight.popleft().result()
            count += 1
            if on_progress and count % 1000 == 0:
                on_progress(count)

        for data, attributes in messages:
            in_flight.append(self.publisher.publish(topic, data, **attributes))
            if len(in_flight) > max_outstanding:
                settle_oldest()
        while in_flight:
            settle_oldest()
        return count

    @translated("pubsub")
    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
        """Publish one message and wait until the service has it; returns its id."""
        return self.publisher.publish(topic, data, **attributes).result()

    @translated("pubsub")
    def publish_event(self, topic: str, event: Mapping[str, Any], wait: bool = True) -> str | None:
        """Publish one event. With ``wait=False`` return at once; a failure is only logged."""
        data, attributes = json.dumps(event, sort_keys=True).encode(), {"cflow_event": event["type"]}
        if wait:
            return self.publish(topic, data, attributes)
        future = self.publisher.publish(topic, data, **attributes)
        future.add_done_callback(_log_failed_event(event["type"]))
        return None

    # -- pull and settle ---------------------------------------------------

    @translated("pubsub")
    def pull(self, subscription: str, max_messages: int = 1, timeout: float = 30.0) -> list[Received]:
        """Synchronous pull. Returns up to ``max_messages`` ``Received``; [] when none came in time."""
        try:
            response = self.subscriber.pull(
                request={"subscription": subscription, "max_messages": max_messages}, timeout=timeout
            )
        except (google_exceptions.DeadlineExceeded, google_exceptions.RetryError):
            return []
        return [
            Received(
                ack_id=received.ack_id,
                data=received.message.data,
                attributes=dict(received.message.attributes),
                delivery_attempt=received.delivery_attempt,
            )
            for received in response.received_messages
        ]

    @translated("pubsub")
    def extend_lease(self, subscription: str, ack_id: str, seconds: int) -> None:
        self.subscriber.modify_ack_deadline(subscription=subscription, ack_ids=[ack_id], ack_deadline_seconds=seconds)

    @translated("pubsub")
    def ack(self, subscription: str, ack_ids: Iterable[str]) -> None:
        ack_ids = list(ack_ids)
        if ack_ids:
            self.subscriber.acknowledge(subscription=subscription, ack_ids=ack_ids)

    @translated("pubsub")
    def nack(self, subscription: str, ack_id: str) -> None:
        """Hand a message back for immediate redelivery, keeping its attributes."""
        self.extend_lease(subscription, ack_id, 0)

    @translated("pubsub")
    def drain_events(self, subscription: str, max_messages: int = 1000, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Pull and ack the events waiting, or the first to come within ``timeout`` seconds.

        Returns the decoded event dicts; undecodable ones are logged and dropped.
        """
        received = self.pull(subscription, max_messages=max_messages, timeout=timeout)
        events = []
        for message in received:
            try:
                events.append(json.loads(message.data))
            except ValueError:
                log.warning("dropping an event that is not JSON: %r", message.data[:80])
        self.ack(subscription, [m.ack_id for m in received])
        return events


def _log_failed_event(kind: str) -> Callable[["Future[str]"], None]:
    def check(future: "Future[str]") -> None:
        error = future.exception()
        if error is not None:
            log.warning("could not publish %s event: %s", kind, error)

    return check
