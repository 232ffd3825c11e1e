"""``medvlm eval vqa``: batched = one-at-a-time greedy answers, resume, K processes = one process, formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medvlm.errors import MedvlmError
from medvlm.eval.vqa import ANSWER_FIELDS, load_answers, read_questions, run_vqa, split_contiguous
from medvlm.infer.engine import GenerationSettings
from medvlm.utils.artifacts import DECODING_FILE

SETTINGS = GenerationSettings(max_new_tokens=6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A random tiny model (answers differ per image and question) and 24 synthetic test questions."""
    from medvlm.data.synth import generate_synth
    from medvlm.model.build import build_preset, save_checkpoint

    root = tmp_path_factory.mktemp("vqa")
    data = root / "synth"
    generate_synth(data, n_images=30, seed=3, image_size=64, qa50_images=1)
    model, processor = build_preset("tiny", seed=7)
    with torch.no_grad():  # larger random weights: answers then depend on the image and the question
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    save_checkpoint(model, processor, root / "tiny-model")
    return {
        "root": root,
        "model": root / "tiny-model",
        "questions": data / "vqa" / "test.json",
        "images": data / "images",
        "qa50": data / "qa50.jsonl",
    }


@pytest.fixture(scope="module")
def reference(setup) -> list[dict]:
    """One question per generate call (batch size 1): what batched runs must reproduce."""
    out = setup["root"] / "ref" / "answers.jsonl"
    res = run_vqa(setup["model"], setup["questions"], out, setup["images"], SETTINGS, batch_size=1, progress=False)
    assert res.answered == res.total == 24 and res.resumed == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_answer_file_format_order_and_decoding_json(setup, reference):
    gt = json.loads(setup["questions"].read_text())
    assert [r["question_id"] for r in reference] == [g["id"] for g in gt]  # question order, int ids kept
    for r, g in zip(reference, gt):
        assert list(r) == list(ANSWER_FIELDS)
        assert r["prompt"] == g["conversations"][0]["value"].replace("<image>", "").strip()
        assert r["model_id"] == "tiny-model"
        assert r["metadata"]["max_new_tokens"] == 6 and r["metadata"]["temperature"] == 0.0
        assert len(r["answer_id"]) == 22
    assert len({r["text"] for r in reference}) > 3, "a random model still answers different questions differently"
    assert len({r["answer_id"] for r in reference}) == len(reference)
    dec = json.loads((setup["root"] / "ref" / DECODING_FILE).read_text())
    assert dec["model_id"] == "tiny-model" and dec["settings"]["max_new_tokens"] == 6 and dec["n_questions"] == 24
    assert "protocol" not in dec


def test_batched_equals_one_at_a_time_through_the_cli(setup, reference):
    from medvlm.cli import main

    out = setup["root"] / "batched" / "answers.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "eval",
                "vqa",
                "--model",
                str(setup["model"]),
                "--questions",
                str(setup["questions"]),
                "--image-folder",
                str(setup["images"]),
                "--out",
                str(out),
                "--batch-size",
                "16",
                "--max-new-tokens",
                "6",
            ]
        )
    assert exit_info.value.code in (0, None)
    batched = [json.loads(line) for line in out.read_text().splitlines()]
    assert batched == reference  # same texts and the same deterministic answer ids


def test_resume_keeps_answers_drops_a_torn_line_and_finishes_in_order(setup, reference):
    out = setup["root"] / "resume" / "answers.jsonl"
    out.parent.mkdir()
    # An interrupted run: answers to questions 7, 2 and 11 (batches may land out of order when merged),
    # then a torn line.
    kept = [reference[7], reference[2], reference[11]]
    kept[0] = dict(kept[0], text="KEPT FROM THE FIRST RUN")
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(reference[3])[:25])
    (out.parent / DECODING_FILE).write_text((setup["root"] / "ref" / DECODING_FILE).read_text())
    res = run_vqa(setup["model"], setup["questions"], out, setup["images"], SETTINGS, batch_size=5, progress=False)
    assert (res.resumed, res.answered) == (3, 21)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [r["question_id"] for r in reference]
    assert rows[7]["text"] == "KEPT FROM THE FIRST RUN"  # not asked again
    assert [r for i, r in enumerate(rows) if i != 7] == [r for i, r in enumerate(reference) if i != 7]
    again = run_vqa(setup["model"], setup["questions"], out, setup["images"], SETTINGS, progress=False)
    assert (again.resumed, again.answered) == (24, 0)


def test_resume_refuses_answers_made_with_other_settings(setup, reference):
    out = setup["root"] / "other" / "answers.jsonl"
    out.parent.mkdir()
    out.write_text(json.dumps(reference[0]) + "\n")
    (out.parent / DECODING_FILE).write_text((setup["root"] / "ref" / DECODING_FILE).read_text())
    with pytest.raises(MedvlmError, match="another settings"):
        run_vqa(
            setup["model"],
            setup["questions"],
            out,
            setup["images"],
            GenerationSettings(max_new_tokens=9),
            progress=False,
        )
    assert out.read_text() == json.dumps(reference[0]) + "\n"  # nothing lost


def test_damaged_or_foreign_answer_files_are_errors(setup, reference, tmp_path):
    known = {q.key: q for q in read_questions(setup["questions"])}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(reference[0]) + "\n{not json\n" + json.dumps(reference[1]) + "\n")
    with pytest.raises(MedvlmError, match=r"bad.jsonl:2: not a JSON answer line"):
        load_answers(bad, known)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps(dict(reference[0], question_id=123456789)) + "\n")
    with pytest.raises(MedvlmError, match="123456789 is not in the questions file"):
        load_answers(foreign, known)


def test_two_processes_give_the_single_process_file(setup, reference):
    out = setup["root"] / "chunks" / "answers.jsonl"
    res = run_vqa(
        setup["model"], setup["questions"], out, setup["images"], SETTINGS, batch_size=4, processes=2, progress=False
    )
    assert res.answered == 24
    assert out.read_bytes() == (setup["root"] / "ref" / "answers.jsonl").read_bytes()
    assert not list(out.parent.glob("answers.jsonl.part*"))


def test_qa50_questions_and_chunking(setup, shared_dir):
    qs = read_questions(shared_dir / "formats" / "qa50_sample.jsonl")
    assert qs[0].question_id == 0 and qs[0].prompt == "What is the organ in the image?"
    assert qs[0].images == ["18063892_F3.jpg"]
    assert qs[0].sample().messages[0].content[0] == {"type": "image"}  # the image goes first, as in model_vqa
    synth = read_questions(setup["qa50"])
    assert len(synth) == 4 and all("<image>" not in q.prompt for q in synth)
    assert split_contiguous(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert split_contiguous([1], 4) == [[1]]


def test_duplicate_question_ids_are_refused(tmp_path):
    rec = {
        "id": 5,
        "image": "a.png",
        "answer_type": "OPEN",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}],
    }
    path = tmp_path / "test.json"
    path.write_text(json.dumps([rec, rec]))
    with pytest.raises(MedvlmError, match="record 1 .*duplicate question id 5"):
        read_questions(path)
