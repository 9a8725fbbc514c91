"""Child processes that a test stops with Ctrl+C (SIGINT), as a terminal would."""
import signal


def sigint_as_a_terminal_sends_it() -> None:
    """``preexec_fn`` of such a child: SIGINT at its default disposition. A process started from a non-interactive
    shell's background job or from a pytest-xdist worker may inherit SIGINT ignored, and a Python started so never
    raises KeyboardInterrupt: the test would check nothing of what a user's Ctrl+C does."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
