"""User-facing errors shared by both CLIs: one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ModelFolderError(UserError):
    """An exported model folder is missing, incomplete, corrupted or for another target."""
