"""The Compute emulator's request parsing, as GCE parses it: list filters as gcloud sends them,
fingerprints as bytes, bearer tokens (no emulator started)."""

import base64
import os
import stat

import pytest

from cflow.local.compute.api_errors import ApiError
from cflow.local.compute.auth import BearerTokenCheck, TokenFileError, read_token_file
from cflow.local.compute.filters import compile_filter
from cflow.local.compute.resources import fingerprint_bytes, fingerprints_match
from cflow.local.launchers import read_token, write_fresh_token

VM = {"name": "vm-1", "status": "RUNNING", "zone": "http://h/compute/v1/projects/p/zones/us-central1-a", "labels": {"env": "prod"},
      "operationGroupId": "0f1e2d3c-aaaa-4bbb-8ccc-123456789abc", "scheduling": {"preemptible": True}}  # fmt: skip


def matches(text, resource=VM):
    return compile_filter(text)(resource)


# What gcloud's filter_rewrite sends for `--filter`, and whether VM passes it.
GCLOUD_FILTERS = [
    ('name eq ".*\\bvm\\-1\\b.*"', True),  # --filter name=vm-1
    ('name eq ".*\\bvm\\b.*"', True),  # \b: "vm" is a word of "vm-1"
    ('name eq ".*\\bvm1\\b.*"', False),
    ('name ne ".*\\bvm\\-1\\b.*"', False),  # --filter name!=vm-1
    ('name eq ".*(^vm).*"', True),  # --filter name~^vm
    ('(status eq RUNNING)(name eq ".*(^vm).*")', True),  # --filter "status=RUNNING AND name~^vm"
    ('(status eq RUNNING)(name eq ".*(^xx).*")', False),
    ("status ne TERMINATED", True),  # --filter status!=TERMINATED
    ('zone eq ".*\\bus\\-central1\\-a\\b.*"', True),  # --filter zone:us-central1-a
    ('zone eq ".*\\bus\\-central1\\-b\\b.*"', False),
    ('operationGroupId eq ".*\\b0f1e2d3c\\-aaaa\\-4bbb\\-8ccc\\-123456789abc\\b.*"', True),
]


@pytest.mark.parametrize(("text", "expected"), GCLOUD_FILTERS)
def test_gcloud_rewritten_filters_keep_their_regular_expression_escapes(text, expected):
    assert matches(text) is expected


def test_eq_matches_the_whole_field_and_literals_lose_their_escapes():
    assert not matches("name eq vm")  # the whole field must match
    assert matches("name eq vm-.*") and matches('name eq "vm-1"')
    assert matches('labels.env = "pr\\od"')  # a literal: the backslash only escapes
    assert matches('name eq "vm\\-1"')  # a regular expression: \- stays an escaped dash
    assert matches("scheduling.preemptible eq true") and matches("scheduling.preemptible = true")
    assert matches('labels.env = "prod" AND (status = RUNNING OR status = STAGING)')
    assert not matches("NOT labels.env = prod")


def test_a_regular_expression_that_does_not_compile_is_400():
    with pytest.raises(ApiError) as refused:
        compile_filter('name eq "vm-(1"')
    assert refused.value.code == 400 and refused.value.reason == "invalid"


def test_fingerprints_are_compared_as_bytes_in_either_base64_alphabet():
    raw = bytes([0xFB, 0xFF, 0xBE, 0x01, 0x02, 0x03, 0x04, 0x05])  # encodes with '+' and '/' in standard base64
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert "+" in standard and "/" in standard and standard != urlsafe
    assert fingerprints_match(standard, standard)
    assert fingerprints_match(urlsafe, standard), "gcloud sends fingerprints back URL-safe encoded"
    assert fingerprints_match(urlsafe.rstrip("="), standard)
    assert fingerprint_bytes(urlsafe) == raw
    other = base64.b64encode(bytes(8)).decode()
    for refused in (other, None, "", "not base64!", standard[:-2] + "+_", 42):
        assert not fingerprints_match(refused, standard), refused


def test_the_token_check_refuses_missing_and_wrong_tokens_as_gce_does():
    check = BearerTokenCheck("s3cret-token")
    assert check.refusal("Bearer s3cret-token") is None
    assert check.refusal("bearer  s3cret-token ") is None
    missing = check.refusal(None)
    assert missing is not None and missing.code == 401 and missing.reason == "required"
    body = missing.to_json()["error"]
    assert body["status"] == "UNAUTHENTICATED" and body["message"].startswith("Request is missing required authentication credential.")
    assert body["errors"] == [{"message": "Login Required.", "domain": "global", "reason": "required", "location": "Authorization", "locationType": "header"}]
    assert missing.headers == {"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'}
    for wrong in ("Bearer s3cret-tokex", "Bearer ", "Basic s3cret-token", "s3cret-token"):
        refusal = check.refusal(wrong)
        assert refusal is not None and refusal.code == 401 and refusal.reason == "authError", wrong
        assert refusal.to_json()["error"]["message"].startswith("Request had invalid authentication credentials.")
        assert refusal.headers["WWW-Authenticate"].endswith('error="invalid_token"')


def test_a_fresh_token_file_is_for_its_owner_only(tmp_path):
    path = tmp_path / "compute-token"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    write_fresh_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = read_token(path)
    assert token != "old" and len(token) >= 32 and read_token_file(path) == token
    write_fresh_token(path)
    assert read_token(path) != token


def test_an_unusable_token_file_is_one_line_saying_how_to_fix_it(tmp_path):
    for content in ("", "two words\n"):
        path = tmp_path / "token"
        path.write_text(content)
        with pytest.raises(TokenFileError) as refused:
            read_token_file(path)
        assert "\n" not in str(refused.value) and "--auth-token-file" in str(refused.value)
    with pytest.raises(TokenFileError):
        read_token_file(tmp_path / "missing")
