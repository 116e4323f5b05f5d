"""Google API refusals become CFlow's own classes, each with one actionable line."""

import json

import httplib2
import pytest
from google.api_core import exceptions as api_exceptions
from googleapiclient.errors import HttpError

from cflow.errors import (
    EXIT_USAGE,
    ApiNotEnabled,
    BucketNotFound,
    CloudError,
    CloudSetupError,
    ConfigError,
    Conflict,
    CredentialsRejected,
    NotFound,
    PermanentRequestError,
    PermissionDenied,
    PreconditionFailed,
    QuotaExceeded,
    RateLimited,
    ResourceNotReady,
    ServiceUnreachable,
    TransientError,
    ZoneStockout,
)
from cflow.gcp.errors import classify, classify_operation_error, is_transient, translated


def http_error(status, reason, message, **extra):
    body = {"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message, "domain": "global"}], **extra}}
    return HttpError(httplib2.Response({"status": status}), json.dumps(body).encode())


class StorageResponse:
    url = "https://storage.googleapis.com/storage/v1/b/my-bucket?projection=noAcl"


def test_compute_api_not_enabled():
    error = classify(http_error(403, "accessNotConfigured", "Compute Engine API has not been used in project 42 before or it is disabled."), project="proj")
    assert isinstance(error, CloudSetupError) and error.exit_status == EXIT_USAGE
    assert str(error) == "the Compute Engine API is not enabled in project proj; enable it: gcloud services enable compute.googleapis.com"


def test_pubsub_api_not_enabled():
    error = classify(api_exceptions.PermissionDenied("Cloud Pub/Sub API has not been used in project 42 before or it is disabled."), project="proj")
    assert "gcloud services enable pubsub.googleapis.com" in str(error)


def test_compute_permission_denied_names_the_role():
    error = classify(http_error(403, "forbidden", "Required 'compute.instances.create' permission for 'projects/p'"), project="p")
    assert "roles/compute.instanceAdmin.v1" in str(error) and "compute.instances.create" in str(error)


def test_storage_permission_denied_names_the_role():
    error = classify(api_exceptions.Forbidden("caller does not have storage.objects.create access", response=StorageResponse()), project="p")
    assert "Cloud Storage" in str(error) and "roles/storage.objectAdmin" in str(error)


def test_pubsub_permission_denied_names_the_role():
    error = classify(api_exceptions.PermissionDenied("User not authorized to perform this action."), project="p")
    assert "Pub/Sub" in str(error) and "roles/pubsub.editor" in str(error)


def test_quota_exceeded():
    error = classify(http_error(403, "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1."), project="p")
    assert "quota exceeded" in str(error) and "Limit: 8.0" in str(error) and "WORKER_NODE_CNT" in str(error)


def test_missing_bucket_is_a_configuration_error():
    error = classify(api_exceptions.NotFound("The specified bucket does not exist.", response=StorageResponse()), project="p")
    assert isinstance(error, ConfigError) and "BUCKET" in str(error)


@pytest.mark.parametrize("message", ["line one\nline two", "x" * 2000])
def test_every_translation_is_one_short_line(message):
    text = str(classify(http_error(500, "backendError", message), project="p"))
    assert "\n" not in text and len(text) < 400


# -- the classes, as the rest of CFlow reacts to them -----------------------------


@pytest.mark.parametrize(
    "error, cls",
    [
        (http_error(404, "notFound", "The resource 'projects/p/zones/z/instances/x' was not found"), NotFound),
        (http_error(409, "alreadyExists", "The resource 'x' already exists"), Conflict),
        (http_error(412, "conditionNotMet", "fingerprint mismatch"), PreconditionFailed),
        (http_error(429, "rateLimitExceeded", "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'"), RateLimited),
        (http_error(403, "userRateLimitExceeded", "User Rate Limit Exceeded"), RateLimited),
        (http_error(503, "backendError", "The service is currently unavailable."), TransientError),
        (http_error(400, "resourceNotReady", "The resource 'disk-1' is not ready"), ResourceNotReady),
        (http_error(400, "invalid", "Invalid value for field 'machineType'"), PermanentRequestError),
        (http_error(401, "authError", "Invalid Credentials"), CredentialsRejected),
        (http_error(403, "forbidden", "Required 'compute.instances.create' permission"), PermissionDenied),
        (http_error(403, "accessNotConfigured", "Compute Engine API has not been used in project 42"), ApiNotEnabled),
        (http_error(403, "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1."), QuotaExceeded),
        (http_error(503, "ZONE_RESOURCE_POOL_EXHAUSTED", "The zone does not have enough resources"), ZoneStockout),
        (api_exceptions.NotFound("Subscription does not exist"), NotFound),
        (api_exceptions.ServiceUnavailable("unavailable"), TransientError),
        (api_exceptions.DeadlineExceeded("deadline"), TransientError),
        (api_exceptions.TooManyRequests("slow down"), RateLimited),
        (api_exceptions.PreconditionFailed("generation mismatch", response=StorageResponse()), PreconditionFailed),
        (api_exceptions.BadRequest("bad"), PermanentRequestError),
        (ConnectionRefusedError(111, "Connection refused"), ServiceUnreachable),
        (TimeoutError("timed out"), ServiceUnreachable),
    ],
)
def test_every_google_error_gets_one_class(error, cls):
    classified = classify(error, project="p")
    assert type(classified) is cls
    assert isinstance(classified, CloudError) and "\n" not in str(classified)


def test_the_service_answer_is_kept_on_the_error():
    error = classify(http_error(400, "invalid", "Invalid value for field 'network': 'nets/none'"), "compute", "p")
    assert (error.status, error.reason, error.message, error.service) == (400, "invalid", "Invalid value for field 'network': 'nets/none'", "compute")
    assert str(error) == "Compute Engine refused a request: Invalid value for field 'network': 'nets/none'"


def test_transient_errors_are_the_ones_worth_a_retry():
    assert is_transient(http_error(503, "backendError", "x"))
    assert is_transient(http_error(429, "rateLimitExceeded", "x"))
    assert is_transient(ConnectionResetError(104, "reset"))
    assert not is_transient(http_error(404, "notFound", "x"))
    assert not is_transient(http_error(403, "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 8.0 in region r."))
    assert not is_transient(ValueError("not a Google error"))


def test_quota_metric_region_and_limit_come_from_the_message():
    error = classify(http_error(403, "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 8.0 in region us-central1."), "compute")
    assert (error.metric, error.region, error.limit) == ("CPUS", "us-central1", 8.0)


def test_quota_details_come_from_quota_info_when_gce_sends_it():
    entry = {
        "code": "QUOTA_EXCEEDED",
        "message": "Quota 'N2_CPUS' exceeded.  Limit: 24.0 in region europe-west4.",
        "errorDetails": [{"quotaInfo": {"metricName": "compute.googleapis.com/n2_cpus", "limitName": "N2-CPUS-per-project-region",
                                        "dimensions": {"region": "europe-west4"}, "limit": 24}}],
    }
    error = classify_operation_error(entry, "europe-west4-a")
    assert isinstance(error, QuotaExceeded)
    assert (error.metric, error.region, error.limit) == ("N2_CPUS", "europe-west4", 24.0)
    assert error.reason == "QUOTA_EXCEEDED"


def test_quota_metric_from_quota_info_alone_is_named_as_regions_get_lists_it():
    entry = {"code": "QUOTA_EXCEEDED", "message": "Quota exceeded.",
             "errorDetails": [{"quotaInfo": {"metricName": "compute.googleapis.com/in_use_addresses", "dimensions": {"region": "us-east1"}, "limit": 4}}]}
    error = classify_operation_error(entry, "us-east1-b")
    assert (error.metric, error.region, error.limit) == ("IN_USE_ADDRESSES", "us-east1", 4.0)


def test_operation_errors_are_classified_too():
    stockout = classify_operation_error({"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": "no resources"}, "us-central1-a")
    assert isinstance(stockout, ZoneStockout) and stockout.zone == "us-central1-a" and stockout.reason == "ZONE_RESOURCE_POOL_EXHAUSTED"
    unknown = classify_operation_error({"code": "UNSUPPORTED_OPERATION", "message": "no can do"})
    assert isinstance(unknown, PermanentRequestError) and unknown.reason == "UNSUPPORTED_OPERATION"
    assert isinstance(classify_operation_error({"code": "RESOURCE_NOT_READY", "message": "later"}), TransientError)


def test_a_missing_bucket_is_both_not_found_and_a_setting_to_fix():
    error = classify(api_exceptions.NotFound("The specified bucket does not exist.", response=StorageResponse()))
    assert isinstance(error, BucketNotFound) and isinstance(error, NotFound) and isinstance(error, ConfigError)
    assert error.exit_status == EXIT_USAGE
    assert isinstance(classify(http_error(403, "forbidden", "x")), CloudSetupError)


def test_translated_seam_methods_raise_only_cflow_classes_with_the_google_error_as_cause():
    class Seam:
        project = "proj-1"

        @translated("compute")
        def refused(self):
            raise http_error(404, "notFound", "The resource 'zones/nowhere' was not found")

        @translated("compute")
        def broken(self):
            raise KeyError("not a cloud error")

    with pytest.raises(NotFound) as caught:
        Seam().refused()
    assert isinstance(caught.value.__cause__, HttpError)
    with pytest.raises(KeyError):
        Seam().broken()


# -- GCE's answers that look alike and are not -----------------------------------


def test_a_rate_limit_in_quota_words_is_a_rate_limit_never_a_quota():
    message = ("Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'compute.googleapis.com' "
               "for consumer 'project_number:123'.")
    assert type(classify(http_error(403, "rateLimitExceeded", message), "compute")) is RateLimited
    # Even when the reason says quota: a limit per minute is a rate.
    assert type(classify(http_error(403, "quotaExceeded", message), "compute")) is RateLimited


def test_an_address_quota_is_a_quota_of_its_own_metric_not_of_cpus():
    error = classify(http_error(403, "quotaExceeded", "Quota 'IN_USE_ADDRESSES' exceeded.  Limit: 2.0 in region us-central1."), "compute")
    assert isinstance(error, QuotaExceeded)
    assert (error.metric, error.region, error.limit) == ("IN_USE_ADDRESSES", "us-central1", 2.0)


def test_an_organization_policy_is_a_permanent_refusal_naming_its_constraint():
    message = ("Constraint constraints/compute.vmExternalIpAccess violated for project 123. Add instance "
               "projects/p/zones/us-central1-a/instances/w-1 to the constraint to use external IP with it.")
    error = classify(http_error(412, "conditionNotMet", message), "compute")
    assert type(error) is PermanentRequestError
    assert error.constraint == "constraints/compute.vmExternalIpAccess"
    # A fingerprint mismatch is still a precondition.
    assert type(classify(http_error(412, "conditionNotMet", "Supplied fingerprint does not match current metadata fingerprint."),
                         "compute")) is PreconditionFailed


def test_what_gce_names_is_kept_on_the_error():
    error = classify(http_error(400, "invalid", "Invalid value for field 'resource.networkInterfaces[0].network': "
                                                "'global/networks/x'. The referenced network resource cannot be found."), "compute")
    assert error.field == "resource.networkInterfaces[0].network" and error.constraint is None
    missing = classify(http_error(404, "notFound", "The resource 'projects/p/global/networks/x' was not found"), "compute")
    assert missing.resource == "projects/p/global/networks/x"


def test_resource_not_ready_is_transient_at_once_and_in_an_operation():
    assert is_transient(http_error(400, "resourceNotReady", "The resource 'projects/p/zones/z/instances/w' is not ready"))
    assert isinstance(classify_operation_error({"code": "RESOURCE_NOT_READY", "message": "later"}), ResourceNotReady)
