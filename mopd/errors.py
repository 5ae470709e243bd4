"""The few exception types mopd raises on purpose. Each message names the key, file, tensor,
teacher or position at fault, so a user can fix the input without reading the code."""


class MopdError(Exception):
    """Base class of every error mopd raises deliberately."""


class ConfigError(MopdError, ValueError):
    """A config value is missing, unknown, of the wrong type, out of range or inconsistent."""


class ObjectiveError(MopdError, ValueError):
    """Inputs to an objective do not fit together (shapes, ids outside the vocabulary, NaNs)."""


class TeacherError(MopdError, RuntimeError):
    """A teacher (or the router in front of it) could not produce valid scores."""


class EngineError(MopdError, RuntimeError):
    """A rollout/scoring engine is unreachable, refused a request, or answered garbage."""


class CheckpointError(MopdError, RuntimeError):
    """A checkpoint or HF export is missing, incomplete, or does not match the model."""


class DataError(MopdError, ValueError):
    """Prompt data is malformed beyond the configured tolerance."""


class NonFiniteLossError(MopdError, FloatingPointError):
    """The loss or gradient norm became NaN/inf; raised before the optimizer touches the weights."""


class CollapseError(MopdError, RuntimeError):
    """A watched diagnostic collapsed and ``diagnostics.on_alarm=stop`` ended the run; the message names
    the metric, the step and the last checkpoint from before the collapse."""
