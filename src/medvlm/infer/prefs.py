"""STLLaVA-Med stage 2a: preference pairs from the model itself, judged by an image-aware LLM.

For each unlabeled image (:func:`generate_preferences`):

1. the model describes it (``describe the image in detail``, greedy), then, prompted at a VUSER
   turn after its description, samples N questions (temperature 1.2, top-k 300, top-p 0.95);
2. for each question it samples two answers with different seeds (temperature 1.2, top-k 100,
   top-p 0.95), prompted exactly as the DPO pair's prompt will be (``<image>`` + question);
3. the judge (:mod:`medvlm.infer.prefs_judge`) scores both; the higher score is chosen. Ties are
   dropped (``ties: drop``) or give the second answer (``ties: second``, the published rule);
   identical answers are dropped; unreadable replies are re-asked, then reported.

Outputs: ``OUT`` in STLLaVA-Med's DPO format (``image``, ``chosen_conversations``,
``reject_conversations``) and ``OUT.trl.jsonl`` in TRL's (``prompt``/``chosen``/``rejected`` +
``images``); each pair carries its ``id``, the judge's scores and reasons, the question and the
model's description. Progress is appended per finished image to ``OUT.progress.jsonl`` and LLM
replies are cached in ``OUT.llm_cache.sqlite``: a rerun skips finished images and re-judges failed
ones from the cache (no request is paid twice); every image failure is reported, never fatal.
Images reach the model through the processor, so they are prepared exactly as in training and
evaluation (a native model's ``image_aspect``; a family's own image processor).

The model is a native medvlm checkpoint with a VUSER template (``v1_sq``) or a model-family checkpoint
(:mod:`medvlm.model.families`) that asks questions: its VUSER prompt is the conversation + the family's
``question_header``, the tokens the family's ``sq`` stage learned each question after.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medvlm.data.images import DICOM_SUFFIXES, load_image
from medvlm.data.schema import Message, Sample, image_part, text_part
from medvlm.errors import MedvlmError
from medvlm.infer.engine import GenerationSettings, InferenceEngine
from medvlm.infer.prefs_judge import image_data_url, judge_messages, reasons_of
from medvlm.llm import LLMClient, LLMConfig
from medvlm.llm.judge import ScoreJob, ask_for_scores
from medvlm.notice import SHORT_NOTICE
from medvlm.utils.io import append_jsonl, iter_jsonl, write_json_atomic, write_jsonl_atomic

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", *DICOM_SUFFIXES)
TIE_POLICIES: tuple[str, ...] = ("drop", "second")
DESCRIBE_PROMPT = "Describe the image in detail."


@dataclass
class PrefsConfig:
    """Inputs, sampling and judging settings of preference generation."""

    model: Path
    """The stage-1 (``sq``) model: a native medvlm checkpoint with a VUSER template (``v1_sq``), or a model-family
    checkpoint that asks questions (every family but ``llava`` without ``v1_sq``)."""
    images: Path
    """Folder of unlabeled images (searched recursively); pairs name images relative to it."""
    out: Path
    """STLLaVA-Med-format output (JSON array); the TRL file, progress log and LLM cache sit beside it."""
    questions_per_image: int = 5
    """Questions the model asks per image."""
    ties: str = "drop"
    """``drop`` (equal scores give no pair) or ``second`` (the published rule: the second answer is chosen)."""
    limit: int | None = None
    """Only the first N images (sorted by path)."""
    seed: int = 0
    """Base seed of question and answer sampling (per image and per answer slot)."""
    describe_prompt: str = DESCRIBE_PROMPT
    """The instruction the model describes each image with."""
    description_tokens: int = 256
    """Maximum new tokens of the description."""
    question_tokens: int = 64
    """Maximum new tokens of one question."""
    answer_tokens: int = 256
    """Maximum new tokens of one answer."""
    question_sampling: tuple[float, int, float] = (1.2, 300, 0.95)
    """Questions: (temperature, top-k, top-p)."""
    answer_sampling: tuple[float, int, float] = (1.2, 100, 0.95)
    """Answers: (temperature, top-k, top-p)."""
    parse_retries: int = 2
    """Follow-up requests when a judge reply has no readable scores."""
    batch_size: int = 8
    """Generation batch size."""

    def trl_path(self) -> Path:
        """The TRL-format output beside ``out``."""
        return self.out.with_name(self.out.stem + ".trl.jsonl")

    def progress_path(self) -> Path:
        """The per-image progress log (one JSON line per finished or failed image)."""
        return self.out.with_name(self.out.name + ".progress.jsonl")

    def default_cache_path(self) -> Path:
        """The LLM response cache when the LLM config names none."""
        return self.out.with_name(self.out.name + ".llm_cache.sqlite")

    def validate(self) -> PrefsConfig:
        """Raise a MedvlmError naming the bad setting."""
        if self.ties not in TIE_POLICIES:
            raise MedvlmError(f"ties: unknown policy {self.ties!r}; choose one of {', '.join(TIE_POLICIES)}")
        if self.questions_per_image < 1:
            raise MedvlmError(f"questions_per_image must be >= 1, got {self.questions_per_image}")
        if self.limit is not None and self.limit < 1:
            raise MedvlmError(f"limit must be >= 1, got {self.limit}")
        if self.parse_retries < 0:
            raise MedvlmError(f"parse_retries must be >= 0, got {self.parse_retries}")
        if not self.images.is_dir():
            raise MedvlmError(f"--image-folder {self.images}: folder not found")
        return self


@dataclass
class PrefsReport:
    """What a preference-generation run did."""

    images: int = 0
    """Images selected."""
    resumed: int = 0
    """Images finished by an earlier run (skipped)."""
    done: int = 0
    """Images finished in this run."""
    pairs: int = 0
    """Preference pairs in the output (all runs)."""
    ties_dropped: int = 0
    identical_dropped: int = 0
    parse_retries: int = 0
    failed: list[str] = field(default_factory=list)
    """``"image: reason"`` for every image or question that failed (the image is retried on a rerun)."""
    usage: str = ""
    outputs: list[str] = field(default_factory=list)


class SelfQuestioningEngine(InferenceEngine):
    """The inference engine, also continuing a conversation that ends with an answer (the next turn is VUSER)."""

    @staticmethod
    def prompt_sample(sample: Sample) -> Sample:
        # The base engine answers the last question (trailing answers dropped); a conversation ending
        # with an assistant turn is continued as is, so the generation prompt is the VUSER tag.
        if sample.messages and sample.messages[-1].role == "assistant":
            return sample
        return InferenceEngine.prompt_sample(sample)


def require_questions(processor: Any, source: str | Path) -> None:
    """Refuse a model that cannot be prompted for a VUSER question (the error names ``source``)."""
    from medvlm.model.families.processing import FamilyProcessor

    if isinstance(processor, FamilyProcessor):
        if not processor.asks_questions:
            raise MedvlmError(
                f"{source}: this {processor.spec.name} checkpoint's template {processor.template!r} has "
                "no VUSER role; self-questioning needs a stage-'sq' model (the llava family: template "
                "v1_sq)"
            )
        return
    if processor.chat_template.vuser is None:
        raise MedvlmError(
            f"{source}: template {processor.template!r} has no VUSER role; self-questioning needs a "
            "stage-'sq' model (template v1_sq)"
        )


def list_images(folder: Path, limit: int | None = None) -> list[str]:
    """Image files under ``folder`` (relative POSIX paths, sorted), at most ``limit``."""
    found = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not found:
        raise MedvlmError(f"--image-folder {folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found[:limit] if limit is not None else found


def _user(question: str) -> Message:
    return Message("user", [image_part(), text_part(question)])


def _settings(sampling: tuple[float, int, float], tokens: int, seed: int) -> GenerationSettings:
    t, k, p = sampling
    return GenerationSettings(max_new_tokens=tokens, temperature=t, top_k=k, top_p=p, seed=seed)


def _seed(base: int, rel: str, slot: int) -> int:
    """A per-image, per-slot seed that does not depend on which other images are processed."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{base}:{rel}:{slot}".encode()).digest()[:4], "little")


