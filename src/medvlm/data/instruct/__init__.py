"""LLaVA-Med-style instruction data: an LLM writes conversations from figure captions (``generate``),
then they are cleaned into the LLaVA-Med instruct format (``postprocess``)."""

from medvlm.data.instruct.generate import GenerateConfig, GenerateReport, generate_instructions, select_records
from medvlm.data.instruct.postprocess import (
    ConversationParseError,
    PostprocessConfig,
    PostprocessReport,
    clean_text,
    filter_pairs,
    parse_turns,
    postprocess_file,
)
from medvlm.data.instruct.prompts import SYSTEM_PROMPT, PromptSet, build_messages, load_prompts, render_context

__all__ = [
    "SYSTEM_PROMPT",
    "ConversationParseError",
    "GenerateConfig",
    "GenerateReport",
    "PostprocessConfig",
    "PostprocessReport",
    "PromptSet",
    "build_messages",
    "clean_text",
    "filter_pairs",
    "generate_instructions",
    "load_prompts",
    "parse_turns",
    "postprocess_file",
    "render_context",
    "select_records",
]
