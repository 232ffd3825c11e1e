"""Chat templates: named, explicit conversation formats, rendering, and label masks from char spans.

A template is selected by name (``get_template``); nothing is sniffed from a model or folder name.

Rendering (``render_text``) writes the whole conversation as one string. Each image part becomes the
image text (``<image>`` for prompts handed to llava-hf style processors; ``[im_start] + <image> * N +
[im_end]`` inside ``encode_conversation``) placed where the part is: adjacent parts are joined with
``"\\n"`` when either is an image, so an image before the question renders ``"<image>\\nquestion"`` and
one after it ``"question\\n<image>"`` (the inverse of :meth:`medvlm.data.schema.Message.from_text`).

Labels (``encode_conversation``): the text is tokenised once with offsets, and a token is learned
iff its character span lies inside a learned span. Learned text = each assistant turn's
``lead + answer + end`` (and in ``v1_sq`` each VUSER question's ``lead + question + end``). The
``lead`` is the space between the role tag and the answer (``"ASSISTANT:" + " answer</s>"``): it is
learned with the answer because LLaMA/Mistral/GPT-2 style tokenizers merge that space into the
answer's first token (``"▁The"``, ``"ĠThe"``), and the generation prompt ends right before it
(``"... ASSISTANT:"``), so training and generation see the same first token. Leading whitespace of
learned text is dropped (the lead alone sets the spacing): byte-level BPE would otherwise merge it
with the role tag's newline in ``chatml`` (``"assistant\\n" + " x"`` -> ``"\\n "``). Should a tokenizer still
produce a token across a learned/unlearned boundary, it is learned iff its last character is learned,
and the encoding reports it in ``Encoded.straddles`` (the tests assert 0 for every template).

Research use only: the default system prompts describe a biomedical *research* assistant.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from medvlm.data.schema import Message
from medvlm.errors import MedvlmError

IGNORE_INDEX = -100

SYSTEM_PROMPT = (
    "You are a biomedical research assistant that looks at biomedical images such as radiographs, CT, "
    "MRI, ultrasound, microscopy and histology, and answers questions about them accurately and concisely. "
    "You say so when the image does not show enough to answer. Your answers are for research use only "
    "and are not medical advice."
)
SQ_SYSTEM_PROMPT = (
    SYSTEM_PROMPT + " You can also act as a curious virtual user who asks relevant, answerable questions "
    "about what the image shows, such as anatomy, findings and the background knowledge behind them."
)


class ImageTruncationError(MedvlmError):
    """``max_length`` would cut into image tokens (the sample cannot be trained on as is)."""


@dataclass(frozen=True)
class RoleFormat:
    """How one role's turn is written: ``prefix + lead + content + end + after``."""

    prefix: str
    """Role tag written before the turn, never learned (e.g. ``"USER:"``, ``"<|im_start|>user\\n"``)."""
    lead: str = ""
    """Text between the tag and the content (e.g. ``" "``); learned together with the content in learned roles."""
    end: str = ""
    """Text closing the turn (``"###"``, ``"{eos}"``, ``"<|im_end|>"``); learned in learned roles (the stop)."""
    after: str = ""
    """Text after ``end`` that is never learned (``"\\n"`` after ``<|im_end|>``)."""


