"""Typed exceptions. Binaries turn any FinextractError into one line on stderr and exit 2."""


class FinextractError(Exception):
    """Base class: bad input that the user can fix (the message says how)."""


class CheckpointError(FinextractError):
    """A checkpoint path, file or format that cannot be loaded."""


class ConfigMismatchError(CheckpointError):
    """Pretrained and fine-tuned checkpoints are not the same architecture."""


class LoraError(CheckpointError):
    """A LoRA file whose keys or shapes do not fit the base model."""


class InputError(FinextractError):
    """Bad arguments or data (images, matrices, settings)."""


class NonFiniteError(FinextractError):
    """Sampling produced NaN/Inf latents (e.g. a too-large guidance scale)."""
