"""VQA converters: tiny fixtures in each public layout -> LLaVA-Med's VQA format, written atomically."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from medvlm.data.benchmarks.convert import CLOSED_OPTIONS_SUFFIX, convert_vqa
from medvlm.data.readers import read_samples, resolve_format
from medvlm.data.validate import validate_file
from medvlm.errors import MedvlmError


def _png(path, color=(200, 10, 10), size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _rad(qid, img, q, a, at, phrase="freeform", qt="PRES"):
    return {
        "qid": qid,
        "image_name": img,
        "question": q,
        "answer": a,
        "answer_type": at,
        "question_type": qt,
        "phrase_type": phrase,
        "image_organ": "CHEST",
    }


def _load(path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture()
def rad_public(tmp_path):
    src = tmp_path / "vqa_rad"
    for n in ("synpic1.jpg", "synpic2.jpg"):
        _png(src / "VQA_RAD Image Folder" / n)
    recs = [
        _rad(1, "synpic1.jpg", "Is there a mass?", "yes", "CLOSED"),
        _rad(2, "synpic1.jpg", "Where is the lesion?", "left lung", "OPEN", "para"),
        _rad(3, "synpic2.jpg", "What organ is shown?", "lung", "OPEN "),
        _rad(4, "synpic2.jpg", "Is this normal?", "no", "CLOSED", "test_freeform"),
        _rad(5, "synpic2.jpg", "How many ribs?", 12, "OPEN", "test_para"),
    ]
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps(recs), encoding="utf-8")
    return src


def test_vqa_rad_public_split_by_phrase_type(rad_public, tmp_path):
    out = tmp_path / "out"
    counts = convert_vqa("vqa-rad", rad_public, out)
    assert counts == {"train": 3, "test": 2, "images": 2, "open_answers": 2}
    train, test = _load(out / "train.json"), _load(out / "test.json")
    assert [r["id"] for r in train] == [1, 2, 3] and [r["id"] for r in test] == [4, 5]
    assert train[0] == {
        "id": 1,
        "image": "synpic1.jpg",
        "answer_type": "CLOSED",
        "question_type": "PRES",
        "conversations": [{"from": "human", "value": "<image>\nIs there a mass?"}, {"from": "gpt", "value": "yes"}],
    }
    assert train[2]["answer_type"] == "OPEN" and test[1]["conversations"][1]["value"] == "12"
    assert _load(out / "train_open_answers.json") == {"0": ["left lung", "lung"]}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["synpic1.jpg", "synpic2.jpg"]
    # the output reads back as a VQA test file and validates with its images
    assert resolve_format(out / "test.json") == "vqa_test"
    assert [s.meta["answer_type"] for s in read_samples(out / "test.json")] == ["CLOSED", "OPEN"]
    assert validate_file(out / "train.json", image_folder=out / "images").ok


def test_vqa_rad_prefers_paper_split_and_closed_options(rad_public, tmp_path):
    (rad_public / "trainset.json").write_text(json.dumps([_rad(10, "synpic1.jpg", "Is it a CT?", "No", "CLOSED")]))
    (rad_public / "testset.json").write_text(
        json.dumps(
            [
                _rad(11, "synpic2.jpg", "Which side?", "right", "OPEN"),
                _rad(12, "synpic2.jpg", "Is it enlarged?", "yes", "CLOSED"),
            ]
        )
    )
    out = tmp_path / "out"
    convert_vqa("vqa-rad", rad_public, out, closed_options=True)
    train, test = _load(out / "train.json"), _load(out / "test.json")
    assert [r["id"] for r in train] == [10] and [r["id"] for r in test] == [11, 12]
    assert train[0]["conversations"][0]["value"] == "<image>\nIs it a CT?" + CLOSED_OPTIONS_SUFFIX
    assert test[0]["conversations"][0]["value"] == "<image>\nWhich side?"
    assert test[1]["conversations"][0]["value"].endswith("Please choose from the following two options: [yes, no]")
    assert _load(out / "train_open_answers.json") == {"0": []}


def test_slake_english_only_with_validation(tmp_path):
    src = tmp_path / "slake"
    _png(src / "imgs" / "xmlab1" / "source.jpg")
    _png(src / "imgs" / "xmlab2" / "source.jpg", (0, 0, 255))

    def rec(qid, img, q, a, at, lang="en"):
        return {
            "img_id": 1,
            "img_name": img,
            "question": q,
            "answer": a,
            "q_lang": lang,
            "answer_type": at,
            "content_type": "Organ",
            "qid": qid,
            "location": "Lung",
            "modality": "CT",
            "base_type": "vqa",
        }

    (src / "train.json").write_text(
        json.dumps(
            [
                rec(1, "xmlab1/source.jpg", "Which organ?", "Lung", "OPEN"),
                rec(2, "xmlab1/source.jpg", "哪个器官?", "肺", "OPEN", "zh"),
            ]
        ),
        encoding="utf-8",
    )
    (src / "validation.json").write_text(json.dumps([rec(3, "xmlab2/source.jpg", "Is it CT?", "Yes", "CLOSED")]))
    (src / "test.json").write_text(json.dumps([rec(4, "xmlab2/source.jpg", "Is it MRI?", "No", "CLOSED")]))
    out = tmp_path / "out"
    counts = convert_vqa("slake", src, out)
    assert counts["train"] == 1 and counts["validation"] == 1 and counts["test"] == 1
    (t,) = _load(out / "train.json")
    assert t["id"] == 1 and t["image"] == "xmlab1/source.jpg" and t["question_type"] == "Organ"
    assert t["modality"] == "CT" and t["location"] == "Lung"
    assert (out / "images" / "xmlab2" / "source.jpg").is_file()
    assert _load(out / "train_open_answers.json") == {"0": ["Lung"]}
    (s,) = read_samples(out / "test.json")
    assert s.meta["answer_type"] == "CLOSED" and s.messages[1].text == "No" and s.meta["modality"] == "CT"


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([r[0] for r in rows], type=image_type),
            "question": [r[1] for r in rows],
            "answer": [r[2] for r in rows],
        }
    )
    pq.write_table(table, path)


def _img_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format=fmt)
    return buf.getvalue()


def test_pathvqa_parquet(tmp_path):
    src = tmp_path / "path-vqa"
    a, b = _img_bytes((255, 0, 0)), _img_bytes((0, 255, 0), "JPEG")
    _write_parquet(
        src / "data" / "train-00000-of-00002.parquet",
        [
            ({"bytes": a, "path": None}, "Is this tissue inflamed?", "yes"),
            ({"bytes": a, "path": None}, "What is present?", "fibrosis"),
        ],
    )
    _write_parquet(
        src / "data" / "train-00001-of-00002.parquet", [({"bytes": b, "path": "x.jpg"}, "What stain?", "H&E")]
    )
    _write_parquet(src / "data" / "test-00000-of-00001.parquet", [({"bytes": b, "path": None}, "Is it benign?", "No")])
    out = tmp_path / "out"
    counts = convert_vqa("pathvqa", src, out, closed_options=True)
    assert counts == {"train": 3, "test": 1, "images": 2, "open_answers": 2}
    train = _load(out / "train.json")
    assert [r["answer_type"] for r in train] == ["CLOSED", "OPEN", "OPEN"]
    assert train[0]["image"] == train[1]["image"] == "train_000000.png"  # identical bytes written once
    assert train[2]["image"].endswith(".jpg")
    assert train[0]["conversations"][0]["value"].endswith(CLOSED_OPTIONS_SUFFIX)
    assert not train[1]["conversations"][0]["value"].endswith(CLOSED_OPTIONS_SUFFIX)
    (t,) = _load(out / "test.json")
    assert t["answer_type"] == "CLOSED" and t["image"] == train[2]["image"]
    assert _load(out / "train_open_answers.json") == {"0": ["H&E", "fibrosis"]}
    assert validate_file(out / "test.json", image_folder=out / "images").ok


def test_failure_leaves_nothing_and_existing_output_needs_overwrite(rad_public, tmp_path):
    out = tmp_path / "out"
    (rad_public / "VQA_RAD Image Folder" / "synpic2.jpg").unlink()
    with pytest.raises(MedvlmError, match=r"record 2: image file .*synpic2\.jpg not found"):
        convert_vqa("vqa-rad", rad_public, out)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    _png(rad_public / "VQA_RAD Image Folder" / "synpic2.jpg")
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MedvlmError, match="not empty"):
        convert_vqa("vqa-rad", rad_public, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_vqa("vqa-rad", rad_public, out, overwrite=True)
    assert (out / "test.json").is_file() and not (out / "keep.txt").exists()


def test_bad_source_records(tmp_path):
    src = tmp_path / "rad"
    _png(src / "VQA_RAD Image Folder" / "a.jpg")
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps([_rad(1, "a.jpg", "Q?", "yes", "MAYBE")]))
    with pytest.raises(MedvlmError, match=r"record 0: field 'answer_type': expected OPEN or CLOSED, got 'MAYBE'"):
        convert_vqa("vqa-rad", src, tmp_path / "o")
    (src / "VQA_RAD Dataset Public.json").write_text(json.dumps([_rad(1, "../a.jpg", "Q?", "yes", "OPEN")]))
    with pytest.raises(MedvlmError, match="relative path inside the image folder"):
        convert_vqa("vqa-rad", src, tmp_path / "o")
    with pytest.raises(MedvlmError, match="unknown dataset 'vqa2'"):
        convert_vqa("vqa2", src, tmp_path / "o")
    with pytest.raises(MedvlmError, match="no train-\\*.parquet"):
        convert_vqa("pathvqa", src, tmp_path / "o")
