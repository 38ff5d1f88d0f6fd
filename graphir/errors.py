"""The base of every error that is the user's input, not a bug: the CLI prints it on one line."""


class GraphirError(ValueError):
    """Bad input: a file, an option, a configuration or a placement graphir cannot honour."""
