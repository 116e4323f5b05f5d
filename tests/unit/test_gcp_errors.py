"""Google API refusals become one actionable line each."""

import json

import httplib2
import pytest
from google.api_core import exceptions as api_exceptions
from googleapiclient.errors import HttpError

from cflow.errors import EXIT_USAGE, CloudSetupError, ConfigError
from cflow.gcp.errors import translate


def http_error(status, reason, message):
    body = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message, "domain": "global"}]}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(body).encode())


class StorageResponse:
    url = "https://storage.googleapis.com/storage/v1/b/my-bucket?projection=noAcl"


def test_compute_api_not_enabled():
    error = translate(http_error(403, "accessNotConfigured", "Compute Engine API has not been used in project 42 before or it is disabled."), "proj")
    assert isinstance(error, CloudSetupError) and error.exit_status == EXIT_USAGE
    assert str(error) == "the Compute Engine API is not enabled in project proj; enable it: gcloud services enable compute.googleapis.com"


def test_pubsub_api_not_enabled():
    error = translate(api_exceptions.PermissionDenied("Cloud Pub/Sub API has not been used in project 42 before or it is disabled."), "proj")
    assert "gcloud services enable pubsub.googleapis.com" in str(error)


def test_compute_permission_denied_names_the_role():
    error = translate(http_error(403, "forbidden", "Required 'compute.instances.create' permission for 'projects/p'"), "p")
    assert "roles/compute.instanceAdmin.v1" in str(error) and "compute.instances.create" in str(error)


def test_storage_permission_denied_names_the_role():
    error = translate(api_exceptions.Forbidden("caller does not have storage.objects.create access", response=StorageResponse()), "p")
    assert "Cloud Storage" in str(error) and "roles/storage.objectAdmin" in str(error)


def test_pubsub_permission_denied_names_the_role():
    error = translate(api_exceptions.PermissionDenied("User not authorized to perform this action."), "p")
    assert "Pub/Sub" in str(error) and "roles/pubsub.editor" in str(error)


def test_quota_exceeded():
    error = translate(http_error(403, "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1."), "p")
    assert "quota exceeded" in str(error) and "Limit: 8.0" in str(error) and "WORKER_NODE_CNT" in str(error)


def test_missing_bucket_is_a_configuration_error():
    error = translate(api_exceptions.NotFound("The specified bucket does not exist.", response=StorageResponse()), "p")
    assert isinstance(error, ConfigError) and "BUCKET" in str(error)


@pytest.mark.parametrize("message", ["line one\nline two", "x" * 2000])
def test_every_translation_is_one_short_line(message):
    text = str(translate(http_error(500, "backendError", message), "p"))
    assert "\n" not in text and len(text) < 400
