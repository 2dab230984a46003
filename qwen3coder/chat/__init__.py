"""Prompt formats of Qwen3-Coder: tokenizer, streaming detokenizer, chat template, tool calls, FIM.

See docs/PROMPT_FORMATS.md for the rules each module implements.
"""

from .detokenizer import IncrementalDetokenizer
from .fim import (
    FIM_STOP_TOKENS,
    FIM_SYSTEM_PROMPT,
    build_chat_fim_messages,
    build_fim_prompt,
    build_repo_fim_prompt,
    fim_stop_token_ids,
    truncate_fim_output,
)
from .template import (
    ChatTemplateError,
    compile_chat_template,
    load_chat_template,
    normalize_messages,
    render_chat,
    resolve_chat_template,
)
from .tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from .tool_parser import ToolCallStreamParser, parse_tool_calls
from .tool_schema import convert_param_value

__all__ = [
    "Tokenizer",
    "TokenizerLoadError",
    "load_tokenizer",
    "IncrementalDetokenizer",
    "ChatTemplateError",
    "render_chat",
    "normalize_messages",
    "compile_chat_template",
    "load_chat_template",
    "resolve_chat_template",
    "parse_tool_calls",
    "ToolCallStreamParser",
    "convert_param_value",
    "FIM_STOP_TOKENS",
    "FIM_SYSTEM_PROMPT",
    "build_fim_prompt",
    "build_repo_fim_prompt",
    "build_chat_fim_messages",
    "fim_stop_token_ids",
    "truncate_fim_output",
]
