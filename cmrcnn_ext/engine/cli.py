"""Running a command-line entry point: a user's mistake is one clear message, not a traceback.

Every command (``train_net.py``, ``cmrcnn-predict`` / ``export`` / ``demo`` ...)
runs its ``main`` through :func:`run`: an error of the project's own kind
(:class:`~cmrcnn_ext.errors.UserError`: bad config values or files, data files, checkpoints,
arguments) prints ``error: <message>`` to stderr and exits with code 2, the code of a usage
error. ``--debug`` on the command line, or ``CMRCNN_DEBUG=1``, shows the full traceback instead.
Other exceptions (bugs) always show their traceback. A training run stopped by a signal
(:class:`~cmrcnn_ext.engine.preemption.Preempted`) prints where it stopped and exits with code
75; one whose launcher lost a process (:class:`~cmrcnn_ext.engine.launch.LostProcessError`)
names the rank and exits with code 1.
"""

import os
import sys

from cmrcnn_ext.errors import UserError

__all__ = ["DEBUG_ENV", "USAGE_ERROR", "add_debug_argument", "run"]

#: Environment variable that turns tracebacks on (``CMRCNN_DEBUG=1``).
DEBUG_ENV = "CMRCNN_DEBUG"
#: Exit code of a user's mistake (argparse's code for usage errors).
USAGE_ERROR = 2


def add_debug_argument(parser):
    """Add ``--debug`` (show tracebacks of the project's errors) to an argparse parser."""
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the Python traceback of errors in your input (also {DEBUG_ENV}=1)",
    )
    return parser


def run(main, *args, argv=None):
    """Call ``main(*args)``; on a :class:`UserError`, print its message and exit with code 2.

    Args:
        main (callable): the command's main function.
        args: its arguments.
        argv (list[str] or None): the command line, searched for ``--debug`` (default
            ``sys.argv``).

    Returns:
        What ``main`` returns.
    """
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    from cmrcnn_ext.engine.launch import LostProcessError
    from cmrcnn_ext.engine.preemption import EXIT_PREEMPTED, Preempted

    try:
        return main(*args)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except LostProcessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        print(f"(add --debug or set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(USAGE_ERROR)
