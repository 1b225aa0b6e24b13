"""Errors that end a run with one clear message.

`train.py` and `evaluate.py` print a `RobustAttrError` as a single line and exit non-zero without a
traceback: the message is the whole story (what is wrong, and what to do about it).
"""


class RobustAttrError(Exception):
    """An error caused by the user's input (config, data, checkpoint) rather than by a bug."""


class ConfigError(RobustAttrError, ValueError):
    """A configuration value that parses but cannot work (wrong class count, impossible epsilon, ...)."""


class DatasetNotFoundError(RobustAttrError, FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded."""