@dataclass(frozen=True)
class ChatTemplate:
    """A named conversation format. ``{bos}``/``{eos}`` in any string stand for the tokenizer's BOS/EOS."""

    name: str
    """Registry name (``llava_med_v0``, ``vicuna_v1``, ``mistral_instruct``, ``v1_sq``, ``plain``, ``chatml``)."""
    description: str
    """One line saying which models / stage use this format."""
    user: RoleFormat
    """Format of user turns."""
    assistant: RoleFormat
    """Format of assistant turns (``lead + answer + end`` is learned)."""
    vuser: RoleFormat | None = None
    """Format of VUSER (self-questioning) turns, learned like answers; ``None`` = role not allowed."""
    system: str = ""
    """Default system prompt; a leading system message overrides it (an empty one removes it)."""
    system_format: str = "{system}"
    """How a non-empty system prompt is written at the start (``{system}`` is replaced by the text)."""
    fold_system: bool = False
    """Write the system prompt into the first user turn (``system + "\\n\\n" + content``) instead."""
    bos: bool = False
    """Write the tokenizer's BOS token first (templates write BOS themselves; encode never adds it)."""
    prompt_text: bool = True
    """``False`` (``plain``): user text is dropped, the prompt is only the image tokens."""
    single_turn: bool = False
    """Only one user/assistant exchange is allowed (``plain``)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end an answer besides EOS (``"###"`` for ``llava_med_v0``, ``"<|im_end|>"``)."""

    def to_jinja(self) -> str:
        """An HF ``chat_template`` rendering the same text as :func:`render_text` (image parts -> ``<image>``)."""
        from medvlm.data.template_jinja import template_to_jinja

        return template_to_jinja(self)


_VICUNA_USER = RoleFormat(prefix="USER:", lead=" ", end=" ")
_VICUNA_ASSISTANT = RoleFormat(prefix="ASSISTANT:", lead=" ", end="{eos}")

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="llava_med_v0",
            description="LLaVA-Med v1.0 / LLaVA v0: '{system}###Human: q###Assistant: a###', '###' is the learned stop",
            system=SYSTEM_PROMPT,
            system_format="{system}###",
            user=RoleFormat(prefix="Human:", lead=" ", end="###"),
            assistant=RoleFormat(prefix="Assistant:", lead=" ", end="###"),
            stop_strings=("###",),
        ),
        ChatTemplate(
            name="vicuna_v1",
            description="Vicuna v1 / LLaVA(-Med) v1.5 on LLaMA: '<s>{system} USER: q ASSISTANT: a</s>USER: ...'",
            system=SYSTEM_PROMPT,
            system_format="{system} ",
            bos=True,
            user=_VICUNA_USER,
            assistant=_VICUNA_ASSISTANT,
        ),
        ChatTemplate(
            name="mistral_instruct",
            description="LLaVA-Med v1.5 on Mistral: '<s>[INST] q [/INST] a</s>[INST] q2 [/INST] a2</s>'",
            fold_system=True,
            bos=True,
            user=RoleFormat(prefix="[INST]", lead=" ", end=" [/INST]"),
            assistant=RoleFormat(prefix="", lead=" ", end="{eos}"),
        ),
        ChatTemplate(
            name="v1_sq",
            description="STLLaVA-Med: vicuna_v1 plus VUSER turns (questions the model learns to ask, ending in EOS)",
            system=SQ_SYSTEM_PROMPT,
            system_format="{system} ",
            bos=True,
            user=_VICUNA_USER,
            assistant=_VICUNA_ASSISTANT,
            vuser=RoleFormat(prefix="VUSER:", lead=" ", end="{eos}"),
        ),
        ChatTemplate(
            name="plain",
            description="Alignment pretraining: '<s><image>caption</s>', only the caption and EOS are learned",
            bos=True,
            prompt_text=False,
            single_turn=True,
            user=RoleFormat(prefix=""),
            assistant=RoleFormat(prefix="", end="{eos}"),
        ),
        ChatTemplate(
            name="chatml",
            description="ChatML for SmolLM2 / Qwen-style LMs: '<|im_start|>role\\n...<|im_end|>\\n'",
            system=SYSTEM_PROMPT,
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user=RoleFormat(prefix="<|im_start|>user\n", end="<|im_end|>\n"),
            assistant=RoleFormat(prefix="<|im_start|>assistant\n", end="<|im_end|>", after="\n"),
            stop_strings=("<|im_end|>",),
        ),
    )
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """The template registered as ``name`` (a ChatTemplate is returned unchanged)."""
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise MedvlmError(f"unknown chat template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class Encoded:
    """A tokenised conversation."""

    input_ids: list[int]
    """Token ids of the whole rendered conversation (BOS included when the template writes it)."""
    labels: list[int]
    """Same length; the token id where learned, ``-100`` elsewhere."""
    num_images: int
    """Image parts in the conversation (each expanded to ``image_seq_length`` image tokens)."""
    straddles: int = 0
    """Tokens crossing a learned/unlearned boundary (0 for well-formed templates and tokenizers)."""


@dataclass
class Rendered:
    """Rendered text, the learned character spans ``[start, end)`` and the image-part count."""

    text: str
    spans: list[tuple[int, int]]
    num_images: int


def _as_messages(messages: list[Any]) -> list[Message]:
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, dict) and "role" in m and "content" in m:
            out.append(Message.from_dict(m))
        else:
            raise MedvlmError(f"message {i}: expected a Message or a dict with 'role' and 'content', got {m!r}")
    return out


