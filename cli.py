"""The command-line convention shared by main.py and the tools: a mistake in the input is one line on stderr
starting with "error:" and a meaningful exit code, never a traceback. No torch import, so plot_metrics.py and
run_summary.py start fast."""
import sys

EXIT_USER_ERROR = 2       # bad input: arguments, files, dataset, device, environment
EXIT_NUMERICAL_ERROR = 3  # the loss went non-finite: stopped without touching the last good checkpoint
EXIT_PREEMPTED = 75       # EX_TEMPFAIL, "try again later": stopped by a signal, resume with --resume auto


class UserError(RuntimeError):
    """A mistake in the command line, files or environment: printed as one line, exit code 2.
    data.DataError and device.DeviceError are UserErrors too."""


class NumericalError(RuntimeError):
    """A non-finite loss: printed as one line, exit code 3."""


def run_tool(main, args, expected=()):
    """main(args)'s exit code; a UserError, a NumericalError or one of the `expected` exception types (say
    OSError for a tool that only writes a file) becomes one line on stderr."""
    try:
        return main(args)
    except (UserError, *expected) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except NumericalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_NUMERICAL_ERROR
