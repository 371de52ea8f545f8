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
