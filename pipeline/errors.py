"""Typed exceptions raised at the boundaries. Each message names the input and how to fix it."""


class PipelineError(Exception):
    """Base class: the CLI prints the message (one line) and exits non-zero."""


class ConfigError(PipelineError):
    """A flag or YAML value is invalid."""


class SourceError(PipelineError):
    """The image source (folder, manifest, URI) cannot be read."""


class WeightsError(PipelineError):
    """Model weights cannot be found, downloaded or verified."""


class ProvenanceMismatch(PipelineError):
    """Two artifacts were made with different model, weights, layer or preprocessing."""


class OutputError(PipelineError):
    """An output folder cannot be written, or holds something we must not overwrite."""


class ArtifactError(PipelineError):
    """A stored artifact (Parquet, index, classifier) is missing, corrupt or inconsistent."""
