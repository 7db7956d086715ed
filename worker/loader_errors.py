"""The loader's error type, shared by the loader and stage partitioning."""


class LoadError(Exception):
    """The deployment's model could not be built or loaded; the message says why."""
