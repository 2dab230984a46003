"""The bundled model's chat template, written in the Qwen3-Coder format.

ChatML turns (`<|im_start|>{role}\\n{content}<|im_end|>\\n`); tools listed in the system turn as the
`<tools><function><name>…` XML block with the usage instructions; assistant tool calls as
`<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`
(what `qwen3coder.chat.tool_parser` reads back); consecutive tool results grouped in one user turn as
`<tool_response>\\n…\\n</tool_response>`. It differs from the official template in its own default
system prompt and in naming the model; the token-level format is the same, so prompts rendered for
the real Qwen3-Coder models and for this one are built alike.

`render_chat(TEMPLATE, messages[:i], add_generation_prompt=True)` is a prefix of the rendering of
`messages[:i+1]` when message i is an assistant turn — SFT relies on it to find the assistant spans.
"""

from __future__ import annotations

from typing import Any, Sequence

from qwen3coder.chat.template import render_chat

IM_END = "<|im_end|>"

DEFAULT_SYSTEM_PROMPT = "You are qwen3coder-tiny, a small coding assistant. You can call tools to work with files and programs."

TEMPLATE = r"""{#- qwen3coder-tiny chat template (Qwen3-Coder format) -#}
{%- macro render_extra_keys(json_dict, handled_keys) -%}
    {%- if json_dict is mapping -%}
        {%- for json_key in json_dict if json_key not in handled_keys -%}
            {%- if json_dict[json_key] is mapping or (json_dict[json_key] is sequence and json_dict[json_key] is not string) -%}
                {{- '\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | tojson | safe) ~ '</' ~ json_key ~ '>' -}}
            {%- else -%}
                {{- '\n<' ~ json_key ~ '>' ~ (json_dict[json_key] | string) ~ '</' ~ json_key ~ '>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]["role"] == "system" -%}
    {%- set system_message = messages[0]["content"] -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools is not defined or tools is none -%}
    {%- set tools = [] -%}
{%- endif -%}
{%- set has_tools = tools is iterable and tools | length > 0 -%}
{%- if system_message is defined -%}
    {{- '<|im_start|>system\n' + system_message -}}
{%- elif has_tools -%}
    {{- '<|im_start|>system\n""" + DEFAULT_SYSTEM_PROMPT + r"""' -}}
{%- endif -%}
{%- if has_tools -%}
    {{- '\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>' -}}
    {%- for tool in tools -%}
        {%- if tool.function is defined -%}
            {%- set tool = tool.function -%}
        {%- endif -%}
        {{- '\n<function>\n<name>' ~ tool.name ~ '</name>' -}}
        {%- if tool.description is defined -%}
            {{- '\n<description>' ~ (tool.description | trim) ~ '</description>' -}}
        {%- endif -%}
        {{- '\n<parameters>' -}}
        {%- if tool.parameters is defined and tool.parameters is mapping and tool.parameters.properties is defined and tool.parameters.properties is mapping -%}
            {%- for param_name, param_fields in tool.parameters.properties | items -%}
                {{- '\n<parameter>\n<name>' ~ param_name ~ '</name>' -}}
                {%- if param_fields.type is defined -%}
                    {{- '\n<type>' ~ (param_fields.type | string) ~ '</type>' -}}
                {%- endif -%}
                {%- if param_fields.description is defined -%}
                    {{- '\n<description>' ~ (param_fields.description | trim) ~ '</description>' -}}
                {%- endif -%}
                {{- render_extra_keys(param_fields, ['name', 'type', 'description']) -}}
                {{- '\n</parameter>' -}}
            {%- endfor -%}
        {%- endif -%}
        {{- render_extra_keys(tool.parameters, ['type', 'properties']) -}}
        {{- '\n</parameters>' -}}
        {{- render_extra_keys(tool, ['type', 'name', 'description', 'parameters']) -}}
        {{- '\n</function>' -}}
    {%- endfor -%}
    {{- '\n</tools>' -}}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' -}}
{%- endif -%}
{%- if system_message is defined or has_tools -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set content = message.content if message.content is string else '' -%}
    {%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls is iterable and message.tool_calls | length > 0 -%}
        {{- '<|im_start|>assistant' -}}
        {%- if content | trim | length > 0 -%}
            {{- '\n' + content | trim + '\n' -}}
        {%- endif -%}
        {%- for tool_call in message.tool_calls -%}
            {%- if tool_call.function is defined -%}
                {%- set tool_call = tool_call.function -%}
            {%- endif -%}
            {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' -}}
            {%- if tool_call.arguments is defined and tool_call.arguments is mapping -%}
                {%- for args_name, args_value in tool_call.arguments | items -%}
                    {{- '<parameter=' + args_name + '>\n' -}}
                    {%- if args_value is mapping or (args_value is sequence and args_value is not string) -%}
                        {{- args_value | tojson | safe -}}
                    {%- else -%}
                        {{- args_value | string -}}
                    {%- endif -%}
                    {{- '\n</parameter>\n' -}}
                {%- endfor -%}
            {%- endif -%}
            {{- '</function>\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}
            {{- '<|im_start|>user\n' -}}
        {%- endif -%}
        {{- '<tool_response>\n' + content + '\n</tool_response>\n' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""


def assistant_spans(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None,
                    template: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    template = TEMPLATE if template is None else template
    full = render_chat(template, messages, tools=tools, add_generation_prompt=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = render_chat(template, messages[:i], tools=tools, add_generation_prompt=True)
        upto = render_chat(template, messages[:i + 1], tools=tools, add_generation_prompt=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError(f"chat template is not prefix-stable at assistant message {i}")
        end = upto.rfind(IM_END)
        if end < len(before):
            raise ValueError(f"assistant message {i} does not end with {IM_END}")
        spans.append((len(before), end + len(IM_END)))
    return full, spans
