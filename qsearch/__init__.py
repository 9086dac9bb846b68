"""qsearch: find the most accurate quantized CNN that fits a model-size or BitOPs budget."""

__version__ = "0.1.0"


class QSearchError(ValueError):
    """A user-facing error: its message names the bad value, the valid choices and the fix.

    The CLI prints it as one line and exits non-zero, without a traceback.
    """
