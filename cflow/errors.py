"""Errors a user can act on.

Anything raised as a ``CflowError`` reaches the user as one line on stderr
(what is wrong and how to fix it) and the process exits with ``exit_status``;
a traceback is shown only with ``--debug``.
"""

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CflowError(Exception):
    """A failure the user can fix; the message is the whole story, on one line."""

    exit_status = EXIT_USAGE


class ConfigError(CflowError):
    """const.py (or a command-line override) is invalid."""


class StackError(CflowError):
    """The local cloud cannot be started, found or stopped."""

    exit_status = 1


class CloudError(CflowError):
    """A Google API refused a request in a way retrying will not fix."""

    exit_status = 1


class CloudSetupError(CloudError):
    """The cloud project is not set up for the run (API off, role missing, no credentials)."""

    exit_status = EXIT_USAGE
