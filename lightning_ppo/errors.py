"""The one exception type for user mistakes; it imports nothing, so pure modules can raise it too."""


class ConfigError(ValueError):
    """A mistake in the configuration or the files it names; the message says which key and what to do."""


def config_error_in(error: BaseException) -> ConfigError | None:
    """The `ConfigError` behind `error`, if any: jsonargparse re-raises errors of the classes it builds."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
