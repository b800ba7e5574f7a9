"""Errors shown to users as one clear line (the CLI prints them and exits with status 2)."""


class CommandError(Exception):
    """Bad input (config, data folder, checkpoint, argument): the message names what is wrong."""
