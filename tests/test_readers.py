"""Readers: every format in ../shared/formats, the real qa50 file, auto-detection, bad input, streaming."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import pytest

from medvlm.data.readers import (
    FORMATS,
    LazySamples,
    RecordFile,
    images_first,
    index_json_array,
    index_jsonl,
    iter_json_array,
    read_image_urls,
    read_preferences,
    read_record_at,
    read_samples,
    resolve_format,
    sample_to_llava,
)
from medvlm.data.schema import Message, Sample
from medvlm.errors import MedvlmError


def _texts(sample: Sample) -> list[tuple[str, list]]:
    return [(m.role, m.content) for m in sample.messages]


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return str(path)


def test_alignment_typo_key_and_placeholder_at_either_end(shared_dir):
    f = shared_dir / "formats" / "alignment_sample.json"
    assert resolve_format(f) == "llava"
    s1, s2 = list(read_samples(f))
    assert s1.id == "32432162_F1" and s1.images == ["32432162_F1.jpg"]
    # "<image>" at the end of the human turn -> text then image; at the start -> image then text
    assert s1.messages[0].content == [
        {"type": "text", "text": "Summarize the visual content of the image."},
        {"type": "image"},
    ]
    assert s2.messages[0].content == [{"type": "image"}, {"type": "text", "text": "Describe the image concisely."}]
    assert [m.role for m in s1.messages] == ["user", "assistant"]
    assert s2.messages[1].text.startswith("Chest X-ray. Cardiomegaly")
    assert s1.meta == {}


def test_instruct_multi_turn_keeps_domain(shared_dir):
    (s,) = read_samples(shared_dir / "formats" / "instruct_sample.json")
    assert [m.role for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.num_image_parts == 1 and s.images == ["32432162_F1.jpg"]
    assert s.meta["domain"]["chest_xray"] is True
    assert s.messages[2].text == "What is the modality of this image?"


def test_qa50_sample_question_and_meta(shared_dir):
    samples = list(read_samples(shared_dir / "formats" / "qa50_sample.jsonl"))
    assert len(samples) == 8
    s = samples[0]
    assert s.id == "0" and s.images == ["18063892_F3.jpg"]
    assert len(s.messages) == 1 and s.messages[0].role == "user"
    assert s.messages[0].text == "What is the organ in the image?" and s.messages[0].num_images == 1
    assert s.meta["gpt4_answer"].startswith("The organ in the image is the conjunctiva")
    for key in ("pair_id", "fig_caption", "fig_label", "in_text_mention", "domain", "type", "question_id"):
        assert key in s.meta, key
    assert s.meta["question_id"] == 0 and s.meta["type"] == "conversation"


def test_real_qa50_file(shared_dir):
    samples = list(read_samples(shared_dir / "data" / "llava_med_eval" / "llava_med_eval_qa50_qa.jsonl"))
    assert len(samples) == 193
    types = [s.meta["type"] for s in samples]
    assert types.count("conversation") == 143 and types.count("detailed_description") == 50
    assert len({s.images[0] for s in samples}) == 50
    for s in samples:
        assert s.messages[0].num_images == 1 and "<image>" not in s.messages[0].text
        assert s.messages[0].text.strip() and s.meta["gpt4_answer"].strip()
    assert len({s.id for s in samples}) == 193


def test_vqa_test_file_with_typo_and_answer_type(shared_dir):
    f = shared_dir / "formats" / "vqa_test_sample.json"
    assert resolve_format(f) == "vqa_test"
    samples = list(read_samples(f))
    assert [s.id for s in samples] == ["300648006", "10", "11"]
    assert [s.meta["answer_type"] for s in samples] == ["OPEN", "CLOSED", "OPEN"]
    assert samples[0].meta["question_type"] == "where"
    assert samples[2].messages[1].text == "free air"  # read from the typo key "conversatons"
    assert samples[1].messages[0].text.endswith("[yes, no]")


def test_fig_captions_object_of_lists(shared_dir):
    f = shared_dir / "formats" / "fig_captions_sample.json"
    assert resolve_format(f) == "fig_captions"
    samples = {s.id: s for s in read_samples(f)}
    assert set(samples) == {"18627621_F2", "18063892_F3", "20000000_F1"}
    s = samples["18063892_F3"]
    assert s.images == ["18063892_F3.jpg"] and s.messages[0].num_images == 1
    assert s.messages[1].text.startswith("The gross histopathologic finding")
    assert s.meta["domain_list"] == "histology" and s.meta["fig_label"] == "Fig. 3"
    assert s.meta["mentions"] == ["Inflammatory cells were not found in the vicinity ( Fig. 3 , 4 , 5 ) ."]
    assert samples["20000000_F1"].meta["mentions"] == []


def test_stllava_preferences(shared_dir):
    f = shared_dir / "formats" / "dpo_sample.json"
    assert resolve_format(f) == "stllava_dpo"
    (p,) = read_preferences(f)
    assert p.images == ["18627621_F2.jpg"]
    assert [m.role for m in p.prompt] == ["user"] and p.prompt[0].num_images == 1
    assert p.prompt[0].text == "What is the main finding in the lungs?"
    assert p.chosen[0].text.startswith("There are diffuse bilateral") and p.chosen[0].role == "assistant"
    assert p.rejected[0].text.startswith("The lungs are completely normal")
    with pytest.raises(MedvlmError, match="read_preferences"):
        list(read_samples(f))


def test_image_urls(shared_dir):
    rows = list(read_image_urls(shared_dir / "formats" / "image_urls_sample.jsonl"))
    assert [r.pair_id for r in rows] == ["32432162_F1", "18627621_F2"]
    assert rows[1].image_file_path == "PMC2375125/1471-2407-8-121-2.jpg" and rows[1].line == 2
    assert rows[0].pmc_tar_url.endswith("PMC7236913.tar.gz")


def test_image_urls_bad_row(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_text('{"pmc_tar_url": "u", "image_file_path": "a/b.jpg"}\n', encoding="utf-8")
    with pytest.raises(MedvlmError, match=r"record 0 \(line 1\).*'pair_id'"):
        list(read_image_urls(f))


def test_answer_file_is_not_mistaken_for_data(shared_dir):
    with pytest.raises(MedvlmError, match="model answer file"):
        list(read_samples(shared_dir / "formats" / "vqa_answers_sample.jsonl"))


def test_messages_format_string_and_parts(tmp_path):
    rows = [
        {
            "id": "a",
            "messages": [
                {"role": "user", "content": "<image>\nWhat is shown?"},
                {"role": "assistant", "content": "A CT scan."},
            ],
            "images": ["ct.png"],
            "domain": "ct",
        },
        {
            "id": "b",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Compare"},
                        {"type": "image", "image": "x.png"},
                        {"type": "image_url", "image_url": {"url": "y.png"}},
                    ],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
            ],
        },
    ]
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    a, b = read_samples(f)
    assert a.images == ["ct.png"] and a.messages[0].content[0] == {"type": "image"} and a.meta == {"domain": "ct"}
    assert b.images == ["x.png", "y.png"] and b.messages[1].num_images == 2 and b.messages[0].role == "system"
    bad = tmp_path / "bad.json"
    _write(
        bad,
        [
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                    }
                ]
            }
        ],
    )
    with pytest.raises(MedvlmError, match=r"record 0.*messages\[0\]\.content\[0\].*data: URLs"):
        list(read_samples(bad))


def test_vqa_flat_rows(tmp_path):
    f = tmp_path / "flat.jsonl"
    f.write_text(
        json.dumps(
            {
                "qid": 7,
                "image": "p.jpg",
                "question": "Is it normal?",
                "answer": "no",
                "answer_type": "closed ",
                "modality": "CT",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    (s,) = read_samples(f)
    assert s.id == "7" and s.images == ["p.jpg"]
    assert s.messages[0].content == [{"type": "image"}, {"type": "text", "text": "Is it normal?"}]
    assert s.messages[1].text == "no" and s.meta["answer_type"] == "CLOSED" and s.meta["modality"] == "CT"
    assert "qid" not in s.meta


def test_trl_preferences_three_shapes(tmp_path):
    rows = [
        {"prompt": "<image>\nWhat is it?", "chosen": "A lung.", "rejected": "A femur.", "images": ["i.png"]},
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "good"}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "bad"}]}],
            "images": ["j.png"],
            "score": 3,
        },
        {
            "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}],
        },
    ]
    f = tmp_path / "prefs.json"
    _write(f, rows)
    a, b, c = read_preferences(f)
    assert a.prompt[0].num_images == 1 and a.chosen[0].text == "A lung." and a.rejected[0].text == "A femur."
    assert b.images == ["j.png"] and b.meta == {"score": 3} and b.rejected[0].text == "bad"
    assert [m.text for m in c.prompt] == ["Q?"] and c.chosen[0].text == "yes" and c.rejected[0].text == "no"
    same = tmp_path / "same.json"
    _write(
        same,
        [
            {"chosen": "x", "rejected": "x", "prompt": "q"},
            {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
        ],
    )
    bad: list[str] = []
    assert list(read_preferences(same, skip_bad=True, bad=bad)) == []
    assert len(bad) == 2 and "record 0" in bad[0] and "identical" in bad[0] and "share no prompt" in bad[1]
    with pytest.raises(MedvlmError, match="record 0.*identical"):
        list(read_preferences(same))


@pytest.mark.parametrize(
    "name", ["alignment_sample.json", "instruct_sample.json", "vqa_test_sample.json", "qa50_sample.jsonl"]
)
def test_sample_to_llava_round_trip(shared_dir, tmp_path, name):
    samples = list(read_samples(shared_dir / "formats" / name))
    out = _write(tmp_path / "rt.json", [sample_to_llava(s) for s in samples])
    again = list(
        read_samples(
            out, format=resolve_format(shared_dir / "formats" / name) if name != "qa50_sample.jsonl" else "llava"
        )
    )
    assert [(s.id, s.images, _texts(s)) for s in again] == [(s.id, s.images, _texts(s)) for s in samples]
    if name != "qa50_sample.jsonl":
        assert [s.meta for s in again] == [s.meta for s in samples]


def test_images_first_matches_llava_preprocessing():
    s = Sample(
        id="x",
        messages=[Message.from_text("user", "What is it?\n<image>"), Message.from_text("assistant", "A")],
        images=["a.jpg"],
    )
    t = images_first(s)
    assert t.messages[0].to_text() == "<image>\nWhat is it?" and s.messages[0].to_text() == "What is it?\n<image>"


def test_auto_format_uses_keys_not_file_names(shared_dir, tmp_path):
    # a JSON array saved as .jsonl and a JSONL saved as .json are still read by content
    arr = tmp_path / "really_an_array.jsonl"
    shutil.copy(shared_dir / "formats" / "instruct_sample.json", arr)
    lines = tmp_path / "really_lines.json"
    shutil.copy(shared_dir / "formats" / "qa50_sample.jsonl", lines)
    assert resolve_format(arr) == "llava" and len(list(read_samples(arr))) == 1
    assert resolve_format(lines) == "qa50" and len(list(read_samples(lines))) == 8


def test_explicit_format_is_accepted(shared_dir, tmp_path):
    f = shared_dir / "formats" / "vqa_test_sample.json"
    assert [s.meta.get("answer_type") for s in read_samples(f, format="llava")] == ["OPEN", "CLOSED", "OPEN"]
    flat = _write(
        tmp_path / "q.json", [{"question_id": 1, "text": "Q <image>", "image": "a.jpg", "question": "x", "answer": "y"}]
    )
    assert resolve_format(flat) == "qa50"
    (s,) = read_samples(flat, format="vqa_flat")
    assert s.messages[1].text == "y"
    assert "vqa_flat" in FORMATS and "llava" in FORMATS


def test_undecidable_and_unknown_formats(tmp_path):
    f = _write(tmp_path / "odd.json", [{"foo": 1, "bar": 2}])
    with pytest.raises(MedvlmError, match=r"odd\.json: record 0.*cannot decide the format.*bar, foo"):
        list(read_samples(f))
    with pytest.raises(MedvlmError, match="unknown format 'sharegpt'"):
        list(read_samples(f, format="sharegpt"))
    g = _write(tmp_path / "obj.json", {"a": 1})
    with pytest.raises(MedvlmError, match="obj.json"):
        list(read_samples(g))


def test_wrong_types_name_record_and_field(tmp_path):
    f = _write(
        tmp_path / "t.json",
        [
            {
                "id": "ok",
                "image": "a.jpg",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            },
            {
                "id": "bad",
                "image": "a.jpg",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": 5}],
            },
            {"id": "bad2", "image": 3, "conversations": []},
            {"id": "bad3", "conversations": [{"from": "doctor", "value": "hi"}]},
        ],
    )
    with pytest.raises(
        MedvlmError, match=r"record 1 \(line 1\): conversations\[1\]\.value: expected a string, got int"
    ):
        list(read_samples(f))
    bad: list[str] = []
    assert [s.id for s in read_samples(f, skip_bad=True, bad=bad)] == ["ok"]
    assert len(bad) == 3 and "field 'image'" in bad[1] and "unknown role 'doctor'" in bad[2]


def test_malformed_jsonl_line_number_and_skip_bad(tmp_path):
    good = json.dumps({"image": "a.jpg", "question": "q", "answer": "a"})
    f = tmp_path / "x.jsonl"
    f.write_text(f"{good}\n\n{good}\n{{oops\n{good}\n", encoding="utf-8")
    with pytest.raises(MedvlmError, match=r"x\.jsonl:4: invalid JSON"):
        list(read_samples(f))
    bad: list[str] = []
    assert len(list(read_samples(f, skip_bad=True, bad=bad))) == 3
    assert bad == [f"{f}:4: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]


def test_malformed_json_array_names_record_and_line(tmp_path):
    f = tmp_path / "a.json"
    f.write_text('[\n {"id": 1, "conversations": []},\n {"id": 2, "conversations": [}\n]\n', encoding="utf-8")
    with pytest.raises(MedvlmError, match=r"record 1: invalid JSON at line 3"):
        list(iter_json_array(f))
    g = tmp_path / "trunc.json"
    g.write_text('[{"id": 1}, {"id": 2', encoding="utf-8")
    with pytest.raises(MedvlmError, match="record 1"):
        list(iter_json_array(g))
    h = tmp_path / "nocomma.json"
    h.write_text('[{"id": 1} {"id": 2}]', encoding="utf-8")
    with pytest.raises(MedvlmError, match=r"after record 0: expected ',' or '\]'"):
        list(iter_json_array(h))


def test_700k_line_jsonl_with_bad_lines_skip_bad(tmp_path):
    f = tmp_path / "big.jsonl"
    line = '{"image": "a.jpg", "question": "q?", "answer": "yes"}\n'
    bad_at = {10, 350_000, 699_998}
    with f.open("w", encoding="utf-8") as fh:
        for i in range(700_000):
            fh.write('{"image": "a.jpg", "question": \n' if i in bad_at else line)
    bad: list[str] = []
    n = sum(1 for _ in read_samples(f, skip_bad=True, bad=bad))
    assert n == 700_000 - len(bad_at)
    assert [b.split(":")[1] for b in bad] == [str(i + 1) for i in sorted(bad_at)]


def test_chunk_boundaries_and_byte_offsets(tmp_path):
    records = [{"id": i, "t": "é😀\\\"" * (i % 5), "n": [1.5, None, True], "s": "x" * (i * 7 % 40)} for i in range(60)]
    records.append(123456)  # a bare number as the last element
    text = "[\r\n" + ",\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n]\r\n"
    f = tmp_path / "u.json"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    for chunk in (1, 3, 7, 64, 1 << 20):
        got = list(iter_json_array(f, chunk_chars=chunk))
        assert [r.value for r in got] == records, chunk
    spans = index_json_array(f)
    raw = f.read_bytes()
    for (off, n), rec in zip(spans, records):
        assert json.loads(raw[off : off + n]) == rec
        assert read_record_at(f, off, n) == rec
    assert [r.line for r in iter_json_array(f)][:3] == [2, 3, 4]


def test_lazy_random_access(shared_dir, tmp_path):
    f = shared_dir / "formats" / "alignment_sample.json"
    ds = LazySamples(f)
    assert len(ds) == 2 and ds[1].id == "18627621_F2" and ds.format == "llava"
    assert [s.id for s in read_samples(f)] == [ds[i].id for i in range(len(ds))]
    q = LazySamples(shared_dir / "formats" / "qa50_sample.jsonl")
    assert q[7].messages[0].text == "What imaging technique was used?"
    assert index_jsonl(shared_dir / "formats" / "qa50_sample.jsonl")[0][0] == 0
    rf = RecordFile(f)
    assert rf[-1]["id"] == "18627621_F2"
    with pytest.raises(IndexError):
        rf[2]


def test_streaming_memory_stays_well_below_file_size(tmp_path):
    f = tmp_path / "big.json"
    with f.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        n = 15_000
        for i in range(n):
            rec = {
                "id": f"{i}_F1",
                "image": f"{i}_F1.jpg",
                "conversatons": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": "opacity " * 250},
                ],
            }
            fh.write(json.dumps(rec) + (",\n" if i < n - 1 else "\n"))
        fh.write("]\n")
    size = f.stat().st_size
    assert size > 30_000_000
    tracemalloc.start()
    try:
        count = 0
        for _ in read_samples(f):
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
    spans = index_json_array(f)
    assert len(spans) == n and json.loads(f.read_bytes()[spans[-1][0] : sum(spans[-1])])["id"] == f"{n - 1}_F1"


def test_one_line_files_are_told_apart(shared_dir, tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        )
        + "\n",
        encoding="utf-8",
    )
    assert resolve_format(one) == "trl_preference" and len(list(read_preferences(one))) == 1
    figs = tmp_path / "figs.json"
    figs.write_text(
        json.dumps(json.loads((shared_dir / "formats" / "fig_captions_sample.json").read_text())), encoding="utf-8"
    )
    assert resolve_format(figs) == "fig_captions" and len(list(read_samples(figs))) == 3


def test_bad_arguments_raise_before_iteration(tmp_path):
    with pytest.raises(MedvlmError, match="unknown format"):
        read_samples(tmp_path, format="nope")
    with pytest.raises(MedvlmError, match=r"missing\.json: file not found"):
        read_samples(tmp_path / "missing.json")
    with pytest.raises(MedvlmError, match="not a preference format"):
        read_preferences(tmp_path / "missing.json", format="llava")
    with pytest.raises(MedvlmError, match=r"urls\.jsonl: file not found"):
        read_image_urls(tmp_path / "urls.jsonl")
