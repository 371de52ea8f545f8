"""The one error type for bad input, and the checks every option goes through (one line naming the key)."""


class ConfigError(ValueError):
    """A bad configuration value. Its message is one line naming the key and what is allowed."""


def check_choice(key: str, value, allowed, what: str = "value"):
    """``value`` when it is one of ``allowed``; else a ConfigError naming ``key`` and the allowed values."""
    if value not in allowed:
        raise ConfigError(f"{key}: unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")
    return value


def check_int(key: str, value, low: int, allow_none: bool = False, hint: str = ""):
    """``value`` when it is an integer >= ``low`` (or None where allowed); else a ConfigError naming ``key``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (" or null" if allow_none else "")
        raise ConfigError(f"{key}: {value!r} must be {allowed}{hint}")
    return value


def check_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} must be true or false")
    return value


def check_number(key: str, value, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` when it is a number within [low, high] (``low_open``/``high_open``: that end excluded); else a
    ConfigError naming ``key`` and the range (a string where a number belongs too)."""
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ConfigError(f"{key}: {value!r} must be a number{where}")
    return value
