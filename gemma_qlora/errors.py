"""One exception type for mistakes a user can fix.

The command line prints a `UserError` as one line and exits 2; everything else is a
bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input or environment: the message says what happened and what to do."""
