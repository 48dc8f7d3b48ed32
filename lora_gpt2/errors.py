"""Errors a user can cause. The CLI turns each into one line on stderr and exit code 1."""


class CheckpointError(ValueError):
    """A checkpoint, adapter or data file that cannot be used as it is."""
