"""The one error type for bad user input, and the wrapper that turns it into a one-line message.

Kept in a module of its own so that `models/` can raise it without importing the machinery.
"""

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


# Set by a script that can say what a rerun will do after Ctrl-C (train.py: the snapshot it
# continues from); called with no arguments when the user interrupts.
interrupt_hint: Callable[[], str] | None = None


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(argv): a UserError becomes `error: ...` on one line and exit code 2;
    Ctrl-C becomes one line too (exit code 130), never a traceback."""
    try:
        main(sys.argv[1:])
    except UserError as error:
        message = " ".join(str(error).split()) or "invalid input"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        try:
            hint = interrupt_hint() if interrupt_hint else ""
        except (Exception, KeyboardInterrupt):  # a second Ctrl-C, say: the line still comes
            hint = ""
        if sys.stderr.isatty():  # a line of its own, even if Ctrl-C came in the middle of one
            print(file=sys.stderr)
        print(f"interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        sys.exit(130)
