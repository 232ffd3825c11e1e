"""Instruction generation (against a real OpenAI-compatible server) and post-processing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medvlm.cli import app as cli_app
from medvlm.data.instruct import (
    GenerateConfig,
    PostprocessConfig,
    build_messages,
    generate_instructions,
    load_prompts,
    parse_turns,
    postprocess_file,
    select_records,
)
from medvlm.data.instruct.postprocess import image_at_start
from medvlm.data.instruct.prompts import render_conversation
from medvlm.data.readers.figures import read_fig_captions
from medvlm.errors import MedvlmError
from medvlm.llm import LLMConfig
from openai_test_server import Fault, last_user_text, openai_server_factory  # noqa: F401  (fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "instruct_gen.jsonl"
DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("MEDVLM_TEST_KEY", "sk-test")


def _case(body) -> str:
    """Fault key: the case id written into each test caption ("Case P3: ...")."""
    m = re.search(r"Case (P\d+)", last_user_text(body))
    return m.group(1) if m else ""


def _reply(body) -> str:
    case = _case(body) or "shared"
    return (
        f"User: What modality is shown in {case}?\nAssistant: This is a CT image of {case}.\n"
        "User: What is the main finding?\nAssistant: A small nodule in the right upper lobe."
    )


def _captions(tmp_path: Path, per_domain: dict[str, int]) -> Path:
    data, n = {}, 0
    for dom, k in per_domain.items():
        items = []
        for _ in range(k):
            items.append(
                {
                    "pair_id": f"P{n}_F1",
                    "fig_label": "Figure 1",
                    "fig_caption": f"Case P{n}: a {dom} image.",
                    "in_text_mention": [f"As shown in Figure 1 , case P{n} ."],
                    "domain": {d: d == dom for d in DOMAINS},
                }
            )
            n += 1
        data[dom] = items
    path = tmp_path / "fig_captions.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _llm(server, **kw) -> LLMConfig:
    base = dict(
        model="gpt-4o",
        base_url=server.base_url,
        api_key_env="MEDVLM_TEST_KEY",
        retries=2,
        backoff_base=0.01,
        timeout=0.5,
        concurrency=3,
        progress=False,
    )
    base.update(kw)
    return LLMConfig(**base)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# ---- prompts ----------------------------------------------------------------------------------


def test_prompt_has_system_few_shot_and_the_figure_context(shared_dir):
    prompts = load_prompts()
    assert {e.domain for e in prompts.examples} == {"chest_xray", "ct_scan", "mri", "histology", "gross"}
    groups = read_fig_captions(shared_dir / "formats" / "fig_captions_sample.json")
    hist = groups["histology"][0]  # in_text_mention holds {"tokens": ...} objects
    msgs = build_messages(hist, prompts, inline_mentions=True)
    assert msgs[0]["role"] == "system" and "User:" in msgs[0]["content"] and "caption" in msgs[0]["content"]
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * len(prompts.examples)
    assert msgs[2]["content"].startswith("User: ") and "\nAssistant: " in msgs[2]["content"]
    assert "Figure Context:\n- " in msgs[1]["content"]  # the examples show mentions too when asked
    assert msgs[-1]["content"] == (
        "Figure Caption:\nFig. 3: " + hist.fig_caption + "\n\nFigure Context:\n"
        "- Inflammatory cells were not found in the vicinity ( Fig. 3 , 4 , 5 ) ."
    )
    plain = build_messages(hist, prompts, inline_mentions=False)
    assert all("Figure Context" not in m["content"] for m in plain)
    no_mentions = build_messages(groups["histology"][1], prompts, inline_mentions=True)  # in_text_mention: null
    assert no_mentions[-1]["content"] == "Figure Caption:\nFigure 1: Hematoxylin and eosin staining of a liver biopsy."
    # the few-shot conversations parse with our own post-processing
    for ex in prompts.examples:
        turns = parse_turns(render_conversation(ex.conversation))
        assert turns == [t for q, a in ex.conversation for t in (("user", q), ("assistant", a))]
        assert len(ex.conversation) >= 3


def test_a_replaced_few_shot_file_is_validated(tmp_path):
    bad = tmp_path / "fs.json"
    bad.write_text(json.dumps({"examples": [{"fig_caption": "x", "conversation": [{"user": "q"}]}]}))
    with pytest.raises(MedvlmError, match=r"examples\[0\]\.conversation\[0\]"):
        load_prompts(bad)
    good = tmp_path / "fs2.json"
    good.write_text(
        json.dumps(
            {
                "system": "Be brief.",
                "examples": [
                    {"fig_label": "Fig. 1", "fig_caption": "A CT.", "conversation": [{"user": "Q?", "assistant": "A."}]}
                ],
            }
        )
    )
    p = load_prompts(good)
    assert p.system == "Be brief." and p.examples[0].conversation == [("Q?", "A.")]


def test_selection_is_round_robin_deduplicated_and_exact(tmp_path):
    groups = read_fig_captions(_captions(tmp_path, {"chest_xray": 3, "mri": 1, "histology": 2}))
    recs, dups = select_records(groups)
    assert [r.pair_id for r in recs] == ["P0_F1", "P3_F1", "P4_F1", "P1_F1", "P5_F1", "P2_F1"] and dups == 0
    assert [r.pair_id for r in select_records(groups, 4)[0]] == ["P0_F1", "P3_F1", "P4_F1", "P1_F1"]
    groups["gross"] = [groups["chest_xray"][0]]
    recs, dups = select_records(groups)
    assert dups == 1 and len(recs) == 6


# ---- generation against the fake server ----------------------------------------------------


def test_generate_with_faults_resume_and_zero_requests_on_rerun(openai_server_factory, tmp_path):
    faults = {
        "P0": [Fault("status", 429, retry_after="1")],
        "P1": [Fault("status", 500)],
        "P2": [Fault("timeout", delay=1.0)],
        "P3": [Fault("malformed")],
        "P4": [Fault("empty")],
        "P5": [Fault("status", 500, repeat=True)],
    }
    server = openai_server_factory(_reply, key_fn=_case, faults_by_key=faults)
    caps = _captions(tmp_path, {"chest_xray": 3, "ct_scan": 3, "histology": 2})
    cfg = GenerateConfig(captions=caps, out=tmp_path / "gen.jsonl", inline_mentions=True)
    rep = generate_instructions(cfg, _llm(server))
    rows = _lines(cfg.out)
    # every sample ends generated or reported
    assert rep.selected == 8 and rep.generated == 7 and [f["pair_id"] for f in rep.failed] == ["P5_F1"]
    assert sorted(r["pair_id"] for r in rows) == [f"P{i}_F1" for i in range(8) if i != 5]
    assert [json.loads(x)["pair_id"] for x in cfg.errors_path().read_text().splitlines()] == ["P5_F1"]
    for i in range(5):
        assert [r.outcome for r in server.requests_for(f"P{i}")][-1] == "ok"
    assert len(server.requests_for("P5")) == 3  # 1 + 2 retries, then reported
    row = next(r for r in rows if r["pair_id"] == "P2_F1")
    assert row["result"] == _reply({"messages": [{"role": "user", "content": "Case P2"}]})
    assert row["fig_caption"] == "Case P2: a chest_xray image." and row["in_text_mention"]  # input kept
    assert row["generation"]["model"] == "gpt-4o" and row["generation"]["usage"]["prompt_tokens"] == 10
    assert (
        "Figure Context:\n- As shown in Figure 1 , case P2 ."
        in server.requests_for("P2")[-1].body["messages"][-1]["content"]
    )

    server.clear_faults()
    server.reset_log()
    rep2 = generate_instructions(cfg, _llm(server))  # resume: only the failed figure is sent
    assert [r.key for r in server.requests] == ["P5"]
    assert rep2.already_done == 7 and rep2.generated == 1 and not rep2.failed
    assert not cfg.errors_path().exists() and len(_lines(cfg.out)) == 8

    server.reset_log()
    rep3 = generate_instructions(cfg, _llm(server))
    assert server.requests == [] and rep3.generated == 0 and rep3.already_done == 8

    cfg.out.unlink()  # even without the output, the cache answers everything
    rep4 = generate_instructions(cfg, _llm(server))
    assert server.requests == [] and rep4.generated == 8 and rep4.from_cache == 8
    assert all(r["generation"]["cached"] for r in _lines(cfg.out))
    assert "8 replies (8 from cache)" in rep4.usage


def test_max_samples_is_exact_and_balanced(openai_server_factory, tmp_path):
    server = openai_server_factory(_reply, key_fn=_case)
    caps = _captions(tmp_path, {"chest_xray": 4, "mri": 4, "ct_scan": 4})
    cfg = GenerateConfig(captions=caps, out=tmp_path / "gen.jsonl", max_samples=5)
    rep = generate_instructions(cfg, _llm(server))
    rows = _lines(cfg.out)
    assert len(rows) == 5 and len(server.requests) == 5 and rep.generated == 5
    assert sorted(r["domain_list"] for r in rows) == ["chest_xray", "chest_xray", "ct_scan", "mri", "mri"]
    cfg.max_samples = 7  # a larger cut later only sends the difference
    server.reset_log()
    generate_instructions(cfg, _llm(server))
    assert len(_lines(cfg.out)) == 7 and len(server.requests) == 2


def test_torn_last_line_is_regenerated_and_other_settings_refused(openai_server_factory, tmp_path, shared_dir):
    server = openai_server_factory(_reply)
    cfg = GenerateConfig(captions=shared_dir / "formats" / "fig_captions_sample.json", out=tmp_path / "gen.jsonl")
    generate_instructions(cfg, _llm(server))
    text = cfg.out.read_text()
    lines = text.splitlines(keepends=True)
    cfg.out.write_text("".join(lines[:2]) + lines[2][:30])  # a write cut short
    server.reset_log()
    rep = generate_instructions(cfg, _llm(server))
    assert rep.generated == 1 and server.requests == [] and rep.dropped_lines
    assert sorted(r["pair_id"] for r in _lines(cfg.out)) == ["18063892_F3", "18627621_F2", "20000000_F1"]
    with pytest.raises(MedvlmError, match="inline_mentions=False"):
        generate_instructions(GenerateConfig(captions=cfg.captions, out=cfg.out, inline_mentions=True), _llm(server))
    with pytest.raises(MedvlmError, match="model='gpt-4o'"):
        generate_instructions(cfg, _llm(server, model="gpt-4o-mini"))


def test_cli_generate_then_postprocess(openai_server_factory, tmp_path, shared_dir):
    server = openai_server_factory(_reply)
    gen, out = tmp_path / "gen.jsonl", tmp_path / "instruct.json"
    runner = CliRunner()
    res = runner.invoke(
        cli_app,
        [
            "instruct",
            "generate",
            "--captions",
            str(shared_dir / "formats" / "fig_captions_sample.json"),
            "--out",
            str(gen),
            "--max-samples",
            "2",
            "--inline-mentions",
            "--llm-model",
            "gpt-4o",
            "--base-url",
            server.base_url,
            "--api-key-env",
            "MEDVLM_TEST_KEY",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "generated 2" in res.output and "cost: $" in res.output
    res = runner.invoke(cli_app, ["instruct", "postprocess", "--in", str(gen), "--out", str(out), "--seed", "3"])
    assert res.exit_code == 0, res.output
    data = {d["id"]: d for d in json.loads(out.read_text())}  # in completion order of the generation
    assert sorted(data) == ["18063892_F3", "18627621_F2"]  # round-robin: first chest_xray, first histology
    assert data["18627621_F2"]["image"] == "18627621_F2.jpg" and data["18627621_F2"]["domain"]["chest_xray"] is True
    assert data["18063892_F3"]["conversations"][1]["value"] == "This is a CT image of shared."
    assert all(sum("<image>" in t["value"] for t in d["conversations"]) == 1 for d in data.values())


def test_cli_generate_reports_failures_with_exit_code_1(openai_server_factory, tmp_path, shared_dir):
    server = openai_server_factory(_reply, faults_by_index={0: Fault("status", 500)})
    server.add_fault(Fault("status", 503), index=1)
    res = CliRunner().invoke(
        cli_app,
        [
            "instruct",
            "generate",
            "--captions",
            str(shared_dir / "formats" / "fig_captions_sample.json"),
            "--out",
            str(tmp_path / "gen.jsonl"),
            "--base-url",
            server.base_url,
            "--api-key-env",
            "MEDVLM_TEST_KEY",
            "--retries",
            "0",
            "--concurrency",
            "1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 1
    assert "2 figures failed" in res.output and "rerun the same command" in res.output
    assert len(_lines(tmp_path / "gen.jsonl")) == 1


# ---- post-processing ---------------------------------------------------------------------------


def test_postprocess_fixture_drop_counts_casing_and_image_placeholder(tmp_path):
    out = tmp_path / "instruct.json"
    rep = postprocess_file(PostprocessConfig(inp=FIXTURE, out=out, seed=0))
    # Hand-derived from tests/fixtures/instruct_gen.jsonl, line by line:
    # 1 A_1: numbered **User:**/**Assistant** turns, 3 pairs kept after stripping "According to the caption, ",
    #        ", as mentioned in the description," and "based on the provided information, ";
    # 2 B_1: pair 1 "Sorry, I cannot see the image" (no_image_access), pair 2 kept, pair 3 "The caption states"
    #        (mentions_caption);  3 C_1: no turns (parse_error);  4: not JSON (bad_line);
    # 5 D_1: "Without access ..." and "not mentioned in the caption" (2 x no_image_access) -> no_pairs_left;
    # 6 A_1 again (duplicate_id);  7 E_1: no result (missing_result);
    # 8 F_1: preamble and "---" ignored, 2 pairs kept, "User 2" has an empty answer (empty_turn), the last
    #        question "User 4" has none (unpaired_turn).
    assert dict(rep.pair_drops) == {"no_image_access": 3, "mentions_caption": 1, "unpaired_turn": 1, "empty_turn": 1}
    assert dict(rep.sample_drops) == {
        "parse_error": 1,
        "bad_line": 1,
        "no_pairs_left": 1,
        "duplicate_id": 1,
        "missing_result": 1,
    }
    assert (rep.samples_read, rep.samples_written, rep.pairs_kept) == (8, 3, 6)
    assert ":4:" in rep.problems[1] and "C_1" in rep.problems[0]  # reported in file order, naming the line
    data = {d["id"]: d for d in json.loads(out.read_text())}
    assert list(data) == ["A_1", "B_1", "F_1"]

    def strip(v: str) -> str:
        return v.replace("<image>", "").strip()

    a = [strip(t["value"]) for t in data["A_1"]["conversations"]]
    assert a == [
        "What imaging modality is used here?",
        "This is an axial CT scan of the chest.",
        "What is seen in the right lung?",
        "A cavitating MRSA pneumonia lesion is visible in the right upper lobe with an air-fluid level.",
        "Is there pleural fluid?",
        "A small right pleural effusion is present.",
    ]
    # the first pair of B_1 was dropped: the placeholder moved to the new first question
    b = data["B_1"]["conversations"]
    assert strip(b[0]["value"]) == "Which stain was used?" and "<image>" in b[0]["value"] and len(b) == 2
    f = [strip(t["value"]) for t in data["F_1"]["conversations"]]
    assert f == [
        "Can you give a detailed description of the image?",
        "This T2-weighted MRI shows a hyperintense lesion in the left temporal lobe.\nIt is surrounded by oedema.",
        "How should this be read?",
        "In the context of seizures, a temporal lobe lesion like this is often evaluated further with "
        "contrast-enhanced MRI.",
    ]
    for d in data.values():
        conv = d["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum(t["value"].count("<image>") for t in conv) == 1
        first = conv[0]["value"]
        expected = first.startswith("<image>\n") if image_at_start(0, d["id"]) else first.endswith("\n<image>")
        assert expected, first
        assert d["image"] == f"{d['id']}.jpg" and isinstance(d["domain"], dict)
    assert data["B_1"]["domain"]["histology"] is True


def test_image_placement_is_seeded_and_varies(tmp_path):
    outs = []
    for seed in range(12):
        out = tmp_path / f"o{seed}.json"
        postprocess_file(PostprocessConfig(inp=FIXTURE, out=out, seed=seed))
        outs.append(json.loads(out.read_text()))
    firsts = [o[0]["conversations"][0]["value"] for o in outs]
    assert any(v.startswith("<image>\n") for v in firsts) and any(v.endswith("\n<image>") for v in firsts)
    again = tmp_path / "again.json"
    postprocess_file(PostprocessConfig(inp=FIXTURE, out=again, seed=5))
    assert json.loads(again.read_text()) == outs[5]


def test_postprocess_real_image_extension_and_bad_inputs(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "A_1.png").write_bytes(b"png")
    (images / "F_1.jpeg").write_bytes(b"jpeg")
    out = tmp_path / "o.json"
    rep = postprocess_file(PostprocessConfig(inp=FIXTURE, out=out, image_folder=images))
    assert [(d["id"], d["image"]) for d in json.loads(out.read_text())] == [("A_1", "A_1.png"), ("F_1", "F_1.jpeg")]
    assert rep.sample_drops["image_not_found"] == 1
    with pytest.raises(MedvlmError, match="overwrite the input"):
        postprocess_file(PostprocessConfig(inp=FIXTURE, out=FIXTURE))
    with pytest.raises(MedvlmError, match="file not found"):
        postprocess_file(PostprocessConfig(inp=tmp_path / "missing.jsonl", out=out))


def test_turn_parsing_tolerates_formatting():
    text = (
        "Sure! Here it is.\n\n**User:** What is it?\n**Assistant:** A CT.\n\n2) user : Where?\n"
        "- **Assistant**: In the LEFT lung.\nIt is small.\n### User 3: Size?\n  Assistant 3:   2 cm."
    )
    assert parse_turns(text) == [
        ("user", "What is it?"),
        ("assistant", "A CT."),
        ("user", "Where?"),
        ("assistant", "In the LEFT lung.\nIt is small."),
        ("user", "Size?"),
        ("assistant", "2 cm."),
    ]
