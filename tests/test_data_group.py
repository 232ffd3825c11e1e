"""Merging single-question VQA samples per image (``medvlm data group``, LLaVA-1.5's VQA training format)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medvlm.data.benchmarks.group import GroupStats, group_by_image, group_file, is_yes_no
from medvlm.data.readers import read_samples
from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError


def vqa(sid: str, image: str, q: str, a: str, system: str | None = None) -> Sample:
    msgs = [Message("system", [text_part(system)])] if system else []
    msgs += [Message("user", [image_part(), text_part(q)]), Message("assistant", [text_part(a)])]
    return Sample(id=sid, messages=msgs, images=[image], meta={"answer_type": "CLOSED"})


def qa_pairs(s: Sample) -> list[tuple[str, str]]:
    turns = [m for m in s.messages if m.role != "system"]
    return [(u.text, a.text) for u, a in zip(turns[::2], turns[1::2])]


def test_questions_of_an_image_become_one_conversation_with_the_image_first():
    text_only = Sample(id="t", messages=[Message("user", [text_part("hi")]), Message("assistant", [text_part("ho")])])
    multi = Sample(
        id="m",
        images=["b.png"],
        messages=[
            Message("user", [image_part(), text_part("q1")]),
            Message("assistant", [text_part("a1")]),
            Message("user", [text_part("q2")]),
            Message("assistant", [text_part("a2")]),
        ],
    )
    samples = [
        vqa("1", "a.png", "Is it left?", "yes"),
        text_only,
        vqa("2", "b.png", "How many?", "two"),
        vqa("3", "a.png", "How many?", "one"),
        multi,
        vqa("4", "a.png", "Is it big?", "no"),
    ]
    stats = GroupStats()
    out = group_by_image(samples, seed=0, stats=stats)

    # First-seen order: a.png's conversation, the text-only sample, b.png's, the multi-turn sample.
    assert [s.images for s in out] == [["a.png"], [], ["b.png"], ["b.png"]]
    assert out[1] is text_only and out[3] is multi
    a = out[0]
    assert sorted(a.meta["merged_ids"]) == ["1", "3", "4"] and a.id == f"{a.meta['merged_ids'][0]}+2"
    # Every question and its own answer survive, paired; only the first user turn carries the image.
    assert sorted(qa_pairs(a)) == [("How many?", "one"), ("Is it big?", "no"), ("Is it left?", "yes")]
    users = [m for m in a.messages if m.role == "user"]
    assert [m.num_images for m in users] == [1, 0, 0] and users[0].content[0] == image_part()
    assert a.num_image_parts == len(a.images) == 1
    assert out[2].id == "2" and qa_pairs(out[2]) == [("How many?", "two")]
    assert (stats.samples_in, stats.merged, stats.passed_through, stats.conversations, stats.images) == (6, 4, 2, 2, 2)


def test_order_is_seeded_and_chunks_respect_max_questions():
    samples = [vqa(str(i), "a.png", f"q{i}", f"a{i}") for i in range(5)]
    orders = {seed: [s.meta["merged_ids"] for s in group_by_image(samples, seed=seed)] for seed in range(6)}
    assert group_by_image(samples, seed=3)[0].meta == group_by_image(samples, seed=3)[0].meta  # deterministic
    assert len({tuple(o[0]) for o in orders.values()}) > 1  # the seed changes which question carries the image
    chunks = group_by_image(samples, max_questions=2, seed=1)
    assert [len(c.meta["merged_ids"]) for c in chunks] == [2, 2, 1]
    assert sorted(i for c in chunks for i in c.meta["merged_ids"]) == [str(i) for i in range(5)]
    assert all(c.images == ["a.png"] and c.messages[0].num_images == 1 for c in chunks)
    with pytest.raises(MedvlmError, match="max_questions"):
        group_by_image(samples, max_questions=0)


def test_yes_no_last_puts_the_yes_no_questions_after_the_others_in_their_shuffled_order():
    answers = ["yes", "left", "No.", "two", " YES ", "ct", "no"]
    samples = [vqa(str(i), "a.png", f"q{i}", a) for i, a in enumerate(answers)]
    assert [is_yes_no(s) for s in samples] == [True, False, True, False, True, False, True]
    for seed in range(6):
        shuffled = group_by_image(samples, seed=seed)[0].meta["merged_ids"]
        ordered = group_by_image(samples, seed=seed, yes_no_last=True)[0].meta["merged_ids"]
        yes_no = {"0", "2", "4", "6"}
        # the same shuffle, then a stable split: open answers first, each part in its shuffled order
        assert ordered == [i for i in shuffled if i not in yes_no] + [i for i in shuffled if i in yes_no]
    # without it, some seed puts a yes/no question before an open one (so the ordering above is not the shuffle's)
    firsts = {group_by_image(samples, seed=seed)[0].meta["merged_ids"][0] for seed in range(6)}
    assert firsts & {"0", "2", "4", "6"}


def test_system_prompts_are_kept_once_and_conflicts_are_refused():
    same = [vqa("1", "a.png", "q1", "a1", system="Be brief."), vqa("2", "a.png", "q2", "a2", system="Be brief.")]
    merged = group_by_image(same)[0]
    assert [m.role for m in merged.messages] == ["system", "user", "assistant", "user", "assistant"]
    clash = [vqa("1", "a.png", "q1", "a1", system="Be brief."), vqa("2", "a.png", "q2", "a2", system="Be long.")]
    with pytest.raises(MedvlmError, match=r"\['1', '2'\].*a\.png.*different system prompts"):
        group_by_image(clash)


def test_every_answer_of_a_merged_conversation_is_learned(tmp_path):
    """Encoded with a real template: the labels cover exactly the answers (and their end tokens), once each."""
    from medvlm.model.build import build_preset

    _, processor = build_preset("tiny", projector="linear", seed=0)
    Image.new("RGB", (40, 30), (90, 20, 20)).save(tmp_path / "a.png")
    merged = group_by_image(
        [
            vqa("1", "a.png", "Is it left?", "yes"),
            vqa("2", "a.png", "How many?", "three"),
            vqa("3", "a.png", "Size?", "large"),
        ],
        seed=0,
    )[0]
    feats = processor.encode(merged, image_folder=tmp_path)
    ids, labels = feats["input_ids"], feats["labels"]
    assert int((ids == processor.image_token_id).sum()) == processor.image_seq_length
    learned = processor.tokenizer.decode(ids[labels != -100])
    for answer in ("yes", "three", "large"):
        assert learned.count(answer) == 1, learned
    for question in ("left", "many", "Size"):
        assert question not in learned


def test_group_file_and_cli_write_llava_json_atomically(tmp_path, capsys):
    from medvlm.cli import main

    src = tmp_path / "train.json"
    recs = [
        {
            "id": str(i),
            "image": f"img{i % 2}.png",
            "answer_type": "OPEN",
            "conversations": [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}],
        }
        for i in range(4)
    ]
    src.write_text(json.dumps(recs))
    with pytest.raises(SystemExit) as e:
        main(["data", "group", "--in", str(src), "--out", str(tmp_path / "grouped.json"), "--seed", "2"])
    assert e.value.code in (0, None)
    assert "4 samples -> 2 conversations over 2 images" in capsys.readouterr().out
    back = list(read_samples(tmp_path / "grouped.json"))
    assert [s.images for s in back] == [["img0.png"], ["img1.png"]]
    assert sorted(p for s in back for p in qa_pairs(s)) == [(f"q{i}", f"a{i}") for i in range(4)]
    assert json.loads((tmp_path / "grouped.json").read_text())[0]["conversations"][0]["value"].startswith("<image>\n")
    # --yes-no-last (the default, as in training) / --shuffled
    recs[0]["conversations"][1]["value"] = "yes"
    src.write_text(json.dumps(recs))
    pairs = {}
    for flag in ("--yes-no-last", "--shuffled"):
        with pytest.raises(SystemExit):
            main(["data", "group", "--in", str(src), "--out", str(tmp_path / f"{flag}.json"), "--seed", "0", flag])
        pairs[flag] = qa_pairs(next(iter(read_samples(tmp_path / f"{flag}.json"))))
    assert pairs["--yes-no-last"] == [("q2", "a2"), ("q0", "yes")]
    assert pairs["--shuffled"] == [("q0", "yes"), ("q2", "a2")]
    with pytest.raises(MedvlmError, match="must not overwrite the input"):
        group_file(src, src)
    assert json.loads(src.read_text()) == recs
