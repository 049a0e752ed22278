"""One exception type per kind of user mistake; the CLI prints their message on one line."""


class PetformersError(Exception):
    """Base of every error caused by user input (files, configs, flags), not by a bug."""


class ConfigError(PetformersError):
    """A config key or value is wrong: the message names the key path."""


class CheckpointError(PetformersError):
    """A weights file is missing, truncated, of the wrong shape or of another model."""


class TokenizerError(PetformersError):
    """A tokenizer file is missing or cannot be read."""


class DataError(PetformersError):
    """A dataset file or record is malformed: the message names the file, line and key."""


class AdapterError(PetformersError):
    """A LoRA target pattern or adapter file does not fit the model."""


class TrainingError(PetformersError):
    """Training cannot continue (NaN loss, no data): the last good checkpoint is kept."""
