"""The exceptions jaxtl raises for bad input: each names the file, key or value and what to do."""


class JaxtlError(Exception):
    """Base class of every error jaxtl raises on purpose."""


class UnknownModelError(JaxtlError, KeyError):
    """An architecture name that the registry does not know."""

    def __str__(self) -> str:  # KeyError would quote the message.
        return str(self.args[0])


class WeightsError(JaxtlError):
    """Weights that cannot be found, read, trusted or loaded."""


class WeightsMismatchError(WeightsError):
    """Weights whose keys or shapes do not fit the architecture."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)


class DataError(JaxtlError):
    """A dataset, folder or image that cannot be used: names the path and what to do."""
