"""validate_file: one problem per defect, naming the record index and field; counts of a good file."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from medvlm.data.stats import dataset_stats
from medvlm.data.validate import validate_file
from medvlm.errors import MedvlmError


def _rec(id_, image="a.png", turns=None):
    r = {
        "id": id_,
        "conversations": turns
        or [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A lung."}],
    }
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(d / "a.png")
    Image.new("L", (8, 6), 100).save(d / "b.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return d


def _validate(tmp_path, records, **kw):
    f = tmp_path / "data.json"
    f.write_text(json.dumps(records), encoding="utf-8")
    return validate_file(f, **kw)


def test_good_file_summary(tmp_path, folder):
    recs = [_rec("0", "a.png"), _rec("1", "b.png"), _rec("2", "a.png")]
    recs[0]["domain"] = {"chest_xray": True, "mri": False, "ct_scan": False, "histology": False, "gross": False}
    recs[1]["domain"] = {"chest_xray": False, "mri": True, "ct_scan": False, "histology": True, "gross": False}
    rep = _validate(tmp_path, recs, image_folder=folder)
    assert rep.ok and rep.problem_lines() == []
    assert (rep.records, rep.turns, rep.images, rep.images_found, rep.images_missing) == (3, 6, 3, 2, 0)
    assert dict(rep.domains) == {"chest_xray": 1, "mri": 1}
    assert rep.summary()["images_checked"] is True


def test_roles_not_alternating(tmp_path):
    turns = [
        {"from": "human", "value": "<image>\nq"},
        {"from": "human", "value": "again"},
        {"from": "gpt", "value": "a"},
    ]
    rep = _validate(tmp_path, [_rec("0"), _rec("x1", turns=turns)])
    assert rep.problem_lines() == [
        "record 1 (id x1): conversations[1]: roles do not alternate: expected a assistant turn, got user"
    ]


def test_conversation_starting_with_answer_and_late_system(tmp_path):
    turns = [{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>\nq"}, {"from": "system", "value": "s"}]
    lines = _validate(tmp_path, [_rec("0", turns=turns)]).problem_lines()
    assert "record 0 (id 0): conversations[0]: roles do not alternate: expected a user turn, got assistant" in lines
    assert "record 0 (id 0): conversations[2]: a system turn after the conversation started" in lines


def test_image_without_placeholder(tmp_path):
    turns = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A lung."}]
    rep = _validate(tmp_path, [_rec("0", turns=turns)])
    assert rep.problem_lines() == ["record 0 (id 0): conversations[0]: no <image> placeholder while 1 image(s) given"]


def test_placeholder_count_mismatch(tmp_path):
    turns = [{"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}]
    no_image = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rep = _validate(tmp_path, [_rec("0", turns=turns), _rec("1", image=None, turns=no_image)])
    assert rep.problem_lines() == [
        "record 0 (id 0): conversations[0]: 2 <image> placeholder(s) but 1 image(s) given",
        "record 1 (id 1): conversations[0]: 1 <image> placeholder(s) but 0 image(s) given",
    ]


def test_empty_turn_and_image_in_answer(tmp_path):
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "  "}]
    turns2 = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>\na"}]
    lines = _validate(tmp_path, [_rec("0", turns=turns), _rec("1", turns=turns2)]).problem_lines()
    assert lines == [
        "record 0 (id 0): conversations[1]: empty turn",
        "record 1 (id 1): conversations[1]: an <image> placeholder in an answer turn",
    ]


def test_missing_and_unreadable_images(tmp_path, folder):
    recs = [_rec("0", "a.png"), _rec("1", "missing.png"), _rec("2", "broken.png"), _rec("3", "missing.png")]
    rep = _validate(tmp_path, recs, image_folder=folder)
    lines = rep.problem_lines()
    assert lines[0] == "record 1 (id 1): image: image 'missing.png' missing"
    assert lines[1].startswith("record 2 (id 2): image: image 'broken.png' unreadable")
    assert lines[2] == "record 3 (id 3): image: image 'missing.png' missing"
    assert (rep.images_found, rep.images_missing, rep.images_unreadable) == (1, 1, 1)


def test_problem_in_typo_key_file_names_the_typo_field(tmp_path, shared_dir):
    f = tmp_path / "align.json"
    data = json.loads((shared_dir / "formats" / "alignment_sample.json").read_text())
    data[1]["conversatons"][1]["value"] = ""
    f.write_text(json.dumps(data), encoding="utf-8")
    assert validate_file(f).problem_lines() == ["record 1 (id 18627621_F2): conversatons[1]: empty turn"]


def test_every_shared_format_validates(shared_dir):
    for name in (
        "alignment_sample.json",
        "instruct_sample.json",
        "qa50_sample.jsonl",
        "vqa_test_sample.json",
        "fig_captions_sample.json",
        "dpo_sample.json",
        "image_urls_sample.jsonl",
    ):
        rep = validate_file(shared_dir / "formats" / name)
        assert rep.ok and rep.records > 0, (name, rep.problem_lines())


def test_shared_images_are_found(shared_dir, tmp_path):
    shutil.copy(shared_dir / "formats" / "vqa_test_sample.json", tmp_path / "t.json")
    rep = validate_file(tmp_path / "t.json", image_folder=shared_dir / "images")
    assert (rep.images_found, rep.images_missing) == (2, 1)
    assert rep.problem_lines() == ["record 0 (id 300648006): image: image 'test/test_0648.jpg' missing"]


def test_preference_problems_name_the_side(tmp_path):
    f = tmp_path / "dpo.json"
    f.write_text(
        json.dumps(
            [
                {
                    "image": "a.png",
                    "chosen_conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "reject_conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}],
                }
            ]
        )
    )
    assert validate_file(f).problem_lines() == [
        "record 0 (id 0): chosen_conversations[0]: no <image> placeholder while 1 image(s) given",
        "record 0 (id 0): reject_conversations[0]: no <image> placeholder while 1 image(s) given",
    ]


def test_unreadable_records_raise_or_are_listed(tmp_path):
    f = tmp_path / "x.jsonl"
    good = json.dumps({"image": "a.png", "question": "q", "answer": "a"})
    f.write_text(
        f"{good}\n{{bad\n{json.dumps({'image': 'a.png', 'question': ['q'], 'answer': 'a'})}\n{good}\n", encoding="utf-8"
    )
    with pytest.raises(MedvlmError, match=r"x\.jsonl:2: invalid JSON"):
        validate_file(f)
    rep = validate_file(f, skip_bad=True)
    assert rep.records == 2 and not rep.ok
    assert len(rep.bad_records) == 2 and ":2: invalid JSON" in rep.bad_records[0]
    assert "record 1 (line 3): field 'question': expected a string, got list" in rep.bad_records[1]


def test_missing_image_folder_is_an_error(tmp_path):
    with pytest.raises(MedvlmError, match="image folder not found"):
        _validate(tmp_path, [_rec("0")], image_folder=tmp_path / "nope")


def test_stats_instruct_qa50_vqa(shared_dir):
    st = dataset_stats(shared_dir / "formats" / "instruct_sample.json")
    assert (st["records"], st["turns"], st["qa_pairs"], st["images"]) == (1, 4, 2, 1)
    assert st["domains"] == {"chest_xray": {"records": 1, "images": 1, "qa_pairs": 2}}
    qa = dataset_stats(shared_dir / "data" / "llava_med_eval" / "llava_med_eval_qa50_qa.jsonl")
    assert (qa["records"], qa["questions"], qa["qa_pairs"], qa["images"]) == (193, 193, 0, 50)
    assert qa["types"] == {"conversation": 143, "detailed_description": 50}
    assert sum(v["records"] for v in qa["domains"].values()) == 193
    assert sum(qa["domain_flags"].values()) > 193  # some figures carry two true domains
    vqa = dataset_stats(shared_dir / "formats" / "vqa_test_sample.json")
    assert vqa["answer_types"] == {"CLOSED": 1, "OPEN": 2} and vqa["qa_pairs"] == 3
    urls = dataset_stats(shared_dir / "formats" / "image_urls_sample.jsonl")
    assert (urls["records"], urls["images"]) == (2, 2)
