"""Build the Google clients once, for GCP or for the local cloud.

Local mode differs only in endpoints: ``PUBSUB_EMULATOR_HOST`` and
``STORAGE_EMULATOR_HOST`` are honoured by the Pub/Sub and Storage clients
themselves; Compute gets ``CFLOW_COMPUTE_ENDPOINT`` as its api_endpoint, and
sends the local stack's bearer token (``CFLOW_COMPUTE_TOKEN_FILE``), as a
client sends its access token to GCE.
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.auth.credentials import Credentials

from cflow.errors import CloudError, CredentialsRejected
from cflow.local import ENV_COMPUTE, ENV_COMPUTE_TOKEN_FILE, ENV_PUBSUB, ENV_STORAGE

log = logging.getLogger(__name__)

COMPUTE_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


@dataclass
class Clients:
    """The Google clients of one process, built once and passed to the seams."""

    compute: Any  # googleapiclient compute v1 resource (None on a worker)
    publisher: Any  # pubsub_v1.PublisherClient
    subscriber: Any  # pubsub_v1.SubscriberClient
    storage: Any  # storage.Client
    project: str
    iam: Any = None  # googleapiclient iam v1 resource, on GCP only (the preflight reads service accounts)


def credentials_for(target: str, credential_file: str | Path | None = None) -> tuple[Any, str | None]:
    """Returns (credentials, project or None).

    Raises:
        CredentialsRejected: on GCP, when no credentials can be found.
    """
    from google.auth.credentials import AnonymousCredentials

    if target == "local":
        return AnonymousCredentials(), None
    if credential_file:
        from google.oauth2 import service_account

        credentials = service_account.Credentials.from_service_account_file(str(credential_file), scopes=COMPUTE_SCOPES)
        return credentials, credentials.project_id
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return google.auth.default(scopes=COMPUTE_SCOPES)
    except DefaultCredentialsError:
        raise CredentialsRejected(
            "no Google credentials found; run `gcloud auth application-default login` "
            "or put a service-account key in credential/ and set CREDENTIAL_FILE in const.py"
        ) from None


class EmulatorToken(Credentials):
    """The local Compute emulator's bearer token, sent as an access token is sent to GCE.

    It never expires and cannot be refreshed: a refused token stays refused,
    so a 401 reaches the caller as GCE's answer.
    """

    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token

    def refresh(self, request: Any) -> None:
        """Nothing to refresh (the token lives as long as the stack)."""


def emulator_credentials(token_file: str | os.PathLike[str] | None) -> Credentials:
    """Credentials for the local Compute emulator: its token from ``token_file``, or anonymous without one.

    Raises:
        CloudError: the token file cannot be read (the stack that wrote it is gone).
    """
    from google.auth.credentials import AnonymousCredentials

    if not token_file:
        return AnonymousCredentials()
    try:
        token = Path(token_file).read_text().strip()
    except OSError as error:
        raise CloudError(
            f"cannot read the Compute emulator's token {token_file} ({error.strerror}); restart the stack with `eval \"$(cflow local up)\"`"
        ) from None
    return EmulatorToken(token)


def build_local_compute(endpoint: str, token_file: str | os.PathLike[str] | None = None) -> Any:
    """A Compute client for the local emulator at ``endpoint``, sending the token in ``token_file`` if given."""
    return build_compute(emulator_credentials(token_file), endpoint)


def build_compute(credentials: Any, endpoint: str | None = None) -> Any:
    """A googleapiclient Compute Engine v1 resource (static discovery document), at ``endpoint`` when given."""
    from googleapiclient import discovery

    client_options = {"api_endpoint": endpoint} if endpoint else None
    return discovery.build(
        "compute", "v1", credentials=credentials, client_options=client_options, static_discovery=True, cache_discovery=False
    )


def build_clients(
    target: str,
    project: str,
    credential_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    publish_batch_size: int = 1000,
) -> Clients:
    """Build every client a controller needs.

    Args:
        target: "local" or "gcp".
        project: the project id (local: the stack's project).
        credential_file: optional key file (controller only, GCP only).
        environ: where local endpoints are read (default os.environ).
        publish_batch_size: messages the publisher sends in one batch.
    Raises:
        CredentialsRejected: on GCP, no credentials found.
        CloudError: locally, the stack's endpoints are not set, or its token file is unreadable.
    """
    from google.cloud import pubsub_v1, storage

    environ = os.environ if environ is None else environ
    credentials, _ = credentials_for(target, credential_file)
    compute_endpoint = None
    compute_credentials = credentials
    if target == "local":
        compute_endpoint = environ.get(ENV_COMPUTE)
        missing = [name for name in (ENV_PUBSUB, ENV_STORAGE, ENV_COMPUTE) if not environ.get(name)]
        if missing:
            raise CloudError(f"local mode needs {', '.join(missing)}; start the stack with `eval \"$(cflow local up)\"`")
        compute_credentials = emulator_credentials(environ.get(ENV_COMPUTE_TOKEN_FILE))
    batch_settings = pubsub_v1.types.BatchSettings(max_messages=publish_batch_size, max_latency=0.05)
    publisher = pubsub_v1.PublisherClient(batch_settings=batch_settings, credentials=None if target == "local" else credentials)
    subscriber = pubsub_v1.SubscriberClient(credentials=None if target == "local" else credentials)
    storage_client = storage.Client(project=project, credentials=credentials)
    return Clients(
        compute=build_compute(compute_credentials, compute_endpoint),
        publisher=publisher,
        subscriber=subscriber,
        storage=storage_client,
        project=project,
        iam=None if target == "local" else build_iam(credentials),
    )


def build_iam(credentials: Any) -> Any:
    """A googleapiclient IAM v1 resource (static discovery document)."""
    from googleapiclient import discovery

    return discovery.build("iam", "v1", credentials=credentials, static_discovery=True, cache_discovery=False)


def vm_credentials(target: str) -> Any:
    """The VM's own service account, built without a request: its token is fetched with the first call.

    ``google.auth.default`` would probe the metadata server first; the shutdown
    hook must reach the network first with its nack.
    """
    if target == "local":
        from google.auth.credentials import AnonymousCredentials

        return AnonymousCredentials()
    from google.auth import compute_engine

    return compute_engine.Credentials()


def build_storage_client(target: str, project: str, credential_file: str | Path | None = None) -> Any:
    """A Cloud Storage client alone: for reading runs when nothing else is needed (locally, no stack running).

    Locally it talks to ``STORAGE_EMULATOR_HOST``, which the caller sets.

    Raises:
        CredentialsRejected: on GCP, no credentials found.
    """
    from google.cloud import storage

    credentials, _ = credentials_for(target, credential_file)
    return storage.Client(project=project, credentials=credentials)


def build_worker_clients(target: str, project: str, credentials: Any = None) -> Clients:
    """Clients for a worker VM: the VM's own service account on GCP, emulators locally.

    Workers never need Compute; they get Pub/Sub and Storage only.

    Args:
        credentials: the credentials to use (default: found as ``credentials_for`` finds them).
    """
    from google.cloud import pubsub_v1, storage

    if credentials is None:
        credentials, _ = credentials_for(target)
    # A worker waits for each of its few messages (events, a retry) before it
    # goes on; a batch of one is sent at once instead of after the client's
    # default 10 ms wait for company, which every item paid twice.
    batch_settings = pubsub_v1.types.BatchSettings(max_messages=1)
    publisher = pubsub_v1.PublisherClient(batch_settings=batch_settings, credentials=None if target == "local" else credentials)
    subscriber = pubsub_v1.SubscriberClient(credentials=None if target == "local" else credentials)
    return Clients(
        compute=None,
        publisher=publisher,
        subscriber=subscriber,
        storage=storage.Client(project=project, credentials=credentials),
        project=project,
    )
