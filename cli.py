"""The command-line convention shared by main.py and the tools: a mistake in the input is one line on stderr
starting with "error:" and a meaningful exit code, never a traceback. No torch import, so plot_metrics.py and
run_summary.py start fast."""
import argparse
import difflib
import errno
import sys

EXIT_FAILED = 1           # a failure the run survived (a dead loader, a lost peer): checkpoint saved (stop.py)
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


def describe_os_error(e):
    """An OSError as a few words, saying what the usual cause is when it is not obvious."""
    words = e.strerror or str(e)
    if e.errno == errno.ENOENT:
        words += " (was the folder deleted or moved?)"
    elif e.errno == errno.EROFS:
        words += " (the file system was made read-only)"
    return words


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the convention above: a mistake is one `error:` line naming the closest real flag (not the
    whole usage, 46 lines for main.py), and no abbreviations (`--epoch 1` is a typo to report, not a silent
    `--epochs 1`; a flag added later could otherwise change what an abbreviation means). --help is unchanged."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_argument_message(unknown[0], self._option_string_actions))
        return args

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def closest(word, choices):
    """The choice most like `word` (difflib's ratio), or None when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_argument_message(arg, options):
    """'unknown flag --batchsize: did you mean --batch-size?' for an argument that no option takes."""
    if not arg.startswith("-"):
        return f"unexpected argument {arg!r}"
    flag = arg.split("=", 1)[0]
    near = closest(flag, [o for o in options if o.startswith("--")] if flag.startswith("--") else options)
    return f"unknown flag {flag}" + (f": did you mean {near}?" if near else "")


def check_torchvision():
    """Import torch and torchvision, or exit with one line naming both versions. A torchvision built for another
    torch fails inside its own import (a CPU-only torch with a CUDA torchvision: "operator torchvision::nms does
    not exist"), a 27-line traceback that does not say what to do. Call it before anything imports torchvision."""
    import torch
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # RuntimeError for a missing operator; ImportError/OSError for a library built elsewhere
        if isinstance(e, ModuleNotFoundError) and e.name == "torchvision":
            fail("torchvision is not installed: pip install -r requirements.txt")
        from importlib import metadata
        try:
            version = metadata.version("torchvision")
        except metadata.PackageNotFoundError:
            version = "(version unknown)"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"torchvision {version} does not work with torch {torch.__version__} ({reason}): they come from "
             f"different builds; reinstall both from one index (README: Quick start)")


def fail(message, code=EXIT_USER_ERROR):
    """For failures found before run_tool can catch them (at import time): one line, then exit."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