def _check_turns(msgs: list[Message], tpl: ChatTemplate, add_generation_prompt: bool) -> tuple[str, list[Message]]:
    """Validate roles/order; return the effective system prompt and the non-system turns."""
    system = tpl.system
    turns = msgs
    if msgs and msgs[0].role == "system":
        system, turns = msgs[0].text, msgs[1:]
        if msgs[0].num_images:
            raise MedvlmError(f"message 0 (system): image parts are not allowed in a system message ({tpl.name})")
    if not turns:
        raise MedvlmError(f"the conversation has no user/assistant turns ({tpl.name})")
    user_roles = ("user", "vuser") if tpl.vuser is not None else ("user",)
    offset = len(msgs) - len(turns)
    for j, m in enumerate(turns):
        i = j + offset
        if m.role == "system":
            raise MedvlmError(f"message {i}: a system message is only allowed first ({tpl.name})")
        if m.role == "vuser" and tpl.vuser is None:
            raise MedvlmError(f"message {i}: role 'vuser' is only supported by the v1_sq template, not {tpl.name}")
        if m.role not in ("user", "assistant", "vuser"):
            raise MedvlmError(f"message {i}: unknown role {m.role!r}")
        expected = "assistant" if j % 2 else "/".join(user_roles)
        if (j % 2 == 1) != (m.role == "assistant"):
            raise MedvlmError(f"message {i}: expected a {expected} turn, got {m.role!r} (roles must alternate)")
        if m.role in ("assistant", "vuser") and m.num_images:
            raise MedvlmError(f"message {i} ({m.role}): image parts are only allowed in user turns")
        for p in m.content:
            if p.get("type") not in ("text", "image"):
                raise MedvlmError(f"message {i}: unknown content part type {p.get('type')!r}")
    last = turns[-1].role
    if add_generation_prompt:
        if last == "assistant" and tpl.vuser is None:
            raise MedvlmError(
                f"add_generation_prompt needs the conversation to end with a user turn, it ends with an "
                f"assistant turn ({tpl.name})"
            )
    elif last == "user":
        raise MedvlmError(
            f"a training conversation must end with an assistant turn (message {len(msgs) - 1} is 'user'); "
            f"pass add_generation_prompt=True for a prompt ({tpl.name})"
        )
    if tpl.single_turn and len(turns) > 2:
        raise MedvlmError(f"template {tpl.name} takes one user turn and one assistant turn, got {len(turns)} turns")
    return system, turns


def _content_text(m: Message, image_text: str, keep_text: bool, forbidden: tuple[str, ...], index: int) -> str:
    parts = [p for p in m.content if keep_text or p.get("type") == "image"]
    out: list[str] = []
    prev_image = False
    for k, p in enumerate(parts):
        is_image = p.get("type") == "image"
        if k and (is_image or prev_image):
            out.append("\n")
        if is_image:
            out.append(image_text)
        else:
            text = p["text"]
            for tok in forbidden:
                if tok and tok in text:
                    raise MedvlmError(
                        f"message {index} ({m.role}): text contains {tok!r}; images must be image parts "
                        "(Message.from_text turns '<image>' placeholders into parts)"
                    )
            out.append(text)
        prev_image = is_image
    return "".join(out)


