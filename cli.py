"""The command-line convention shared by main.py and the tools: a mistake in the input is one line on stderr
starting with "error:" and exit code 2, never a traceback. No torch import, so plot_metrics.py starts fast."""
import sys

EXIT_USER_ERROR = 2


class UserError(RuntimeError):
    """A mistake in the command line, files or environment: printed as one line, exit code 2."""


def run_tool(main, args, expected=()):
    """main(args)'s exit code; a UserError, or one of the `expected` exception types, becomes one line."""
    try:
        return main(args)
    except (UserError, *expected) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
