"""One clear error for folders that ask transformers to run their own code.

Every transformers load in medvlm passes ``trust_remote_code=False`` (never the default ``None``, which
makes transformers ask on stdin). A folder whose ``config.json`` / ``tokenizer_config.json`` names a
model type that exists only as Python files inside it (``auto_map``) then raises transformers'
ValueError; :func:`refusing_remote_code` turns it into a :class:`MedvlmError` naming the folder and the fix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from medvlm.errors import MedvlmError


@contextlib.contextmanager
def refusing_remote_code(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Around ``from_pretrained(..., trust_remote_code=False)``: remote-code refusals become a MedvlmError."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise MedvlmError(
            f"{folder}: this {what} needs its own Python code to load (an 'auto_map' entry, which transformers "
            "runs only when trust_remote_code is set). medvlm never runs code from a model folder: use a model type "
            "built into transformers, or convert the weights to one"
        ) from None
