"""SFT conversations generated from the corpus with `ast` — no external data.

Kinds (each a list of OpenAI-style messages, optionally with tools):

* `write_function` — a docstring (and signature) → the function's source;
* `explain` — a function without its docstring → an explanation built from the docstring;
* `write_test` — a function whose docstring has doctest examples → a pytest test asserting them;
* `tool_*` — tool-use dialogues in the qwen3_coder XML format: read a file and say what it defines,
  find where a function is defined, list a directory, compute with a Python tool; each has the
  assistant's tool call, the tool's response and the final answer;
* `fim` — the instruct FIM form (`qwen3coder.chat.fim.build_chat_fim_messages`): 1–3 lines of a
  function as the middle;
* `chat` — short greetings and identity answers.

`generate_conversations` runs per file in worker processes, which also render each conversation
with the chat template and find its assistant spans (`chat_template.assistant_spans`); the result is
shuffled with the seed and capped.
"""

from __future__ import annotations

import ast
import doctest
import os
import random
import re
import zlib
from multiprocessing import get_context
from typing import Any, Sequence

from qwen3coder.chat.fim import FIM_SYSTEM_PROMPT, build_fim_prompt
from qwen3coder.train.chat_template import assistant_spans
from qwen3coder.train.data import CONTROL_STRINGS, Document

Conversation = dict[str, Any]  # {"kind": str, "messages": [...], "tools": [...] | None}

TOOLS: dict[str, dict[str, Any]] = {
    "read_file": {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file and return its contents.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Path of the file to read."}}, "required": ["path"]}}},
    "list_directory": {"type": "function", "function": {
        "name": "list_directory", "description": "List the files in a directory.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string", "description": "Directory to list."}}, "required": ["path"]}}},
    "search_code": {"type": "function", "function": {
        "name": "search_code", "description": "Search the code base for a regular expression.",
        "parameters": {"type": "object", "properties": {
            "pattern": {"type": "string", "description": "Regular expression to search for."},
            "path": {"type": "string", "description": "Directory to search in."}},
            "required": ["pattern", "path"]}}},
    "run_python": {"type": "function", "function": {
        "name": "run_python", "description": "Run a Python snippet and return what it prints.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string", "description": "The Python code to run."}}, "required": ["code"]}}},
}
GREETINGS = [
    ("Hi!", "Hello! I am qwen3coder-tiny, a small coding assistant. What would you like to work on?"),
    ("Who are you?", "I am qwen3coder-tiny, a small model with the Qwen3-Coder architecture, trained to help "
                     "with code and to call tools."),
    ("What can you do?", "I can write and explain small Python functions, write tests, fill in missing code, "
                         "and call tools such as reading files or running Python."),
    ("Thanks!", "You're welcome! Let me know if you need anything else."),
]


def _module_name(path: str) -> str:
    rel = path.split("/", 1)[1] if "/" in path else path
    mod = rel[:-3] if rel.endswith(".py") else rel
    mod = mod.replace("/", ".")
    return mod[:-9] if mod.endswith(".__init__") else mod


def _strip_docstring(src: str, doc_node: ast.AST | None, func_lineno: int) -> str:
    if doc_node is None:
        return src
    lines = src.splitlines()
    start, end = doc_node.lineno - func_lineno, doc_node.end_lineno - func_lineno  # type: ignore[attr-defined]
    kept = lines[:start] + lines[end + 1:]
    return "\n".join(kept)


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n")[0]
    return " ".join(ln.strip() for ln in para.splitlines()).strip()


def _doctest_test(module: str, name: str, doc: str) -> str | None:
    try:
        examples = doctest.DocTestParser().get_examples(doc)
    except ValueError:
        return None
    body, asserts = [], 0
    for ex in examples:
        src, want = ex.source.strip(), ex.want.strip()
        if ex.options or "#" in src or "\n" in src or "\n" in want or "..." in want or "Traceback" in want or "<" in want:
            return None
        if want:
            body.append(f"    assert {src} == {want}")
            asserts += 1
        else:
            body.append(f"    {src}")
    if asserts == 0 or len(body) > 12:
        return None
    return f"from {module} import {name}\n\n\ndef test_{name}():\n" + "\n".join(body) + "\n"


