"""One exception type for every error a user can fix; the CLI prints it without a traceback."""


class PPFlowerError(Exception):
    """A problem with the user's input (data, weights, checkpoints, options) — message says how to fix it."""