def model_candidates(engine: InferenceEngine, rel: str, image, cfg: PrefsConfig) -> dict[str, Any]:
    """Description, questions and two sampled answers per question for one image."""
    one = [[image]]
    describe = Sample(rel, [_user(cfg.describe_prompt)], [rel])
    description = engine.generate([describe], GenerationSettings(max_new_tokens=cfg.description_tokens), images=one)[0]
    ask = Sample(rel, [_user(cfg.describe_prompt), Message("assistant", [text_part(description)])], [rel])
    n = cfg.questions_per_image
    raw_q = engine.generate(
        [ask] * n, _settings(cfg.question_sampling, cfg.question_tokens, _seed(cfg.seed, rel, 0)), images=one * n
    )
    questions: list[str] = []
    for q in raw_q:
        if q and q not in questions:
            questions.append(q)
    candidates = []
    if questions:
        prompts = [Sample(rel, [_user(q)], [rel]) for q in questions]
        imgs = one * len(prompts)
        a1 = engine.generate(
            prompts, _settings(cfg.answer_sampling, cfg.answer_tokens, _seed(cfg.seed, rel, 1)), images=imgs
        )
        a2 = engine.generate(
            prompts, _settings(cfg.answer_sampling, cfg.answer_tokens, _seed(cfg.seed, rel, 2)), images=imgs
        )
        candidates = [{"question": q, "answers": [x, y]} for q, x, y in zip(questions, a1, a2)]
    return {"description": description, "questions_asked": len(raw_q), "candidates": candidates}


