"""The cloud in a box: local stand-ins for Compute Engine, Pub/Sub and Cloud Storage.

The same CFlow code talks to these as to GCP; only endpoints change:

- Compute Engine: CFlow's own emulator (``cflow.local.compute``), REST at
  ``http://HOST:PORT/compute/v1/``; ``CFLOW_COMPUTE_ENDPOINT`` names it, and
  ``CFLOW_COMPUTE_TOKEN_FILE`` the file holding the bearer token it requires.
- Pub/Sub: the official emulator; ``PUBSUB_EMULATOR_HOST=HOST:PORT``.
- Cloud Storage: fake-gcs-server; ``STORAGE_EMULATOR_HOST=http://HOST:PORT``.
- Metadata server: one per emulated VM; ``GCE_METADATA_HOST`` and
  ``GCE_METADATA_IP`` (both ``HOST:PORT``, as google-auth reads them).

Modules: ``stack`` (LocalStack: up, down, status, stack.json), ``stack_cli``
(``cflow local``), ``launchers`` (the three programs: find, launch, options),
``services`` (one background service: launch, wait until ready, stop, port
retry), ``compute`` (the Compute Engine emulator), ``stored_runs`` (a
stack folder's Cloud Storage for the commands that read runs, when its stack
is not running). /proc (process state,
start time, boot id, listening sockets) is read through ``cflow.procinfo``,
which the worker shares.
"""

LOCAL_PROJECT = "cflow-local"
LOCAL_ZONE = "us-central1-a"
DEFAULT_STACK_DIR = ".cflow/local"

ENV_PUBSUB = "PUBSUB_EMULATOR_HOST"
ENV_STORAGE = "STORAGE_EMULATOR_HOST"
ENV_COMPUTE = "CFLOW_COMPUTE_ENDPOINT"
ENV_COMPUTE_TOKEN_FILE = "CFLOW_COMPUTE_TOKEN_FILE"
ENV_PROJECT = "CFLOW_PROJECT"
