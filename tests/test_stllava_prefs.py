"""``medvlm prefs generate`` end to end.

A tiny v1_sq model asks and answers, a local OpenAI-compatible judge prefers.
"""

from __future__ import annotations

import json
import re

import pytest

from medvlm.data.readers import read_preferences
from medvlm.errors import MedvlmError
from medvlm.infer.prefs import PrefsConfig, decide, generate_preferences
from medvlm.llm import LLMConfig
from medvlm.llm.judge import RETRY_PROMPT
from medvlm.model.build import build_preset
from openai_test_server import last_user_text, openai_server_factory  # noqa: F401  (fixture)
from train_helpers import make_demo

_ANS = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]", re.S)


def answers_of(body) -> tuple[str, str]:
    """The two answers the judge was shown (from the first user message)."""
    user = next(m for m in body["messages"] if m["role"] == "user")
    text = "\n".join(p["text"] for p in user["content"] if p.get("type") == "text")
    found = dict(_ANS.findall(text))
    return found["1"], found["2"]


def prefer_longer(body) -> str:
    a, b = answers_of(body)
    s1, s2 = (9, 2) if len(a) > len(b) else (2, 9) if len(b) > len(a) else (5, 5)
    return f"{s1} {s2}\nAssistant {1 if s1 > s2 else 2} describes the image more fully."


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("stllava_prefs")
    demo = make_demo(root, n_images=10)
    model, proc = build_preset("tiny", seed=1, template="v1_sq", projector="cluster")
    return demo, model, proc


def _run(env, out, server, *, ties="drop", limit=2, cache=None, **kw):
    demo, model, proc = env
    cfg = PrefsConfig(
        model=out.parent,
        images=demo / "images",
        out=out,
        questions_per_image=2,
        ties=ties,
        limit=limit,
        description_tokens=6,
        question_tokens=6,
        answer_tokens=6,
        **kw,
    )
    llm = LLMConfig(
        model="judge-4o",
        base_url=server.base_url,
        api_key_env="",
        retries=0,
        backoff_base=0.0,
        progress=False,
        cache_path=cache,
    )
    return generate_preferences(cfg, llm, model=model, processor=proc)


