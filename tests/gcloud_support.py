"""Run the real gcloud CLI against a Compute emulator, as a user would point it there.

Each ``Gcloud`` has its own ``CLOUDSDK_CONFIG`` (a fresh folder, so nothing of
the machine's own gcloud configuration or credentials is read or written),
sends Compute requests to the emulator through
``CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE``, and either sends no credentials
(``CLOUDSDK_AUTH_DISABLE_CREDENTIALS``) or the emulator's token
(``CLOUDSDK_AUTH_ACCESS_TOKEN_FILE``) when one is given.
"""

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

GCLOUD = shutil.which("gcloud")
MISSING_REASON = "gcloud (Google Cloud SDK) is not installed; install google-cloud-cli to run the real-client tests"


@dataclass
class GcloudResult:
    """One gcloud command's exit status and output."""

    returncode: int
    stdout: str
    stderr: str

    def json(self):
        """The command's ``--format json`` output, parsed."""
        return json.loads(self.stdout)


@dataclass
class Gcloud:
    """gcloud pointed at one emulator (``base_url`` is ``http://H:P/compute/v1/``)."""

    base_url: str
    config_dir: Path
    project: str = "cflow-local"
    zone: str = "us-central1-a"
    token_file: Path | None = None
    extra_env: dict = field(default_factory=dict)

    def environment(self) -> dict:
        env = {key: value for key, value in os.environ.items() if not key.startswith("CLOUDSDK_")}
        env.update(
            CLOUDSDK_CONFIG=str(self.config_dir),
            CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE=self.base_url if self.base_url.endswith("/") else self.base_url + "/",
            CLOUDSDK_CORE_PROJECT=self.project,
            CLOUDSDK_COMPUTE_ZONE=self.zone,
            CLOUDSDK_COMPUTE_REGION=self.zone.rsplit("-", 1)[0],
            CLOUDSDK_CORE_DISABLE_PROMPTS="1",
            CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="true",
            CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="true",
            CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
        )
        if self.token_file is None:
            env["CLOUDSDK_AUTH_DISABLE_CREDENTIALS"] = "true"
        else:
            env["CLOUDSDK_AUTH_ACCESS_TOKEN_FILE"] = str(self.token_file)
        env.update(self.extra_env)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> GcloudResult:
        """Run ``gcloud ARGS``; with ``check``, a non-zero exit fails the test with gcloud's stderr."""
        assert GCLOUD, MISSING_REASON
        completed = subprocess.run(
            [GCLOUD, *args], capture_output=True, text=True, timeout=timeout, env=self.environment(), stdin=subprocess.DEVNULL
        )
        result = GcloudResult(completed.returncode, completed.stdout, completed.stderr)
        if check and completed.returncode != 0:
            raise AssertionError(f"gcloud {' '.join(args)} exited {completed.returncode}:\n{completed.stderr}")
        return result

    def json(self, *args: str) -> object:
        """Run ``gcloud ARGS --format json`` and return the parsed output."""
        return self.run(*args, "--format", "json").json()
