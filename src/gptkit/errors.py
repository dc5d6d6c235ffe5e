"""The one exception type that means "the user's input is wrong".

The CLI turns a :class:`UserError` into a single ``error: ...`` line and exit code 2; any other
exception is a bug and keeps its traceback (exit code 1) so that it gets reported.
"""


class UserError(Exception):
    """Bad recipe, data, path or flag. The message is one line naming the file/field and what was expected."""


class TrainingStopped(Exception):
    """Training stopped for a reason that is not a bug (non-finite loss, ...). Exit code 3."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written at ``step``. Exit code 128 + signal number."""

    def __init__(self, step: int, signum: int):
        import signal

        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written")
        self.step, self.signum = step, signum
