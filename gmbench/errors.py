"""User-facing errors.

A :class:`GmbenchError` is something the user can fix (a bad suite field, a
missing data folder, an unknown plugin).  The CLI prints its message on one
line and exits non-zero without a traceback (unless ``--debug``).  Everything
else is a bug and keeps its traceback.
"""


class GmbenchError(Exception):
    """An error caused by user input; the message says what, where and what to do."""


class PluginError(GmbenchError):
    """Unknown plugin kind/name or a parameter the plugin does not accept."""


class DataError(GmbenchError):
    """Missing, malformed or corrupt data files."""


class SuiteError(GmbenchError):
    """A suite file that fails validation."""