def _function_examples(doc: Document, tree: ast.Module, rng: random.Random) -> list[Conversation]:
    out: list[Conversation] = []
    module = _module_name(doc.path)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]
    rng.shuffle(funcs)
    for fn in funcs[:4]:
        src = ast.get_source_segment(doc.text, fn)
        docstring = ast.get_docstring(fn)
        if not src or not docstring or not 3 <= src.count("\n") <= 40:
            continue
        sig = src.split("\n", 1)[0].strip().removeprefix("def ").rstrip(":")
        summary = _first_paragraph(docstring)
        if not 10 <= len(summary) <= 400:
            continue
        ask = rng.choice([f"Write a Python function `{sig}`: {summary}",
                          f"Implement `{fn.name}` in Python.\n\n{docstring.strip()}",
                          f"Please write `def {sig}` — {summary}"])
        out.append({"kind": "write_function", "tools": None, "messages": [
            {"role": "user", "content": ask}, {"role": "assistant", "content": f"```python\n{src}\n```"}]})
        doc_node = fn.body[0] if fn.body and isinstance(fn.body[0], ast.Expr) else None
        bare = _strip_docstring(src, doc_node, fn.lineno)
        if bare.count("\n") >= 2:
            ask = rng.choice(["Explain what this code does:", "What does this function do?",
                              "Can you explain this Python function?"])
            out.append({"kind": "explain", "tools": None, "messages": [
                {"role": "user", "content": f"{ask}\n\n```python\n{bare}\n```"},
                {"role": "assistant", "content": f"`{fn.name}` is a function from `{module}`. {summary}"}]})
        test = _doctest_test(module, fn.name, docstring)
        if test is not None:
            out.append({"kind": "write_test", "tools": None, "messages": [
                {"role": "user", "content": f"Write a pytest test for this function:\n\n```python\n{src}\n```"},
                {"role": "assistant", "content": f"```python\n{test}```"}]})
        lines = src.splitlines()
        if len(lines) >= 5:
            a = rng.randint(1, len(lines) - 2)
            b = min(len(lines) - 1, a + rng.randint(1, 3))
            prefix = "\n".join(lines[:a]) + "\n"
            middle = "\n".join(lines[a:b]) + "\n"
            suffix = "\n".join(lines[b:])
            out.append({"kind": "fim", "tools": None, "messages": [
                {"role": "system", "content": FIM_SYSTEM_PROMPT},
                {"role": "user", "content": build_fim_prompt(prefix, suffix)},
                {"role": "assistant", "content": middle}]})
    return out


def _tools_for(needed: str, rng: random.Random) -> list[dict[str, Any]]:
    names = [n for n in TOOLS if n != needed]
    rng.shuffle(names)
    chosen = names[:rng.randint(0, len(names))] + [needed]
    rng.shuffle(chosen)
    return [TOOLS[n] for n in chosen]


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_dialogue(kind: str, tool: str, user: str, args: dict[str, Any], response: str, answer: str,
                   rng: random.Random) -> Conversation:
    lead = rng.choice(["", "", f"I'll use `{tool}` for that."])
    return {"kind": kind, "tools": _tools_for(tool, rng), "messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": lead, "tool_calls": [_call(tool, **args)]},
        {"role": "tool", "content": response},
        {"role": "assistant", "content": answer}]}


