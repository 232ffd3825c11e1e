"""Read a rendered generation prompt back into its conversation (the inverse of ``templates.render_text``).

LLaVA's controller/worker protocol sends the conversation already rendered in a named chat template, with one
``<image>`` placeholder per image. A model that renders conversations with its own chat template (a model
family, :mod:`medvlm.model.families`) needs the turns back: :func:`parse_generation_prompt` splits the text at
the template's role tags, and accepts the result only if rendering it again writes the exact same text, so a
prompt in another template (or one whose text cannot be split unambiguously) is refused, never guessed.
"""

from __future__ import annotations

import re

from medvlm.data.schema import Message, text_part
from medvlm.data.templates import ChatTemplate, get_template, render_text
from medvlm.errors import MedvlmError


def _sub(s: str, bos: str, eos: str) -> str:
    return s.replace("{bos}", bos).replace("{eos}", eos)


def parse_generation_prompt(
    text: str, template: ChatTemplate | str, *, bos_token: str = "<s>", eos_token: str = "</s>"
) -> list[Message]:
    """The messages ``text`` (a generation prompt: it ends with the assistant tag) was rendered from.

    ``bos_token`` / ``eos_token`` are the strings the client rendered with (``render_text``'s defaults; LLaVA's
    own clients omit the leading BOS, which is accepted). A system prompt equal to the template's default comes
    back as no system message; an absent one (where the template has a default) as an empty system message;
    a system prompt a template folds into the first question (``mistral_instruct``) stays part of that question.
    ``<image>`` placeholders become image parts. Raises :class:`MedvlmError` saying where the text stops
    matching the template.
    """
    tpl = get_template(template)
    if not tpl.prompt_text:
        raise MedvlmError(f"template {tpl.name} drops the user's text, so a prompt rendered in it cannot be read back")
    bos = bos_token if tpl.bos else ""
    u, a, v = tpl.user, tpl.assistant, tpl.vuser
    u_pre, a_pre = _sub(u.prefix, bos_token, eos_token), _sub(a.prefix, bos_token, eos_token)
    v_pre = _sub(v.prefix, bos_token, eos_token) if v is not None else None

    def fail(why: str) -> MedvlmError:
        return MedvlmError(f"the prompt is not a {tpl.name} generation prompt: {why}")

    answer_close = _sub(a.end + a.after, bos_token, eos_token)
    answer_end = re.compile("|".join(re.escape(answer_close + p) for p in (u_pre, v_pre) if p))
    # The text is scanned by position (no slicing): each character is looked at a bounded number of times.
    pos = len(bos) if bos and text.startswith(bos) else 0
    messages: list[Message] = []
    if not tpl.fold_system and not text.startswith(u_pre, pos):
        head, _, tail = _sub(tpl.system_format, bos_token, eos_token).partition("{system}")
        if not text.startswith(head, pos):
            raise fail(f"it should start with {(head or u_pre)!r}")
        end = text.find(tail + u_pre, pos + len(head))
        if end < 0:
            raise fail(f"no {u_pre!r} turn after the system prompt")
        system, pos = text[pos + len(head) : end], end + len(tail)
        if system != tpl.system:
            messages.append(Message("system", [text_part(system)]))
    elif tpl.system and not tpl.fold_system:
        messages.append(Message("system", [text_part("")]))  # the template's default system prompt was removed
    while True:
        if v_pre and text[pos:] == v_pre:
            raise fail(f"it asks for a {v_pre!r} question; a worker answers: end the prompt with {a_pre!r}")
        role, fmt, pre = "user", u, u_pre
        if v is not None and v_pre and text.startswith(v_pre, pos) and messages and messages[-1].role == "assistant":
            role, fmt, pre = "vuser", v, v_pre
        opening = pre + _sub(fmt.lead, bos_token, eos_token)
        if not text.startswith(opening, pos):
            raise fail(f"expected {opening!r} at {text[pos : pos + 40]!r}")
        pos += len(opening)
        close = _sub(fmt.end + fmt.after, bos_token, eos_token) + a_pre
        end = text.find(close, pos)
        if end < 0:
            raise fail(f"the {role} turn {text[pos : pos + 40]!r} is not followed by {close!r}")
        messages.append(Message.from_text(role, text[pos:end]))
        pos = end + len(close)
        if pos == len(text):
            break  # the text ends with the assistant tag: the generation prompt
        lead = _sub(a.lead, bos_token, eos_token)
        if not text.startswith(lead, pos):
            raise fail(f"expected {lead!r} after {a_pre!r}")
        pos += len(lead)
        found = answer_end.search(text, pos)  # the leftmost next user (or VUSER) tag
        if found is None:
            raise fail(f"the answer {text[pos : pos + 40]!r} is not followed by a user turn")
        messages.append(Message("assistant", [text_part(text[pos : found.start()])]))
        pos = found.start() + len(answer_close)
    again = render_text(messages, tpl, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
    if again not in (text, bos + text):
        raise fail(
            "its turns do not render back to the same text (a role tag inside a message, or spacing the "
            "template does not write)"
        )
    return messages