def render(
    messages: list[Any],
    template: ChatTemplate | str,
    add_generation_prompt: bool = False,
    image_text: str = "<image>",
    *,
    bos_token: str | None = "<s>",
    eos_token: str | None = "</s>",
    forbidden: tuple[str, ...] = (),
) -> Rendered:
    """Render a conversation and return the text with its learned character spans."""
    tpl = get_template(template)
    msgs = _as_messages(messages)
    system, turns = _check_turns(msgs, tpl, add_generation_prompt)
    offset = len(msgs) - len(turns)

    def sub(s: str) -> str:
        if "{eos}" in s and eos_token is None:
            raise MedvlmError(f"template {tpl.name} ends turns with EOS but the tokenizer has no eos_token")
        return s.replace("{bos}", bos_token or "").replace("{eos}", eos_token or "")

    pieces: list[tuple[str, bool]] = []  # (text, learned)
    if tpl.bos and bos_token:
        pieces.append((bos_token, False))
    if system and not tpl.fold_system and tpl.prompt_text:
        pieces.append((sub(tpl.system_format.replace("{system}", system)), False))
    folded = not (system and tpl.fold_system)
    num_images = 0
    for j, m in enumerate(turns):
        fmt = tpl.assistant if m.role == "assistant" else tpl.vuser if m.role == "vuser" else tpl.user
        learned = m.role in ("assistant", "vuser")
        content = _content_text(m, image_text, tpl.prompt_text or learned, forbidden, j + offset)
        if learned:  # the lead sets the spacing; a leading space/newline would merge with the role tag
            content = content.lstrip()
        num_images += m.num_images
        if m.role == "user" and not folded:
            content, folded = system + "\n\n" + content, True
        pieces.append((sub(fmt.prefix), False))
        pieces.append((sub(fmt.lead) + content + sub(fmt.end), learned))
        pieces.append((sub(fmt.after), False))
    if add_generation_prompt:
        nxt = tpl.vuser if turns[-1].role == "assistant" else tpl.assistant
        pieces.append((sub(nxt.prefix), False))

    text_parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for text, learned in pieces:
        if learned and text:
            if spans and spans[-1][1] == pos:
                spans[-1] = (spans[-1][0], pos + len(text))
            else:
                spans.append((pos, pos + len(text)))
        text_parts.append(text)
        pos += len(text)
    return Rendered(text="".join(text_parts), spans=spans, num_images=num_images)


def render_text(
    messages: list[Any],
    template: ChatTemplate | str,
    add_generation_prompt: bool = False,
    image_token_text: str = "<image>",
    *,
    bos_token: str | None = "<s>",
    eos_token: str | None = "</s>",
) -> str:
    """Render a conversation to the prompt string (each image part -> ``image_token_text``)."""
    return render(
        messages, template, add_generation_prompt, image_token_text, bos_token=bos_token, eos_token=eos_token
    ).text


