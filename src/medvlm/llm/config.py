"""Configuration of the LLM client layer and the default price table."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from medvlm.errors import MedvlmError

# USD per 1M tokens (input, output) as published by OpenAI for these model names; override per run
# with LLMConfig.price_input / price_output. Dated snapshots (gpt-4o-2024-08-06) use their base name.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4": (30.0, 60.0),
    "gpt-4-32k": (60.0, 120.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4o": (2.50, 10.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-3.5-turbo": (0.50, 1.50),
}

_SNAPSHOT = r"(-\d{4}-\d{2}-\d{2}|-\d{4}|-preview)?"


def lookup_price(model: str, prices: dict[str, tuple[float, float]] | None = None) -> tuple[float, float] | None:
    """``(input, output)`` USD per 1M tokens for ``model`` (exact name or a dated snapshot of it), or None."""
    table = prices if prices is not None else DEFAULT_PRICES
    if model in table:
        return table[model]
    for name, price in table.items():
        if re.fullmatch(re.escape(name) + _SNAPSHOT, model):
            return price
    return None


@dataclass
class LLMConfig:
    """How to reach an OpenAI-compatible chat endpoint and how hard to try."""

    model: str = "gpt-4o"
    """Model name sent with each request (for Azure without ``azure_deployment``: the deployment name)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1`` (vLLM) or ``http://localhost:11434/v1``
    (Ollama). None = the official OpenAI API. Ignored when ``azure_endpoint`` is set."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key. None = ``OPENAI_API_KEY``
    (``AZURE_OPENAI_API_KEY`` with Azure). An empty string = no key (local servers)."""
    azure_endpoint: str | None = None
    """Azure OpenAI resource endpoint (``https://NAME.openai.azure.com``); selects ``openai.AzureOpenAI``."""
    azure_api_version: str = "2024-06-01"
    """Azure OpenAI REST API version."""
    azure_deployment: str | None = None
    """Azure deployment name; None = use ``model`` as the deployment."""
    temperature: float = 0.0
    """Sampling temperature."""
    max_tokens: int = 1024
    """Maximum completion tokens per request."""
    max_tokens_field: str = "max_tokens"
    """Request field carrying ``max_tokens``: ``max_tokens`` (most servers) or ``max_completion_tokens``
    (OpenAI's reasoning models, which reject ``max_tokens``)."""
    seed: int | None = None
    """Sampling seed sent to the endpoint (when it supports one)."""
    concurrency: int = 4
    """Requests in flight at once."""
    retries: int = 5
    """Retries per request after the first attempt (429, 5xx, timeouts, connection errors, malformed or
    empty replies)."""
    timeout: float = 120.0
    """Seconds before one HTTP request is abandoned (and retried)."""
    backoff_base: float = 1.0
    """First backoff delay in seconds; doubles per retry, with jitter."""
    backoff_max: float = 60.0
    """Upper bound of one backoff delay in seconds."""
    retry_after_max: float = 300.0
    """Upper bound in seconds for a server's ``Retry-After`` wait."""
    cache_path: Path | None = None
    """SQLite file of cached responses keyed by (model, full request); None = no cache."""
    price_input: float | None = None
    """USD per 1M prompt tokens for ``model``; None = the default table (unknown model: tokens only)."""
    price_output: float | None = None
    """USD per 1M completion tokens for ``model``; None = the default table."""
    progress: bool = True
    """Show a progress bar for batches."""
    extra_params: dict = field(default_factory=dict)
    """Further request parameters sent with every request (e.g. ``{"top_p": 0.9}``); part of the cache key."""

    def validate(self) -> None:
        """Raise a :class:`MedvlmError` naming the first invalid field."""
        checks = [
            ("model", bool(self.model)),
            ("concurrency", self.concurrency >= 1),
            ("retries", self.retries >= 0),
            ("timeout", self.timeout > 0),
            ("max_tokens", self.max_tokens >= 1),
            ("max_tokens_field", self.max_tokens_field in ("max_tokens", "max_completion_tokens")),
            ("backoff_base", self.backoff_base >= 0),
            ("backoff_max", self.backoff_max >= 0),
            ("retry_after_max", self.retry_after_max >= 0),
            ("temperature", self.temperature >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise MedvlmError(f"LLM config: invalid {name}={getattr(self, name)!r}")

    def resolved_api_key_env(self) -> str:
        """The environment variable the key is read from ('' = none)."""
        if self.api_key_env is not None:
            return self.api_key_env
        return "AZURE_OPENAI_API_KEY" if self.azure_endpoint else "OPENAI_API_KEY"

    def price(self) -> tuple[float, float] | None:
        """``(input, output)`` USD per 1M tokens for this model, or None when unknown."""
        table = lookup_price(self.model)
        if self.price_input is None and self.price_output is None:
            return table
        base = table or (0.0, 0.0)
        return (
            self.price_input if self.price_input is not None else base[0],
            self.price_output if self.price_output is not None else base[1],
        )
