"""List answers: page tokens, ``maxResults``, and pages sent as ready JSON text.

GCE pages a list with an opaque ``pageToken``; here it is the (base64) sort
key of the page's last item, so a client walking pages sees every item once
even while others are inserted. ``RawJson`` lets a big page be assembled from
each resource's cached JSON text instead of being serialised again.
"""

import base64
from typing import Any

from cflow.local.compute import api_errors

DEFAULT_MAX_RESULTS = 500

Json = dict[str, Any]


class RawJson(str):
    """A response body that is already JSON text (list pages are built from cached text)."""


Answer = Json | RawJson | None  # what an API method returns: a JSON object, ready JSON text, or no content


def page_token(last_key: str) -> str:
    """The ``nextPageToken`` of a page whose last item sorts as ``last_key``."""
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def page_after(token: str | None) -> str | None:
    """The sort key a ``pageToken`` continues after (None: from the start).

    Raises:
        ApiError: 400 for a token we did not hand out.
    """
    if not token:
        return None
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise api_errors.invalid_field("pageToken", token, "Invalid page token.") from None


def max_results(value: str | None) -> int:
    """The page size a ``maxResults`` asks for (0 or absent: the default, 500).

    Raises:
        ApiError: 400 for anything but an integer in [0, 500].
    """
    if value in (None, ""):
        return DEFAULT_MAX_RESULTS
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise api_errors.invalid_field("maxResults", value, "Expected an integer.") from None
    if number < 0 or number > DEFAULT_MAX_RESULTS:
        raise api_errors.invalid_field("maxResults", value, f"Must be greater than or equal to 0 and less than or equal to {DEFAULT_MAX_RESULTS}")
    return number or DEFAULT_MAX_RESULTS


def item_list(base_url: str, kind: str, project: str, path: str, items: list[Json]) -> Json:
    """A whole (unpaged) list answer: ``kind``, ``id``, ``items`` and ``selfLink`` of ``projects/PROJECT/PATH``."""
    return {"kind": kind, "id": f"projects/{project}/{path}", "items": items, "selfLink": f"{base_url}projects/{project}/{path}"}


def no_results_warning(scope: str) -> Json:
    """What an aggregated list holds for a scope without items on the page, as GCE writes it."""
    return {
        "warning": {
            "code": "NO_RESULTS_ON_PAGE",
            "message": f"There are no results for scope '{scope}' on this page.",
            "data": [{"key": "scope", "value": scope}],
        }
    }


def aggregated_list(base_url: str, kind: str, project: str, resource: str, scopes: list[str], items: list[tuple[str, Json]]) -> Json:
    """A whole (unpaged) aggregatedList answer: ``items`` maps every scope to ``{resource: [...]}`` or a warning.

    Args:
        resource: the collection name (``disks``, ``operations``, ``machineTypes``), the key of each scope's list.
        scopes: every scope to answer for (``zones/Z``, ``regions/R``, ``global``), in order.
        items: (scope, item) pairs, in the order they are listed within a scope.
    """
    by_scope: dict[str, list[Json]] = {}
    for scope, item in items:
        by_scope.setdefault(scope, []).append(item)
    every_scope = scopes + [scope for scope in by_scope if scope not in scopes]
    scoped = {scope: ({resource: by_scope[scope]} if scope in by_scope else no_results_warning(scope)) for scope in every_scope}
    path = f"projects/{project}/aggregated/{resource}"
    return {"kind": kind, "id": path, "items": scoped, "selfLink": base_url + path}