def decide(scores: tuple[float, float], ties: str) -> int | None:
    """Index (0/1) of the chosen answer, or None for a dropped tie."""
    if scores[0] > scores[1]:
        return 0
    if scores[1] > scores[0]:
        return 1
    return 1 if ties == "second" else None


def pair_records(
    rel: str, idx: int, cand: dict, description: str, j: ScoreJob, chosen: int, judge_model: str
) -> tuple[dict, dict]:
    """The pair in STLLaVA-Med's and in TRL's format, with the judge's scores and reasons beside it."""
    q, answers = cand["question"], cand["answers"]
    c, r = answers[chosen], answers[1 - chosen]
    judge = {
        "model": judge_model,
        "scores": {"chosen": j.scores[chosen], "rejected": j.scores[1 - chosen]},
        "answer_scores": list(j.scores),
        "chosen_index": chosen,
        "reason": reasons_of(j.reply or ""),
    }
    pid = f"{rel}#q{idx}"
    human = {"from": "human", "value": f"<image>\n{q}"}
    st = {
        "id": pid,
        "image": rel,
        "chosen_conversations": [human, {"from": "gpt", "value": c}],
        "reject_conversations": [human, {"from": "gpt", "value": r}],
        "question": q,
        "description": description,
        "judge": judge,
    }
    trl = {
        "id": pid,
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": c}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r}]}],
        "images": [rel],
        "question": q,
        "description": description,
        "judge": judge,
    }
    return st, trl


def _load_progress(path: Path) -> dict[str, dict]:
    """Finished-image records by image (the last line of an image wins); the file is compacted (a torn line dropped)."""
    if not path.exists():
        return {}
    rows = [rec for _, rec in iter_jsonl(path, skip_bad=True, bad=[]) if isinstance(rec, dict) and "image" in rec]
    write_jsonl_atomic(path, rows)  # appending after a torn last line would corrupt the next record
    return {rec["image"]: rec for rec in rows}


def generate_preferences(
    cfg: PrefsConfig,
    llm: LLMConfig,
    *,
    model=None,
    processor=None,
    client: LLMClient | None = None,
    chunk_images: int = 8,
) -> PrefsReport:
    """Run stage 2a over ``cfg.images``; writes the two output files and returns the report.

    ``model``/``processor`` (already loaded) replace loading ``cfg.model``; ``client`` replaces
    building one from ``llm`` (whose ``cache_path`` defaults to ``OUT.llm_cache.sqlite``).
    """
    cfg.validate()
    images = list_images(cfg.images, cfg.limit)
    report = PrefsReport(images=len(images))
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    progress = _load_progress(cfg.progress_path())
    todo = [rel for rel in images if progress.get(rel, {}).get("status") != "done"]
    report.resumed = len(images) - len(todo)
    own_client = client is None
    engine: InferenceEngine | None = None
    if todo:
        if model is None:
            from medvlm.infer.loading import load_for_inference

            model, processor = load_for_inference(cfg.model)  # native or a model family, by config.json model_type
        require_questions(processor, cfg.model)
        engine = SelfQuestioningEngine(model, processor, batch_size=cfg.batch_size)
        if client is None:
            if llm.cache_path is None:  # a copy: the caller's config may serve other outputs with their own caches
                llm = dataclasses.replace(llm, cache_path=cfg.default_cache_path())
            client = LLMClient(llm)
    try:
        bar = tqdm(total=len(todo), desc="images", unit="img", disable=not llm.progress)
        for start in range(0, len(todo), chunk_images):
            _run_chunk(todo[start : start + chunk_images], cfg, engine, client, progress, report)
            bar.update(len(todo[start : start + chunk_images]))
        bar.close()
        if client is not None:
            report.usage = client.usage.summary(client.config)
    finally:
        if own_client and client is not None:
            client.close()
    _write_outputs(cfg, images, progress, report)
    return report


