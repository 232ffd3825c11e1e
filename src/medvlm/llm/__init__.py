"""OpenAI-compatible LLM client layer (layer 0), shared by instruction generation, the GPT judge and
the STLLaVA-Med preference judge: bounded concurrency, retries honouring Retry-After, a persistent
SQLite request cache, token/cost accounting and a shared typer option set."""

from medvlm.llm.cache import ResponseCache, request_key
from medvlm.llm.client import (
    LLMClient,
    LLMFatalError,
    LLMRequest,
    LLMResult,
    UsageTracker,
    parse_reply,
    retry_after_seconds,
)
from medvlm.llm.config import DEFAULT_PRICES, LLMConfig, lookup_price
from medvlm.llm.options import llm_options

__all__ = [
    "DEFAULT_PRICES",
    "LLMClient",
    "LLMConfig",
    "LLMFatalError",
    "LLMRequest",
    "LLMResult",
    "ResponseCache",
    "UsageTracker",
    "llm_options",
    "lookup_price",
    "parse_reply",
    "request_key",
    "retry_after_seconds",
]
