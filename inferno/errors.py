class ConfigError(ValueError):
    """A bad configuration value. Its message is one line naming the key and what is allowed."""
