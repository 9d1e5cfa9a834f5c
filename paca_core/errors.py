"""Exceptions with messages that say what to do."""


class PacaConfigError(ValueError):
    """A configuration value or combination that cannot work."""


class TargetModuleError(ValueError):
    """``target_modules`` matched nothing, or matched a module we cannot adapt."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""
