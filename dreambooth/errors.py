"""The two kinds of failure a user can act on; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message names the flag or file, the hint says how. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class EnvironmentProblem(UserError):
    """The machine, not the input: GPU, driver, disk, a missing library. Exit code 3."""

    exit_code = 3


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite numbers: nothing past the last good checkpoint is saved."""
