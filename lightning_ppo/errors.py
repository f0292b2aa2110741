"""The one exception type for user mistakes; it imports nothing, so pure modules can raise it too."""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class ConfigError(ValueError):
    """A mistake in the configuration or the files it names; the message says which key and what to do."""


class RemoteRewardError(RuntimeError):
    """A reward server gave no usable scores: the message names the URL, the fault and what to check."""


class DiskFullError(OSError):
    """A checkpoint write that ran out of space (ENOSPC, EDQUOT); `previous` is the intact checkpoint."""

    def __init__(self, path: str, previous: str | None) -> None:
        super().__init__(f"disk full while writing {path}")
        self.path, self.previous = path, previous

    def advice(self) -> str:
        """One paragraph: what failed, what is intact, what to do."""
        if self.previous is None:
            kept = "no earlier checkpoint is in that folder. Free space on that disk and start the fit again"
        else:
            kept = (
                f"the previous checkpoint {self.previous} is intact. Free space on that disk and resume with "
                f"--ckpt_path {self.previous}"
            )
        return f"disk full while writing the checkpoint {self.path} (nothing of it was kept); {kept}"


def config_error_in(error: BaseException) -> ConfigError | None:
    """The `ConfigError` behind `error`, if any: jsonargparse re-raises errors of the classes it builds."""
    return error_in(error, ConfigError)


def error_in(error: BaseException, kind: type[E]) -> E | None:
    """The first exception of type `kind` in `error`'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def check_number(
    key: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
    optional: bool = False,
) -> None:
    """Refuse a `value` of config `key` that is not a (finite) number in the interval from `low` to `high`.

    The bounds are inclusive unless `open_low`/`open_high`; None leaves that side unbounded. `integer`
    asks for an int; `optional` lets null through (the key then falls back to its documented default).
    """
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    is_number = isinstance(value, kinds) and not isinstance(value, bool)
    in_range = (
        is_number
        and value == value  # not NaN
        and abs(value) != float("inf")
        and (low is None or (value > low if open_low else value >= low))
        and (high is None or (value < high if open_high else value <= high))
    )
    if in_range:
        return
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        bounds = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        bounds = f"{'>' if open_low else '>='} {low}"
    elif high is not None:
        bounds = f"{'<' if open_high else '<='} {high}"
    else:
        bounds = "finite"
    null = " or null" if optional else ""
    raise ConfigError(f"{key} must be {kind} {bounds}{null}, got {value!r}")
