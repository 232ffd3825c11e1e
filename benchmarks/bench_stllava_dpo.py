"""Demonstration of STLLaVA-Med's self-training loop on the synthetic dataset, end to end on CPU.

1. ``stage: sq``: the tiny preset (cluster projector, ``v1_sq`` template) is trained on the synthetic
   ``instruct.json`` + ``vqa/train.json`` with VUSER conversion and ViT-LoRA.
2. Preference pairs. The judge is **a local fake OpenAI-compatible server that knows the gold answers
   of the synthetic images** (it recognises the image from the data URL's bytes and the question by
   word overlap with the image's known questions, and scores each answer against the pixel-determined
   gold answer; unrecognised questions and equal scores are ties, dropped). No real LLM is involved.
   a. ``generate_preferences`` (what ``medvlm prefs generate`` runs) on ``--self-asked-images`` training
      images: the model describes, asks its own questions, answers twice; reported as is.
   b. The pairs DPO trains on: the same answer sampling (two seeds, temperature 1.2, top-k 100,
      top-p 0.95) and the same judge prompt, client and tie rule, but the *questions* are the VQA
      train questions of the pool images: a tiny random-init LM trained for minutes on 2 CPU cores does
      not ask questions fluent enough for the gold judge to recognise (step a shows how many it does).
3. ``stage: dpo`` with stored reference log-probs.
4. Reward accuracy of the DPO model against the stage-1 reference over all pairs, and ``llava-med``
   closed/open accuracy on ``vqa/test.json`` before and after DPO (greedy, same settings).

    .venv/bin/python benchmarks/bench_stllava_dpo.py [--images 100] [--sq-epochs 20] [--pref-images 40]
        [--self-asked-images 8] [--dpo-epochs 5] [--dpo-lr 2e-3] [--dpo-visual-lr 5e-4] [--out DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reusable fake OpenAI-compatible server

_ANS = re.compile(r"\[Assistant (\d)\]\n(.*?)\n\[End of Assistant \1\]", re.S)
_Q = re.compile(r"\[Question about the image\]\n(.*?)\n\n\[Assistant 1\]", re.S)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class GoldJudge:
    """Scores answers against the synthetic gold: image by content hash, question by word overlap."""

    def __init__(self, demo: Path):
        self.by_hash: dict[str, str] = {}
        for p in (demo / "images").iterdir():
            self.by_hash[hashlib.sha256(p.read_bytes()).hexdigest()] = p.name
        self.qa: dict[str, list[tuple[str, str]]] = {}
        for rec in json.loads((demo / "instruct.json").read_text()) + json.loads((demo / "vqa" / "train.json").read_text()):
            turns = rec["conversations"]
            for q, a in zip(turns[::2], turns[1::2]):
                self.qa.setdefault(rec["image"], []).append((q["value"].replace("<image>", "").strip(), a["value"]))
        self.asked = self.recognised = 0

    def gold(self, image: str, question: str) -> str | None:
        qw = words(question)
        best, score = None, 0.0
        for q, a in self.qa.get(image, []):
            w = words(q)
            j = len(qw & w) / max(1, len(qw | w))
            if j > score:
                best, score = a, j
        return best if score >= 0.6 else None

    def __call__(self, body) -> str:
        user = next(m for m in body["messages"] if m["role"] == "user")
        url = next(p["image_url"]["url"] for p in user["content"] if p.get("type") == "image_url")
        text = "\n".join(p["text"] for p in user["content"] if p.get("type") == "text")
        image = self.by_hash.get(hashlib.sha256(base64.b64decode(url.split(",", 1)[1])).hexdigest())
        question = _Q.search(text).group(1)
        answers = dict(_ANS.findall(text))
        self.asked += 1
        gold = self.gold(image, question) if image else None
        if gold is None:
            return "5 5\nI cannot verify this question against the image."
        self.recognised += 1
        g = words(gold)
        scores = [1 + round(9 * len(g & words(answers[k])) / max(1, len(g))) for k in ("1", "2")]
        if gold.lower() in ("yes", "no"):  # closed: the first word decides
            scores = [9 if (answers[k].strip().lower().split() or [""])[0].strip(".,") == gold.lower() else 2
                      for k in ("1", "2")]
        return f"{scores[0]} {scores[1]}\nThe gold answer for this image is: {gold}."


def vqa_scores(model_dir: Path, demo: Path, out: Path) -> dict:
    from medvlm.eval.protocols import score_files
    from medvlm.eval.vqa import run_vqa
    from medvlm.infer.engine import GenerationSettings

    answers = out / "answers.jsonl"
    run_vqa(model_dir, demo / "vqa" / "test.json", answers, image_folder=demo / "images",
            settings=GenerationSettings(max_new_tokens=24), batch_size=16, progress=False)
    res = score_files(demo / "vqa" / "test.json", answers, "llava-med")
    return res


def pick(res: dict, key: str):
    """A metric from a scores.json object, wherever the protocol put it."""
    if key in res:
        return res[key]
    for v in res.values():
        if isinstance(v, dict) and key in v:
            return v[key]
    return None


def reward_accuracy(policy_dir: Path, ref_dir: Path, prefs: Path, images: Path, beta: float) -> float:
    from medvlm.model.build import load_pretrained
    from medvlm.train.dpo import build_preference_dataset
    from medvlm.train.dpo_ref import compute_ref_logps

    policy, proc = load_pretrained(policy_dir)
    ref, _ = load_pretrained(ref_dir)
    ds, _ = build_preference_dataset([str(prefs)], proc, str(images), 512)
    pi, rf = compute_ref_logps(policy, ds, batch_size=8), compute_ref_logps(ref, ds, batch_size=8)
    wins = [beta * (pi[k][0] - rf[k][0]) > beta * (pi[k][1] - rf[k][1]) for k in pi]
    return sum(wins) / len(wins)


def gold_question_pairs(sq_dir: Path, demo: Path, pool: Path, out: Path, llm) -> tuple[int, dict]:
    """Pairs on the VQA train questions of the pool images: two sampled answers each, judged; STLLaVA-Med format."""
    from medvlm.data.schema import Message, Sample, image_part, text_part
    from medvlm.infer.engine import GenerationSettings, InferenceEngine
    from medvlm.infer.prefs import JudgeJob, decide, judge_jobs, pair_records
    from medvlm.infer.prefs_judge import image_data_url, judge_messages
    from medvlm.llm import LLMClient
    from medvlm.model.build import load_pretrained
    from medvlm.utils.io import write_json_atomic

    model, proc = load_pretrained(sq_dir)
    engine = InferenceEngine(model, proc, batch_size=16)
    names = {p.name for p in pool.iterdir()}
    recs = [r for r in json.loads((demo / "vqa" / "train.json").read_text()) if r["image"] in names]
    qs = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in recs]
    prompts = [Sample(str(r["id"]), [Message("user", [image_part(), text_part(q)])], [r["image"]]) for r, q in zip(recs, qs)]
    answers = [engine.generate(prompts, GenerationSettings(max_new_tokens=16, temperature=1.2, top_k=100, top_p=0.95,
                                                          seed=seed), image_folder=pool) for seed in (1, 2)]
    jobs, cands = [], []
    for i, (r, q) in enumerate(zip(recs, qs)):
        a1, a2 = answers[0][i], answers[1][i]
        cands.append({"question": q, "answers": [a1, a2]})
        if a1 != a2:
            jobs.append(JudgeJob(r["image"], i, judge_messages(image_data_url(pool / r["image"]), q, a1, a2)))
    with LLMClient(llm) as client:
        judge_jobs(client, jobs, 2)
    records, ties = [], 0
    for j in jobs:
        chosen = decide(j.scores, "drop") if j.scores else None
        if chosen is None:
            ties += 1
            continue
        records.append(pair_records(j.rel, j.index, cands[j.index], "", j, chosen, llm.model)[0])
    write_json_atomic(out, records)
    return len(records), {"questions": len(recs), "identical": len(recs) - len(jobs), "ties": ties}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--sq-epochs", type=float, default=20.0)
    ap.add_argument("--pref-images", type=int, default=40)
    ap.add_argument("--dpo-epochs", type=float, default=5.0)
    ap.add_argument("--dpo-lr", type=float, default=2e-3)
    ap.add_argument("--dpo-visual-lr", type=float, default=5e-4, help="projector and ViT-LoRA learning rate in DPO")
    ap.add_argument("--self-asked-images", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from openai_test_server import FakeOpenAIServer

    from medvlm.data.synth import generate_synth
    from medvlm.infer.prefs import PrefsConfig, generate_preferences, summary
    from medvlm.llm import LLMConfig
    from medvlm.train.config import load_config
    from medvlm.train.run import run_training

    root = args.out or Path(tempfile.mkdtemp(prefix="bench_stllava_"))
    root.mkdir(parents=True, exist_ok=True)
    demo = root / "demo"
    if not demo.exists():
        generate_synth(demo, n_images=args.images, seed=0, image_size=64)
    t0 = time.time()
    common = dict(image_folder=str(demo / "images"), report_to=[], save_strategy="no", disable_tqdm=True,
                  max_length=512, logging_steps=10, warmup_ratio=0.03, lr_scheduler_type="cosine")
    sq_dir = root / "sq"
    if not (sq_dir / "model.safetensors").is_file():
        run_training(load_config(None, dict(
            stage="sq", preset="tiny", projector_type="cluster", model_kwargs={"template": "v1_sq", "image_aspect": "pad"},
            data_path=[{"path": str(demo / "instruct.json"), "weight": 1.0},
                       {"path": str(demo / "vqa" / "train.json"), "weight": 2.0}], output_dir=str(sq_dir),
            # The tiny preset's LM is random: LoRA cannot teach it a language in minutes, so stage 1 trains it fully
            # (with ViT-LoRA and the projector as in the recipe); DPO below uses LM-LoRA as the paper does.
            tune="full", vit_lora_r=8, vit_lora_alpha=16, learning_rate=2e-3, projector_lr=1e-3, vision_lr=1e-3,
            num_train_epochs=args.sq_epochs, per_device_train_batch_size=8, **common)))
    t_sq = time.time() - t0

    # Unlabeled pool: training images only (test images stay unseen until evaluation).
    pool = root / "pool"
    if not pool.exists():
        pool.mkdir()
        train_images = sorted({r["image"] for r in json.loads((demo / "vqa" / "train.json").read_text())})
        for name in train_images[: args.pref_images]:
            shutil.copy(demo / "images" / name, pool / name)
    judge = GoldJudge(demo)
    t1 = time.time()
    with FakeOpenAIServer(judge) as server:
        llm = LLMConfig(model="gold-judge", base_url=server.base_url, api_key_env="", progress=False)
        self_asked = root / "self_asked_prefs.json"
        rep = generate_preferences(
            PrefsConfig(model=sq_dir, images=pool, out=self_asked, questions_per_image=5, limit=args.self_asked_images,
                        description_tokens=48, question_tokens=24, answer_tokens=24), llm)
        print(summary(rep))
        recognised_self = judge.recognised
        pairs, pair_stats = gold_question_pairs(sq_dir, demo, pool, root / "prefs.json", llm)
    t_prefs = time.time() - t1

    t2 = time.time()
    dpo_dir = root / "dpo"
    dpo = run_training(load_config(None, dict(
        stage="dpo", model_name_or_path=str(sq_dir), data_path=str(root / "prefs.json"), output_dir=str(dpo_dir),
        image_folder=str(pool), tune="lora", lora_r=16, lora_alpha=32, vit_lora_r=8, vit_lora_alpha=16,
        dpo_beta=0.1, ref_logps="auto", learning_rate=args.dpo_lr, projector_lr=args.dpo_visual_lr,
        vision_lr=args.dpo_visual_lr,
        num_train_epochs=args.dpo_epochs, per_device_train_batch_size=8,
        **{k: v for k, v in common.items() if k not in ("image_folder", "logging_steps")}, logging_steps=1)))
    t_dpo = time.time() - t2
    acc = reward_accuracy(dpo_dir, sq_dir, root / "prefs.json", pool, 0.1)
    logged = [h for h in dpo.log_history if "rewards/accuracies" in h]

    before = vqa_scores(sq_dir, demo, root / "eval_sq")
    after = vqa_scores(dpo_dir, demo, root / "eval_dpo")
    result = {
        "images": args.images, "pref_images": args.pref_images,
        "self_asked": {"images": args.self_asked_images, "pairs": rep.pairs, "ties_dropped": rep.ties_dropped,
                       "identical_dropped": rep.identical_dropped, "recognised_questions": recognised_self},
        "gold_question_pairs": pairs, "gold_question_stats": pair_stats,
        "reward_accuracy_all_pairs": acc, "last_logged_reward_accuracy": logged[-1]["rewards/accuracies"] if logged else None,
        "dpo_steps": dpo.steps, "closed_before": pick(before, "closed"), "closed_after": pick(after, "closed"),
        "open_before": pick(before, "open"), "open_after": pick(after, "open"),
        "seconds": {"sq": round(t_sq, 1), "prefs": round(t_prefs, 1), "dpo": round(t_dpo, 1)},
    }
    (root / "result.json").write_text(json.dumps({"result": result, "scores_before": before, "scores_after": after},
                                                 indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
