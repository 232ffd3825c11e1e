"""The shared typer option set for every CLI verb that calls an LLM.

The verbs: instruction generation, GPT judge, preference judge.

Usage::

    @app.command()
    @llm_options(model="gpt-4o", concurrency=8)     # per-command defaults (optional)
    def generate(captions: Path, llm: LLMConfig) -> None: ...

The decorated command gets the ``--llm-model/--base-url/--api-key-env/--azure-*/--temperature/...``
options (shown in their own help panel) and receives them as one :class:`LLMConfig` named ``llm``.
``--model`` is never the LLM: across the CLI it is a medvlm / Hugging Face checkpoint, so the LLM's
name is ``--llm-model`` (a judge: ``llm_options(model_flag="--judge-model")``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from medvlm.llm.config import LLMConfig

F = TypeVar("F", bound=Callable[..., Any])

# LLMConfig field -> (option flag, type, help)
_SPECS: dict[str, tuple[str, Any, str]] = {
    "model": ("--llm-model", str, "LLM name (Azure: deployment unless --azure-deployment is given)."),
    "base_url": (
        "--base-url",
        Optional[str],
        "OpenAI-compatible endpoint (vLLM, Ollama, a proxy ...); default: OpenAI.",
    ),
    "api_key_env": (
        "--api-key-env",
        Optional[str],
        "Environment variable holding the API key (default OPENAI_API_KEY / AZURE_OPENAI_API_KEY; '' = none).",
    ),
    "azure_endpoint": ("--azure-endpoint", Optional[str], "Azure OpenAI endpoint; selects the Azure client."),
    "azure_api_version": ("--azure-api-version", str, "Azure OpenAI API version."),
    "azure_deployment": ("--azure-deployment", Optional[str], "Azure deployment name (default: --model)."),
    "temperature": ("--temperature", float, "Sampling temperature."),
    "max_tokens": ("--max-tokens", int, "Maximum completion tokens per request."),
    "max_tokens_field": ("--max-tokens-field", str, "Token-limit request field: max_tokens or max_completion_tokens."),
    "seed": ("--llm-seed", Optional[int], "Sampling seed sent to the endpoint."),
    "concurrency": ("--concurrency", int, "Requests in flight at once."),
    "retries": ("--retries", int, "Retries per request (429/5xx/timeouts/connection errors/bad replies)."),
    "timeout": ("--timeout", float, "Seconds per HTTP request."),
    "backoff_base": ("--backoff-base", float, "First retry delay in seconds (doubles per retry, with jitter)."),
    "cache_path": (
        "--cache",
        Optional[Path],
        "SQLite response cache, so a rerun never pays twice (default: the command's own, e.g. "
        "instruct generate keeps one beside --out; none for commands without one).",
    ),
    "price_input": ("--price-input", Optional[float], "USD per 1M prompt tokens (default: built-in table)."),
    "price_output": ("--price-output", Optional[float], "USD per 1M completion tokens (default: built-in table)."),
    "progress": ("--progress/--no-progress", bool, "Show a progress bar."),
}


def llm_options(model_flag: str = "--llm-model", **defaults: Any) -> Callable[[F], F]:
    """Add the shared LLM options to a typer command whose ``llm: LLMConfig`` parameter receives them.

    ``model_flag`` names the LLM-name option (``--judge-model`` where the LLM judges); ``defaults`` are
    per-command defaults by :class:`LLMConfig` field name.
    """
    unknown = set(defaults) - set(_SPECS)
    if unknown:
        raise ValueError(f"llm_options: unknown defaults {sorted(unknown)}")

    def decorate(func: F) -> F:
        sig = inspect.signature(func, eval_str=True)
        if "llm" not in sig.parameters:
            raise TypeError(f"{func.__name__}: a command decorated with llm_options needs an `llm` parameter")
        own = [p for p in sig.parameters.values() if p.name != "llm"]
        base = LLMConfig()
        specs = dict(_SPECS, model=(model_flag, *_SPECS["model"][1:]))
        added = [
            inspect.Parameter(
                f"llm_{name}",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[typ, typer.Option(flag, help=help_, rich_help_panel="LLM endpoint")],
                default=defaults.get(name, getattr(base, name)),
            )
            for name, (flag, typ, help_) in specs.items()
        ]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fields = {name: kwargs.pop(f"llm_{name}") for name in _SPECS}
            return func(*args, llm=LLMConfig(**fields), **kwargs)

        params = own + added
        del wrapper.__wrapped__  # typer must see the new signature, not the wrapped one
        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper  # type: ignore[return-value]

    return decorate
