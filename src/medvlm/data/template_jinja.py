"""HF ``chat_template`` (Jinja) export of a :class:`medvlm.data.templates.ChatTemplate`.

The generated template renders exactly the text of :func:`medvlm.data.templates.render_text` with
one ``<image>`` per image part (a llava-hf processor expands it to the image's tokens), for messages
whose content is a string (rendered verbatim) or a list of ``{"type": "image"}`` /
``{"type": "text", "text": ...}`` parts. Learned text is wrapped in ``{% generation %}`` blocks, so
``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks the same spans medvlm learns.
Validation (role order, images in answers) is medvlm's job; the template only rejects unknown roles.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medvlm.data.templates import ChatTemplate, RoleFormat


def _quote(s: str) -> str:
    """A Jinja string literal for ``s`` (Jinja decodes backslash escapes like Python)."""
    return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _expr(s: str) -> str:
    """A Jinja expression for template text ``s``, ``{bos}``/``{eos}`` becoming the tokenizer's tokens."""
    out = []
    for piece in re.split(r"(\{bos\}|\{eos\})", s):
        if piece == "{bos}":
            out.append("(bos_token or '')")
        elif piece == "{eos}":
            out.append("(eos_token or '')")
        elif piece:
            out.append(_quote(piece))
    return " ~ ".join(out) if out else "''"


def _out(s: str) -> str:
    """Jinja that outputs template text ``s`` (nothing when empty)."""
    return "{{ " + _expr(s) + " }}" if s else ""


_CONTENT_MACRO = (
    "{%- macro render_content(c, keep_text) -%}"
    "{%- if c is string -%}"
    "{%- if keep_text -%}{{ c }}{%- else -%}{{ (['<image>'] * c.count('<image>')) | join('\\n') }}{%- endif -%}"
    "{%- else -%}"
    "{%- set cs = namespace(prev=false, first=true) -%}"
    "{%- for p in c -%}"
    "{%- if p['type'] == 'image' or keep_text -%}"
    "{%- if not cs.first and (p['type'] == 'image' or cs.prev) -%}{{ '\\n' }}{%- endif -%}"
    "{%- if p['type'] == 'image' -%}{{ '<image>' }}{%- else -%}{{ p['text'] }}{%- endif -%}"
    "{%- set cs.prev = p['type'] == 'image' -%}{%- set cs.first = false -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)


def _learned_turn(fmt: RoleFormat) -> str:
    return (
        _out(fmt.prefix)
        + "{%- generation -%}{{ "
        + _expr(fmt.lead)
        + " ~ render_content(m['content'], true).lstrip() ~ "
        + _expr(fmt.end)
        + " }}{%- endgeneration -%}"
        + _out(fmt.after)
    )


def template_to_jinja(tpl: ChatTemplate) -> str:
    """The Jinja chat template of ``tpl`` (see the module docstring)."""
    keep = "true" if tpl.prompt_text else "false"
    before, _, after = tpl.system_format.partition("{system}")
    j = [_CONTENT_MACRO]
    j.append("{%- set ns = namespace(system=" + _quote(tpl.system) + ", start=0, fold='') -%}")
    j.append(
        "{%- if messages and messages[0]['role'] == 'system' -%}{%- set ns.start = 1 -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
        " | map(attribute='text') | join('') -%}{%- endif -%}{%- endif -%}"
    )
    if tpl.bos:
        j.append("{%- if bos_token -%}{{ bos_token }}{%- endif -%}")
    if tpl.fold_system:
        j.append("{%- set ns.fold = ns.system -%}")
    elif tpl.prompt_text:
        j.append("{%- if ns.system -%}{{ " + _expr(before) + " ~ ns.system ~ " + _expr(after) + " }}{%- endif -%}")
    j.append("{%- for m in messages[ns.start:] -%}")
    j.append("{%- if m['role'] == 'assistant' -%}" + _learned_turn(tpl.assistant))
    if tpl.vuser is not None:
        j.append("{%- elif m['role'] == 'vuser' -%}" + _learned_turn(tpl.vuser))
    j.append(
        "{%- elif m['role'] == 'user' -%}"
        + _out(tpl.user.prefix)
        + _out(tpl.user.lead)
        + "{%- if ns.fold -%}{{ ns.fold ~ '\\n\\n' }}{%- set ns.fold = '' -%}{%- endif -%}"
        + "{{ render_content(m['content'], "
        + keep
        + ") }}"
        + _out(tpl.user.end)
        + _out(tpl.user.after)
    )
    j.append(
        "{%- else -%}{{ raise_exception('role ' ~ m['role'] ~ ' is not supported by the "
        + tpl.name
        + " template') }}{%- endif -%}{%- endfor -%}"
    )
    gen = "{%- if add_generation_prompt -%}"
    if tpl.vuser is not None:
        gen += (
            "{%- if messages[-1]['role'] == 'assistant' -%}"
            + _out(tpl.vuser.prefix)
            + "{%- else -%}"
            + _out(tpl.assistant.prefix)
            + "{%- endif -%}"
        )
    else:
        gen += _out(tpl.assistant.prefix)
    j.append(gen + "{%- endif -%}")
    return "".join(j)