def _single_token_id(tokenizer: Any, token: str, what: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise MedvlmError(
            f"the tokenizer does not have {what} {token!r} as one token; add it with "
            "medvlm.model.tokenizer.add_image_tokens"
        )
    return ids[0]


def learned_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> tuple[list[bool], int]:
    """Per token: learned iff its last character lies in a learned span. Also counts boundary straddles."""
    starts = [s for s, _ in spans]

    def span_of(c: int) -> int:
        k = bisect.bisect_right(starts, c) - 1
        return k if k >= 0 and spans[k][0] <= c < spans[k][1] else -1

    mask: list[bool] = []
    straddles = 0
    for a, b in offsets:
        if b <= a:  # zero-width token (e.g. trimmed whitespace): judged by its position
            mask.append(span_of(a) >= 0)
            continue
        k_end = span_of(b - 1)
        mask.append(k_end >= 0)
        inside = k_end >= 0 and span_of(a) == k_end
        k = bisect.bisect_left(starts, b) - 1  # last span starting before b
        outside = k < 0 or spans[k][1] <= a
        straddles += not (inside or outside)
    return mask, straddles


def encode_conversation(
    messages: list[Any],
    tokenizer: Any,
    template: ChatTemplate | str,
    *,
    image_seq_length: int,
    image_token: str = "<image>",
    im_start_token: str | None = None,
    im_end_token: str | None = None,
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> Encoded:
    """Render, tokenise once (fast tokenizer, offsets) and label a conversation.

    With ``add_generation_prompt`` the text ends with the next speaker's tag and every label is -100.

    Raises :class:`ImageTruncationError` when ``max_length`` would cut image tokens; otherwise the
    sequence is truncated from the end.
    """
    tpl = get_template(template)
    if not getattr(tokenizer, "is_fast", False):
        raise MedvlmError("encode_conversation needs a fast (tokenizers-backed) tokenizer for offsets")
    if image_seq_length < 1:
        raise MedvlmError(f"image_seq_length must be >= 1, got {image_seq_length}")
    image_id = _single_token_id(tokenizer, image_token, "the image token")
    marker_ids = {image_id}
    for tok, what in ((im_start_token, "the image start token"), (im_end_token, "the image end token")):
        if tok is not None:
            marker_ids.add(_single_token_id(tokenizer, tok, what))
    image_text = (im_start_token or "") + image_token * image_seq_length + (im_end_token or "")
    forbidden = tuple(t for t in (image_token, im_start_token, im_end_token) if t)
    r = render(
        messages,
        tpl,
        add_generation_prompt,
        image_text,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        forbidden=forbidden,
    )
    enc = tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    # A generation prompt is for inference: nothing in it is learned.
    spans = [] if add_generation_prompt else r.spans
    mask, straddles = learned_mask([tuple(o) for o in enc["offset_mapping"]], spans)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]

    n_image_tokens = sum(1 for t in ids if t == image_id)
    if n_image_tokens != r.num_images * image_seq_length:
        raise MedvlmError(
            f"expected {r.num_images * image_seq_length} image tokens ({r.num_images} images x {image_seq_length}) "
            f"but the tokenizer produced {n_image_tokens}; {image_token!r} must be a special token"
        )
    if max_length is not None and len(ids) > max_length:
        if any(t in marker_ids for t in ids[max_length:]):
            raise ImageTruncationError(
                f"max_length {max_length} would cut image tokens (the conversation has {len(ids)} tokens, "
                f"{r.num_images} images of {image_seq_length} tokens)"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return Encoded(input_ids=ids, labels=labels, num_images=r.num_images, straddles=straddles)


def stop_token_id_sequences(tokenizer: Any, template: ChatTemplate | str) -> list[list[int]]:
    """Token-id sequences that end an answer: EOS, then each stop string (standalone and after text).

    A stop string may tokenise differently at the start of a text and after a word (``"###"`` vs
    ``"▁###"`` in SentencePiece tokenizers), so both forms are returned (deduplicated).
    """
    tpl = get_template(template)
    seqs: list[list[int]] = []
    if tokenizer.eos_token_id is not None:
        seqs.append([tokenizer.eos_token_id])
    for s in tpl.stop_strings:
        forms = [tokenizer.encode(s, add_special_tokens=False)]
        base = tokenizer.encode("a", add_special_tokens=False)
        joined = tokenizer.encode("a" + s, add_special_tokens=False)
        if joined[: len(base)] == base and len(joined) > len(base):
            forms.append(joined[len(base) :])
        for f in forms:
            if f and f not in seqs:
                seqs.append(f)
    return seqs
