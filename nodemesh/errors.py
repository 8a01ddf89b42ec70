"""The one exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the user as one line (what was wrong,
where, what to do) and a non-zero exit; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with input, environment or permissions, explained in one line."""

    exit_code = 1
