"""IAM, read only: whether a service account exists, for the preflight.

The controller's ``roles/iam.serviceAccountUser`` on the workers' account
lets it read that account; without the IAM API or that role the answer is
"cannot tell", never a failure: GCE itself refuses a missing account when the
workers are created, and the run reacts to that refusal.
"""

import logging
from typing import Any

from cflow.errors import CloudError, NotFound
from cflow.gcp.errors import classify, is_google_error

log = logging.getLogger(__name__)


class ServiceAccounts:
    """The IAM API's service accounts of any project, read only.

    Args:
        service: a googleapiclient ``iam`` v1 resource.
    """

    def __init__(self, service: Any) -> None:
        self.service = service

    def exists(self, email: str) -> bool | None:
        """True if the account exists, False if IAM says it does not, None if IAM cannot be asked or refuses to say.

        A 404 is "does not exist"; a 403 is ambiguous (IAM answers 403 for an
        account the caller may not see, whether or not it exists), so it is None.
        """
        try:
            self.service.projects().serviceAccounts().get(name=f"projects/-/serviceAccounts/{email}").execute(num_retries=2)
            return True
        except Exception as error:
            if not is_google_error(error):
                raise
            classified: CloudError = classify(error, "compute")
            if isinstance(classified, NotFound):
                return False
            log.debug("cannot tell whether service account %s exists: %s", email, classified)
            return None
