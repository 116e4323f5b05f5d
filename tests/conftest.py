"""Shared pytest fixtures: local Google services on 127.0.0.1, started on first use.

Session-scoped; each starts only when a test asks for it and its processes
are stopped (by pid, process group) at the end of the session:

- ``pubsub_emulator``: ``"127.0.0.1:PORT"`` of a standalone official Pub/Sub
  emulator. Set ``PUBSUB_EMULATOR_HOST`` to it (e.g. with
  ``monkeypatch.setenv``) before building ``pubsub_v1.PublisherClient()`` /
  ``SubscriberClient()``; no credentials are needed. It keeps topics across
  tests, so give each test its own topic/subscription names.
- ``gcs_server``: ``"http://127.0.0.1:PORT"`` of a standalone fake-gcs-server
  (filesystem backend in a tmp dir; it enforces generation preconditions).
- ``local_stack``: a full local stack (Pub/Sub, Cloud Storage, Compute
  emulator started with ``--shutdown-grace 2``) in a tmp dir; yields
  ``cflow.local.stack.StackInfo`` (``.env()`` gives the variables to set).

Building a google-cloud-storage client against ``gcs_server``: set
``STORAGE_EMULATOR_HOST`` to the URL *with* its ``http://`` scheme before
creating the client, then ``storage.Client(project="cflow-local",
credentials=google.auth.credentials.AnonymousCredentials())``. With the
variable set, the client sends every request (JSON API, uploads, downloads)
to the emulator; the explicit ``project`` is needed for ``create_bucket``
and ``list_buckets`` (the client finds none by itself), and anonymous
credentials keep it from looking for real ones. Resumable uploads work
because the server is started with ``-external-url`` equal to its own URL.
Buckets persist for the session: use a unique bucket name per test.

The ``stack`` marker: every test that uses a fixture which starts an
emulator (``STACK_FIXTURES``, or any fixture named ``*_stack``, directly or
through other fixtures) is marked ``stack`` at collection, so
``pytest -m "not stack"`` runs the fast tests alone and starts no emulator. A
test that starts an emulator itself (not through a fixture) carries
``@pytest.mark.stack`` explicitly.
"""

import pytest

from cflow.local.launchers import launch_pubsub_emulator, launch_storage_server
from cflow.local.services import stop_and_reap
from cflow.local.stack import ComputeOptions, LocalStack

# Fixtures that start an emulator (besides any fixture named *_stack):
# compute_emulator, compute and start_compute_emulator live in tests/local/conftest.py.
STACK_FIXTURES = frozenset({"local_stack", "pubsub_emulator", "gcs_server", "compute_emulator", "start_compute_emulator"})


def starts_an_emulator(fixture_name):
    """True for a fixture that starts (or is) an emulator: what the ``stack`` marker is given for."""
    return fixture_name in STACK_FIXTURES or fixture_name.endswith("_stack")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # tryfirst: the marker must be on the items before `-m` deselects by it.
    for item in items:
        if any(starts_an_emulator(name) for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory):
    """Yield ``"127.0.0.1:PORT"`` of a Pub/Sub emulator started for this session."""
    log_dir = tmp_path_factory.mktemp("pubsub-emulator")
    service, process = launch_pubsub_emulator(log_dir / "pubsub.log")
    try:
        yield service.endpoint
    finally:
        stop_and_reap(service, process)


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """Yield ``"http://127.0.0.1:PORT"`` of a fake-gcs-server started for this session."""
    root = tmp_path_factory.mktemp("gcs-server")
    service, process = launch_storage_server(root / "data", root / "storage.log")
    try:
        yield service.endpoint
    finally:
        stop_and_reap(service, process)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    """Yield the StackInfo of a full local stack started for this session (VM shutdown grace 2 s)."""
    stack = LocalStack(tmp_path_factory.mktemp("local-stack"))
    info = stack.up(ComputeOptions(shutdown_grace=2))
    try:
        yield info
    finally:
        stack.down()
