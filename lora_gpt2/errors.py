"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 1."""


class LoraGPT2Error(Exception):
    """Base class of the errors that the CLI reports as one line."""


class CheckpointError(LoraGPT2Error, ValueError):
    """A checkpoint, adapter or state file that cannot be used as it is."""


class DataError(LoraGPT2Error, ValueError):
    """A text or token file that cannot be used as it is."""


class DownloadError(LoraGPT2Error):
    """A download that failed; the message names the URL."""


class TrainingStopped(LoraGPT2Error):
    """Training stopped on purpose (a NaN loss); the last good checkpoint is intact."""


class WriteError(LoraGPT2Error, OSError):
    """A file could not be written (disk full, permissions); the message names it, `reason` says why."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message
