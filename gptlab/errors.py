"""The one error type for bad user input, and the wrapper every script runs in: it turns that
error into a one-line message and ends a process of a multi-process launch cleanly.

Kept in a module of its own so that `models/` can raise it without importing the machinery.
"""

import os
import sys
import time
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


COLLECTIVE_THREADS_GRACE_S = 0.2
"""How long a process of a multi-process launch leaves the GIL to its process group's threads."""

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
    finally:
        let_collective_threads_finish()


def let_collective_threads_finish() -> None:
    """In one of several processes (torchrun, accelerate launch), hand the GIL to the process
    group's worker threads once more before the interpreter shuts down.

    A gloo worker thread frees the tensors of the last collective just after that collective has
    returned, and freeing a tensor that Python created takes the GIL. If the interpreter is
    already finalizing, Python ends that thread inside a C++ noexcept frame and the process
    aborts ("terminate called without an active exception", exit -6) after a run that succeeded:
    7 FSDP runs of `benchmark.py --memory` in 30 on two gloo processes, 0 in 30 with this pause
    (pytorch/pytorch#190489). destroy_process_group does not stop those threads in time: in
    both FSDP scripts measured they outlived it and a garbage collection, as something still
    holds the group. Sleeping releases the GIL, so a thread waiting for it finishes first.
    """
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # set by every launcher
        time.sleep(COLLECTIVE_THREADS_GRACE_S)
