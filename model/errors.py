"""The one mark that separates a user's mistake from a bug.

A command-line run that fails on a :class:`UserError` (a missing file, a checkpoint of another
model, a bad setting) prints its message and exits; anything else is a bug and keeps its
traceback. Domain errors also subclass ``ValueError``, which callers already catch.
"""


class UserError(Exception):
    """A mistake in what the user gave (a file, an option, a setting); the message says which."""
