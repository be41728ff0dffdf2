"""User-facing errors: the CLI prints their message as one line and exits non-zero."""

import re

_REMOTE = re.compile(r"anomalyfleet\.errors\.(?P<kind>[A-Za-z]+Error): (?P<message>.+)$")


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


UNREADABLE = "corrupt, empty or not an image"
# What PIL raises on a file it cannot decode (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


def unreadable_image(where) -> DataError:
    """The one error every reader gives for bytes that do not decode as an image."""
    return DataError(f"cannot read image {where}: {UNREADABLE}")


def user_error_in(exc: BaseException) -> AnomalyFleetError | None:
    """The AnomalyFleetError behind `exc`, also when Ray carried it from a worker: Ray wraps a task's
    or actor's exception (RayTaskError, and Ray Data's UserCodeException) in messages holding the
    remote traceback, keeping the original as `.cause` or in the exception chain. None if there is
    none (a bug, which keeps its traceback)."""
    stack, seen = [exc], set()
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        wrapper = any(cls.__name__ in ("RayTaskError", "RayActorError", "UserCodeException")
                      for cls in type(current).__mro__)
        if isinstance(current, AnomalyFleetError) and not wrapper:
            return current
        cause = getattr(current, "cause", None)
        # (Not __context__: an error raised while handling one of ours is a bug of its own.)
        stack.extend([current.__cause__, cause if isinstance(cause, BaseException) else None])
    # Ray Data keeps only the text of a worker's exception (its UserCodeException has no cause):
    # the remote traceback's last line of ours names the class and the message. Only Ray's own
    # exceptions are read so.
    if not type(exc).__module__.startswith("ray."):
        return None
    found = None
    for line in str(exc).splitlines():
        match = _REMOTE.search(line)
        if match and isinstance(globals().get(match["kind"]), type) \
                and issubclass(globals()[match["kind"]], AnomalyFleetError):
            found = globals()[match["kind"]](match["message"].strip())
    return found


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
    where = ".".join(str(p) for p in first.get("loc", ()))
    # pydantic prefixes the message of a ValueError raised by our own validators; it says nothing.
    message = str(first.get("msg", "")).removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    return (f"{where}: {message}" if where else message) + (f" (and {more} more)" if more else "")