def test_generate_end_to_end_both_formats_and_resume(env, tmp_path, openai_server_factory):  # noqa: F811
    server = openai_server_factory(prefer_longer)
    out = tmp_path / "prefs.json"
    rep = _run(env, out, server)
    assert rep.images == 2 and rep.done == 2 and not rep.failed
    st = json.loads(out.read_text())
    trl = [json.loads(x) for x in (tmp_path / "prefs.trl.jsonl").read_text().splitlines()]
    assert rep.pairs == len(st) == len(trl) > 0
    assert len(server.requests) == rep.pairs + rep.ties_dropped
    for s, t in zip(st, trl):
        assert s["id"] == t["id"] and s["image"] == t["images"][0]
        chosen, rejected = s["chosen_conversations"][1]["value"], s["reject_conversations"][1]["value"]
        assert len(chosen) > len(rejected)  # the judge's preference decided the pair
        assert s["judge"]["scores"] == {"chosen": 9.0, "rejected": 2.0} and "more fully" in s["judge"]["reason"]
        assert s["chosen_conversations"][0]["value"] == "<image>\n" + s["question"]
        assert t["chosen"][0]["content"][0]["text"] == chosen and t["rejected"][0]["content"][0]["text"] == rejected
    # The judge saw the image itself as a data URL, with our medical-expert, order-blind prompt.
    body = server.requests[0].body
    parts = body["messages"][1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "arbitrary order" in parts[1]["text"] and "physician" in body["messages"][0]["content"]
    # Both files read back as the same preference pairs.
    a, b = list(read_preferences(out)), list(read_preferences(tmp_path / "prefs.trl.jsonl"))
    assert [(p.prompt[0].text, p.chosen[0].text, p.rejected[0].text, p.images) for p in a] == [
        (p.prompt[0].text, p.chosen[0].text, p.rejected[0].text, p.images) for p in b
    ]
    assert a[0].prompt[0].num_images == b[0].prompt[0].num_images == 1
    # Resume: everything finished, so a rerun makes no request and rewrites the same files.
    before, n = out.read_bytes(), len(server.requests)
    rep2 = _run(env, out, server)
    assert len(server.requests) == n and rep2.resumed == 2 and rep2.done == 0
    assert out.read_bytes() == before
    # A larger --limit only processes the new image.
    rep3 = _run(env, out, server, limit=3)
    assert rep3.resumed == 2 and rep3.done == 1


def test_default_judge_cache_sits_beside_each_output(env, tmp_path, openai_server_factory):  # noqa: F811
    server = openai_server_factory(prefer_longer)
    demo, model, proc = env
    llm = LLMConfig(model="judge-4o", base_url=server.base_url, api_key_env="", retries=0, progress=False)
    for name in ("a", "b"):
        cfg = PrefsConfig(
            model=tmp_path,
            images=demo / "images",
            out=tmp_path / name / "prefs.json",
            limit=1,
            questions_per_image=2,
            description_tokens=6,
            question_tokens=6,
            answer_tokens=6,
        )
        generate_preferences(cfg, llm, model=model, processor=proc)
        assert cfg.default_cache_path().is_file()
    # The caller's config is not changed, so the second output got its own cache, not the first one's.
    assert llm.cache_path is None


def test_tie_policies(env, tmp_path, openai_server_factory):  # noqa: F811
    server = openai_server_factory(lambda body: "6 6\nBoth answers are equally good.")
    cache = tmp_path / "judge.sqlite"
    drop = _run(env, tmp_path / "drop.json", server, cache=cache)
    assert drop.pairs == 0 and drop.ties_dropped > 0 and not drop.failed
    n = len(server.requests)
    second = _run(env, tmp_path / "second.json", server, ties="second", cache=cache)
    assert len(server.requests) == n  # same judge requests: answered by the cache
    assert second.pairs == drop.ties_dropped
    for rec in json.loads((tmp_path / "second.json").read_text()):
        assert rec["judge"]["chosen_index"] == 1  # the published rule: a tie goes to the second answer
    assert decide((3.0, 7.0), "drop") == 1 and decide((7.0, 3.0), "second") == 0 and decide((4.0, 4.0), "drop") is None


def test_unreadable_judge_replies_are_retried_then_reported(env, tmp_path, openai_server_factory):  # noqa: F811
    def first_unreadable(body):
        return prefer_longer(body) if last_user_text(body) == RETRY_PROMPT else "Both answers have merits."

    server = openai_server_factory(first_unreadable)
    rep = _run(env, tmp_path / "retry.json", server, limit=1)
    assert not rep.failed and rep.parse_retries > 0 and rep.pairs + rep.ties_dropped == rep.parse_retries

    broken = openai_server_factory(lambda body: "I would rather not score these.")
    out = tmp_path / "broken.json"
    rep = _run(env, out, broken, limit=1, parse_retries=1)
    assert rep.done == 0 and len(rep.failed) == 1 and "unreadable judge scores" in rep.failed[0]
    assert json.loads(out.read_text()) == []  # nothing half-written for the failed image
    progress = [json.loads(x) for x in (tmp_path / "broken.json.progress.jsonl").read_text().splitlines()]
    assert progress[-1]["status"] == "failed"
    fixed = openai_server_factory(prefer_longer)
    rep = _run(env, out, fixed, limit=1)  # the rerun retries exactly the failed image
    assert rep.done == 1 and not rep.failed and rep.pairs > 0


def test_bad_settings_and_models_are_refused(env, tmp_path, openai_server_factory):  # noqa: F811
    server = openai_server_factory(prefer_longer)
    with pytest.raises(MedvlmError, match="ties"):
        _run(env, tmp_path / "x.json", server, ties="first")
    demo, _, _ = env
    model, proc = build_preset("tiny")  # vicuna_v1: no VUSER role
    cfg = PrefsConfig(model=tmp_path, images=demo / "images", out=tmp_path / "y.json", limit=1)
    with pytest.raises(MedvlmError, match="VUSER"):
        generate_preferences(cfg, LLMConfig(base_url=server.base_url, api_key_env=""), model=model, processor=proc)


def test_cli_reports_bad_options(env, tmp_path):
    from medvlm.cli import main

    demo, _, _ = env
    with pytest.raises(SystemExit) as e:
        main(
            [
                "prefs",
                "generate",
                "--model",
                str(tmp_path),
                "--image-folder",
                str(demo / "images"),
                "--out",
                str(tmp_path / "p.json"),
                "--ties",
                "first",
            ]
        )
    assert e.value.code == 2


def test_test_time_self_questioning_dialogue(env):
    from medvlm.data.schema import Message, Sample, image_part, text_part
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.infer.self_question import SelfQuestioningAnswerer

    demo, model, proc = env
    recs = json.loads((demo / "vqa" / "test.json").read_text())[:2]
    samples = [
        Sample(
            str(r["id"]),
            [Message("user", [image_part(), text_part(r["conversations"][0]["value"].replace("<image>", "").strip())])],
            [r["image"]],
        )
        for r in recs
    ]
    answerer = SelfQuestioningAnswerer(InferenceEngine(model, proc), k=2, aux_tokens=6)
    settings = GenerationSettings(max_new_tokens=6)
    answers = answerer.generate(samples, settings, image_folder=demo / "images")
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    d = answerer.dialogues[0]
    assert [m.role for m in d] == ["user", "assistant", "vuser", "assistant", "vuser", "assistant"]
    assert d[0].num_images == 1 and sum(m.num_images for m in d) == 1
    # The final answer is the engine's answer to the real question asked after that dialogue.
    final = Sample("x", d + [Message("user", [text_part(samples[0].messages[0].text)])], samples[0].images)
    assert InferenceEngine(model, proc).generate([final], settings, image_folder=demo / "images")[0] == answers[0]
    with pytest.raises(MedvlmError, match="VUSER"):
        SelfQuestioningAnswerer(InferenceEngine(*build_preset("tiny")), k=1)
