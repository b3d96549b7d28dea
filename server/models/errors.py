"""The one error of this package: a model that cannot be served, said in one line."""
from __future__ import annotations


class ModelSourceError(ValueError):
    """``--model`` names nothing servable (no such path, a corrupt or unsupported GGUF, a missing
    wheel). A ValueError, so the CLI prints it as one line and exits 1, like a bad config value."""