def _tool_examples(doc: Document, tree: ast.Module, rng: random.Random) -> list[Conversation]:
    out: list[Conversation] = []
    path = doc.path.split("/", 1)[1] if "/" in doc.path else doc.path
    shown = "\n".join(doc.text.splitlines()[:30])
    names = re.findall(r"^(?:def|class) ([A-Za-z_]\w*)", shown, flags=re.M)
    if names and rng.random() < 0.35:
        listed = ", ".join(f"`{n}`" for n in names[:8])
        out.append(_tool_dialogue(
            "tool_read_file", "read_file",
            rng.choice([f"What does `{path}` define?", f"Open {path} and tell me what is in it."]),
            {"path": path}, shown, f"The start of `{path}` defines {listed}.", rng))
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    if defs and rng.random() < 0.3:
        node = rng.choice(defs)
        line = doc.text.splitlines()[node.lineno - 1].strip()
        directory = os.path.dirname(path) or "."
        kw = "def" if isinstance(node, ast.FunctionDef) else "class"
        out.append(_tool_dialogue(
            "tool_search", "search_code", f"Where is `{node.name}` defined in `{directory}`?",
            {"pattern": f"{kw} {node.name}\\b", "path": directory}, f"{path}:{node.lineno}: {line}",
            f"`{node.name}` is defined in `{path}` at line {node.lineno}.", rng))
    return out


def _arith_example(rng: random.Random) -> Conversation:
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*", "//", "%", "**"])
    if op == "**":
        b = rng.randint(2, 5)
    expr = f"{a} {op} {b}"
    value = eval(expr, {"__builtins__": {}})  # generated integers and one operator only
    user = rng.choice([f"What is {expr}? Use Python.", f"Compute {expr} with the Python tool.",
                       f"Run some Python to get {expr}."])
    return _tool_dialogue("tool_python", "run_python", user, {"code": f"print({expr})"}, str(value),
                          f"{expr} = {value}.", rng)


def _listing_example(paths: Sequence[str], rng: random.Random) -> Conversation | None:
    dirs: dict[str, list[str]] = {}
    for p in paths:
        rel = p.split("/", 1)[1] if "/" in p else p
        dirs.setdefault(os.path.dirname(rel) or ".", []).append(os.path.basename(rel))
    candidates = [(d, sorted(f)) for d, f in dirs.items() if 2 <= len(f) <= 12]
    if not candidates:
        return None
    d, files = rng.choice(candidates)
    answer = f"`{d}` contains {len(files)} files: " + ", ".join(f"`{f}`" for f in files) + "."
    return _tool_dialogue("tool_list", "list_directory", f"List the files in `{d}`.", {"path": d},
                          "\n".join(files), answer, rng)


_WORK: dict[str, Any] = {}


def _per_file(index: int) -> list[Conversation]:
    doc: Document = _WORK["docs"][index]
    rng = random.Random(_WORK["seed"] * 7919 + zlib.crc32(doc.path.encode("utf-8")))
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError, RecursionError):
        return []
    convs = _function_examples(doc, tree, rng) + _tool_examples(doc, tree, rng)
    return [_render(c) for c in convs if not any(s in str(c["messages"]) for s in CONTROL_STRINGS[:3])]


def _render(conv: Conversation) -> Conversation:
    """Add the rendered `text` and the assistant `spans` (the costly part of SFT encoding)."""
    conv["text"], conv["spans"] = assistant_spans(conv["messages"], conv.get("tools"))
    return conv


def generate_conversations(docs: Sequence[Document], max_files: int, max_examples: int, seed: int,
                           workers: int = 1) -> list[Conversation]:
    """Conversations from up to `max_files` Python documents (see the module docstring)."""
    rng = random.Random(seed)
    python = [d for d in docs if d.lang == "Python"]
    rng.shuffle(python)
    python = python[:max_files]
    _WORK.update(docs=python, seed=seed)
    try:
        if workers > 1 and len(python) > 64:
            with get_context("fork").Pool(workers) as pool:
                per_file = pool.map(_per_file, range(len(python)), chunksize=16)
        else:
            per_file = [_per_file(i) for i in range(len(python))]
    finally:
        _WORK.clear()
    convs = [c for group in per_file for c in group]
    n_arith = max(8, len(convs) // 8)
    convs += [_render(_arith_example(rng)) for _ in range(n_arith)]
    for _ in range(max(4, len(convs) // 40)):
        ex = _listing_example([d.path for d in python], rng)
        if ex is not None:
            convs.append(_render(ex))
    for _ in range(max(4, len(convs) // 100)):
        user, answer = rng.choice(GREETINGS)
        convs.append(_render({"kind": "chat", "tools": None, "messages": [
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}))
    rng.shuffle(convs)
    return convs[:max_examples]
