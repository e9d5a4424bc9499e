"""Errors a user can act on: each message names what is wrong and, where possible, how to fix it."""


class MedlavaError(Exception):
    """Base class for every error medlava raises about its input."""


class ImagingError(MedlavaError):
    """An image or study could not be read or is unsupported."""


class ModelLoadError(MedlavaError):
    """A model folder is missing, incomplete or of an unknown layout."""
