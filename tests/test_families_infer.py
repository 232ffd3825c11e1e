"""The one inference engine on transformers model families: greedy answers equal plain ``model.generate``,
batched (left padding, different lengths and images) equals one at a time, and eval/serve take a family checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from family_helpers import FAMILY_NAMES, images, msgs, tiny
from medvlm.data.schema import Sample
from medvlm.errors import MedvlmError
from medvlm.infer.decoding import GenerationSettings
from medvlm.infer.engine import InferenceEngine

MAX_NEW = 8


def prompts() -> list[tuple[Sample, list]]:
    """Prompts of different lengths: two images, one image, text only, a system prompt, a follow-up turn."""
    a, b = images()
    return [
        (Sample("p0", msgs(("user", "<image>\nIs there a mass?")), images=["a"]), [a]),
        (
            Sample(
                "p1",
                msgs(
                    ("system", "Answer briefly."),
                    ("user", "Compare <image> with <image> please, which one shows the larger organ?"),
                ),
                images=["a", "b"],
            ),
            [a, b],
        ),
        (Sample("p2", msgs(("user", "What is a lung?"))), []),
        (
            Sample(
                "p3",
                msgs(("user", "<image>\nWhat organ?"), ("assistant", "The liver."), ("user", "Sure?")),
                images=["b"],
            ),
            [b],
        ),
    ]


def hf_greedy(model, processor, sample: Sample, imgs: list) -> list[int]:
    """Plain transformers ``generate`` on the processor-built inputs (batch of one), new tokens without the stop."""
    feats = processor.encode(sample, add_generation_prompt=True, images=imgs)
    inputs = {
        k: (v[None] if k in ("input_ids", "attention_mask", *processor.spec.token_tensors) else v)
        for k, v in feats.items()
    }
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=processor.pad_token_id,
            suppress_tokens=sorted(processor.marker_ids),
        )
    new = out[0, feats["input_ids"].shape[0] :].tolist()
    return [t for t in new if t not in processor.stop_token_ids and t != processor.pad_token_id]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_engine_greedy_equals_generate_and_batched_equals_single(family):
    model, processor = tiny(family)
    model.eval()
    engine = InferenceEngine(model, processor, batch_size=4)
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    ps = prompts()
    samples, imgs = [s for s, _ in ps], [i for _, i in ps]
    batched = engine.generate(samples, settings, images=imgs)
    single = [engine.generate([s], settings, images=[i])[0] for s, i in ps]
    assert batched == single
    expected = [processor.decode(hf_greedy(model, processor, s, i)).strip() for s, i in ps]
    assert batched == expected
    assert any(a for a in batched)  # a random tiny model still says something


def test_more_images_than_placeholders_is_refused_before_work():
    model, processor = tiny("qwen2_5_vl")
    engine = InferenceEngine(model, processor)
    a, b = images()
    sample = Sample("x", msgs(("user", "<image>\nWhat?")), images=["a"])
    with pytest.raises(MedvlmError, match="1 image part"):
        engine.generate([sample], GenerationSettings(max_new_tokens=2), images=[[a, b]])


def test_family_model_needs_its_family_processor():
    model, _ = tiny("gemma3")
    _, other = tiny("idefics3")
    with pytest.raises(MedvlmError, match="needs its family's processor"):
        InferenceEngine(model, other)


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    from medvlm.model.families.tiny import init_tiny_family

    return init_tiny_family("tiny-qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen")


def test_load_for_inference_picks_the_family_by_model_type(qwen_ckpt, tmp_path):
    from medvlm.infer.loading import load_for_inference

    model, processor = load_for_inference(qwen_ckpt)
    assert model.config.model_type == "qwen2_5_vl" and processor.spec.name == "qwen2_5_vl"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "mllama"}))
    with pytest.raises(MedvlmError, match="qwen2_5_vl"):
        load_for_inference(bad)


def test_eval_vqa_cli_with_a_family_checkpoint_batched_equals_one_at_a_time(qwen_ckpt, tmp_path):
    from medvlm.cli import main
    from medvlm.data.synth import generate_synth

    data = tmp_path / "synth"
    generate_synth(data, n_images=10, seed=3, image_size=64, qa50_images=0)
    outs = {}
    for bs in ("1", "8"):
        out = tmp_path / f"bs{bs}" / "answers.jsonl"
        with pytest.raises(SystemExit) as exit_info:
            main(
                [
                    "eval",
                    "vqa",
                    "--model",
                    str(qwen_ckpt),
                    "--questions",
                    str(data / "vqa" / "test.json"),
                    "--image-folder",
                    str(data / "images"),
                    "--out",
                    str(out),
                    "--batch-size",
                    bs,
                    "--max-new-tokens",
                    "4",
                ]
            )
        assert exit_info.value.code in (0, None)
        outs[bs] = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outs["1"]) == len(json.loads((data / "vqa" / "test.json").read_text())) > 1
    assert outs["1"] == outs["8"]
    assert all(r["model_id"] == "qwen" for r in outs["1"])


def test_serve_api_answers_the_openai_client_with_an_image(qwen_ckpt, shared_dir):
    import openai

    from medvlm.data.images import load_image
    from medvlm.serve.api import ApiConfig, create_app, load_engine
    from medvlm.serve.batching import BatcherConfig
    from medvlm.serve.server import BackgroundServer
    from serve_helpers import data_url

    engine = load_engine(str(qwen_ckpt))
    image = shared_dir / "images" / "synpic42202.jpg"
    question = "Is there evidence of an aortic aneurysm?"
    expected = engine.generate(
        [Sample("x", msgs(("user", "<image>\n" + question)), images=["i"])],
        GenerationSettings(max_new_tokens=8),
        images=[[load_image(image)]],
    )[0]
    config = ApiConfig(
        model_name="tiny-qwen", api_key="k-123", max_images=2, batcher=BatcherConfig(max_batch=4, max_wait_ms=20)
    )
    with BackgroundServer(create_app(engine, config)) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k-123", max_retries=0, timeout=60)
        content = [
            {"type": "image_url", "image_url": {"url": data_url(image.read_bytes(), "image/jpeg")}},
            {"type": "text", "text": question},
        ]
        r = client.chat.completions.create(
            model="tiny-qwen", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content == expected and expected
        chunks = list(
            client.chat.completions.create(
                model="tiny-qwen", max_tokens=8, stream=True, messages=[{"role": "user", "content": content}]
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_chat_cli_with_a_family_checkpoint_says_what_plain_transformers_generates(qwen_ckpt, shared_dir, capsys):
    import transformers

    from medvlm.cli import main
    from medvlm.data.images import load_image
    from medvlm.model.families.io import load_family_processor

    image = shared_dir / "images" / "synpic42202.jpg"
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "chat",
                "--model",
                str(qwen_ckpt),
                "--image",
                str(image),
                "--prompt",
                "<image>\nWhat organ?",
                "--max-new-tokens",
                str(MAX_NEW),
            ]
        )
    assert exit_info.value.code in (0, None)
    said = capsys.readouterr().out.strip()
    # Plain transformers on the saved folder (its own class and processor), greedy.
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        str(qwen_ckpt), use_safetensors=True, trust_remote_code=False
    ).eval()
    processor = load_family_processor(qwen_ckpt)
    sample = Sample("c", msgs(("user", "<image>\nWhat organ?")), images=["i"])
    assert said == processor.decode(hf_greedy(model, processor, sample, [load_image(image)])).strip() and said