def _run_chunk(
    chunk: list[str],
    cfg: PrefsConfig,
    engine: InferenceEngine,
    client: LLMClient,
    progress: dict[str, dict],
    report: PrefsReport,
) -> None:
    gen: dict[str, dict] = {}
    jobs: list[ScoreJob] = []
    for rel in chunk:
        try:
            image = load_image(cfg.images / rel)
            gen[rel] = model_candidates(engine, rel, image, cfg)
            url = image_data_url(cfg.images / rel)
        except (MedvlmError, OSError, ValueError, RuntimeError) as e:
            _finish(cfg, progress, report, {"image": rel, "status": "failed", "error": f"{type(e).__name__}: {e}"})
            gen.pop(rel, None)
            continue
        for i, cand in enumerate(gen[rel]["candidates"]):
            if cand["answers"][0] == cand["answers"][1]:
                continue  # identical answers carry no preference; counted when the image is recorded
            jobs.append(ScoreJob(judge_messages(url, cand["question"], *cand["answers"]), tag=(rel, i)))
    report.parse_retries += ask_for_scores(client, jobs, cfg.parse_retries)
    by_image: dict[str, dict[int, ScoreJob]] = {}
    for j in jobs:
        rel, i = j.tag
        by_image.setdefault(rel, {})[i] = j
    for rel, g in gen.items():
        pairs, trl, errors, ties, identical = [], [], [], 0, 0
        for i, cand in enumerate(g["candidates"]):
            j = by_image.get(rel, {}).get(i)
            if j is None:
                identical += 1
                continue
            if j.error is not None:
                errors.append(f"question {i}: {j.error}")
                continue
            chosen = decide(j.scores, cfg.ties)
            if chosen is None:
                ties += 1
                continue
            st, tr = pair_records(rel, i, cand, g["description"], j, chosen, client.config.model)
            pairs.append(st)
            trl.append(tr)
        rec = {
            "image": rel,
            "status": "failed" if errors else "done",
            "description": g["description"],
            "questions": [c["question"] for c in g["candidates"]],
            "pairs": pairs,
            "trl": trl,
            "ties_dropped": ties,
            "identical_dropped": identical,
        }
        if errors:
            rec["error"] = "; ".join(errors)
        _finish(cfg, progress, report, rec)


def _finish(cfg: PrefsConfig, progress: dict[str, dict], report: PrefsReport, rec: dict) -> None:
    append_jsonl(cfg.progress_path(), rec)
    progress[rec["image"]] = rec
    if rec["status"] == "done":
        report.done += 1
    else:
        report.failed.append(f"{rec['image']}: {rec['error']}")


def _write_outputs(cfg: PrefsConfig, images: list[str], progress: dict[str, dict], report: PrefsReport) -> None:
    """Both output files from the finished images, in image order (atomic writes)."""
    stllava, trl = [], []
    for rel in images:
        rec = progress.get(rel)
        if rec is None or rec.get("status") != "done":
            continue
        stllava.extend(rec["pairs"])
        trl.extend(rec["trl"])
        report.ties_dropped += rec.get("ties_dropped", 0)
        report.identical_dropped += rec.get("identical_dropped", 0)
    write_json_atomic(cfg.out, stllava)
    write_jsonl_atomic(cfg.trl_path(), trl)
    report.pairs = len(stllava)
    report.outputs = [str(cfg.out), str(cfg.trl_path())]


def summary(report: PrefsReport) -> str:
    """A few lines for the terminal (with the research-only notice)."""
    lines = [
        f"images: {report.images} ({report.resumed} finished earlier, {report.done} now, {len(report.failed)} failed)",
        f"pairs: {report.pairs}; dropped: {report.ties_dropped} ties, {report.identical_dropped} identical answers; "
        f"judge parse retries: {report.parse_retries}",
    ]
    lines += [f"failed: {f}" for f in report.failed[:20]]
    if len(report.failed) > 20:
        lines.append(f"... and {len(report.failed) - 20} more (see the progress log)")
    if report.usage:
        lines.append(report.usage)
    lines.append("written: " + ", ".join(report.outputs))
    lines.append(SHORT_NOTICE)
    return "\n".join(lines)
