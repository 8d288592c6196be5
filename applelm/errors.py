"""Errors that reach users as one clear line (CLI: stderr and exit 2; server: a 4xx JSON body)."""


class UserError(Exception):
    """Bad input from the user: a path, a file, a flag or a request. Its message is shown as is."""


class ModelFormatError(UserError):
    """A checkpoint that is missing, truncated, corrupt or of an unsupported kind."""


class UnsupportedError(UserError):
    """Valid input that this runtime does not handle (an architecture, a tensor type, a RoPE variant)."""
