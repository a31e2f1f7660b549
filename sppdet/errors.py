"""User-facing errors. The CLI prints their message as one line (no traceback)."""


class SppdetError(Exception):
    """An error caused by input, configuration or cache state; the message names the culprit."""


class DataError(SppdetError):
    """A bad or missing input file: image, annotation, split list, proposals."""


class ConfigError(SppdetError):
    """An unknown key, a wrong type, or an impossible value in a configuration."""


class CacheMismatchError(SppdetError):
    """A cache directory was made with settings that differ from the ones asked for now."""
