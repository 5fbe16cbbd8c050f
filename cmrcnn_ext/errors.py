"""The base class of the errors that describe a user's mistake.

Each names the problem and its fix in its message (bad config values, data files, checkpoints,
command-line arguments). Command-line entry points print that message alone and exit with
code 2 (:func:`cmrcnn_ext.engine.cli.run`); ``--debug`` (or ``CMRCNN_DEBUG=1``) shows the traceback.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """A problem in the user's input, explained in the message; see the module docstring."""
