"""The one exception type for bad user input (recipe, flag, file, checkpoint).

The CLI turns a `UserError` into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback. Core code raises it so that library users get the same clear messages.
"""


class UserError(Exception):
    """Bad input from the user; the message names the thing and what was expected."""
