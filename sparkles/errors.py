"""The errors a user can fix, as one small hierarchy.

Front ends map them to something a person reads: the CLI prints ``error: …`` and exits 2, the server answers
HTTP 400. Anything that is not a ``SparklesError`` is a bug of ours and keeps its traceback.
"""


class SparklesError(Exception):
    """Something the user can fix: a bad input, config or checkpoint."""


class ConfigError(SparklesError):
    """An unknown key, a value of the wrong type, or parts that do not fit together."""


class InputError(SparklesError):
    """A bad conversation: role order, an unknown part, an unknown IMAGE# reference, too many images."""


class ImageLoadError(InputError):
    """An image that cannot be read: missing, unreadable, too large, or from a source that is not allowed."""


class ImageTimeoutError(ImageLoadError):
    """An image source too slow to read within its deadline: the server answers 504, since the source (a remote
    host, a slow filesystem) failed, not the request's form."""


class ContextLengthError(InputError):
    """The conversation does not fit the model's context."""


class CheckpointError(SparklesError):
    """A checkpoint folder or file that is missing parts, or whose keys or shapes do not fit the model."""


class TrainingDiverged(SparklesError):
    """The loss or gradients were NaN/inf for `max_nonfinite` steps in a row, or the weights to save hold NaN/inf:
    lower the learning rate, clip, or change the precision."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting for the serve engine: come back later (HTTP 429)."""


class EngineClosedError(RuntimeError):
    """The serve engine is shutting down or has stopped (HTTP 503)."""
