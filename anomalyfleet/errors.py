"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class AnomalyFleetError(Exception):
    """Base class for errors caused by bad input or environment, not by a bug."""


class DataError(AnomalyFleetError):
    """A dataset, image or mask cannot be read or has the wrong layout or shape."""


class BundleError(AnomalyFleetError):
    """A detector bundle or checkpoint is missing, corrupt or does not match the backbone."""


class StorageError(AnomalyFleetError):
    """A storage URI cannot be read or written (missing object, credentials, endpoint down)."""


class ConfigError(AnomalyFleetError):
    """An option or configuration value is invalid."""
