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


def yaml_problem(exc: Exception) -> str:
    """One line for a YAML parse error ("line 3, column 1: expected ..."): PyYAML's own message
    spans several lines with a caret drawing, which the CLI's one-line errors cannot carry."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def validation_problem(exc: Exception) -> str:
    """The first problem of a pydantic ValidationError as `field.path: message`, one line."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "value"
    more = len(exc.errors()) - 1
    return f"{where}: {first.get('msg')}" + (f" (and {more} more)" if more else "")
