"""medvlm's error type: every user-facing failure names what and where."""


class MedvlmError(Exception):
    """A user-facing error (bad input, missing file, wrong option). The CLI prints it without a traceback."""
