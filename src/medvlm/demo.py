"""``medvlm demo``: the whole LLaVA-Med pipeline on the embedded synthetic dataset, in minutes on a CPU.

One command, no arguments: generate the synthetic biomedical dataset (:mod:`medvlm.data.synth`), build a
tiny model from parts, answer the VQA test split with it untrained, train stage 1 (alignment: image ->
caption, LLaVA's ``plain`` format) and stage 2 (fine-tuning on the VQA train split, LLaVA-Med's downstream
step; the GPT-style instruct conversations were measured to slow the VQA learning within this budget),
answer the test split again, score both with the ``llava-med`` and ``strict`` protocols, print them beside
the image-blind baseline, write the evaluation report with plots, and print how to chat with the result.

Why the tiny model is built and trained differently from LLaVA's recipe (all measured on this data):

- Nothing pretrained can be downloaded, so tower and LM start random. Stage 1 therefore trains the
  tower and the LM with the projector (LLaVA freezes them because they come pretrained). Captions name
  every factor of an image at once, so stage 1 is where the tower learns to see (after 600 caption
  steps the captions of *test* images get modality 100 %, size 98 %, count and side 84 % right).
- The tower is a 64 px / patch-8 CLIP (64 image tokens): with patch 16 (16 tokens) nothing but the modality
  was learned. (The ``tiny`` preset now has this tower and this LM, with training defaults that follow from its
  random parts, :mod:`medvlm.train.stages`; the demo composes its own parts and passes every training value
  explicitly, so its figures do not move with those defaults.)
- The LM is initialised with std 0.1 instead of transformers' 0.02: at width 128 the default scale leaves
  the image signal so weak after the LM's attention that the lesions are never learned (no progress in
  1000 steps on the side questions at 0.02, 75 % after 400 steps at 0.1).
- ``mistral_instruct`` (LLaVA-Med v1.5's template) has no system prompt: sequences stay ~85 tokens
  instead of ~200 with ``vicuna_v1``.
- Many images, few epochs: synthetic images cost nothing, and each (yes/no predicate, wording) pair is
  rare, so with 1600 train images seen 24 times the model memorised the train answers of the rarer
  wordings (train loss 0.01, those wordings at chance on the test split); 8000 images seen ~5 times
  generalise for the same compute.
- Stage 2 trains on each image's questions merged into one conversation (:mod:`medvlm.data.benchmarks.group`,
  LLaVA-1.5's format for VQA data): the image is encoded once for all its questions, so the same compute sees
  ~2x the questions (closed accuracy 81 -> 88 on the 1600-image set at equal steps).
- Stage 2 uses small batches (8 conversations): the yes/no questions, balanced per question text by the
  dataset so that no text prior helps, need many updates rather than large batches.
- The yes/no questions about side and number are the hard part: the answer is "yes" exactly when the word in
  the question (left, two, ...) matches what the image shows, a comparison the LM must learn, not a lookup.
  Learning it shows up as a late, sudden drop of the stage-2 loss (to < 0.01); a run that misses it
  plateaus at 0.03-0.16 with one kind of yes/no question near chance. With a 2-layer LM, 2 closed questions
  per train image and lr 1e-3, runs got closed 89.75-93 (side or count at chance; seed 0 at 2 threads:
  89.75). The default adds a third LM layer, one more closed count and side question per train image
  (``train_closed_kinds``) and halves stage 2's lr to 5e-4: closed 99.9 / open 100 with seed 0 at 2
  threads, 99.9-100 / 100 with seeds 0, 1, 2 at 1 thread (seed 1 at lr 1e-3 had plateaued: 79.9 / 73.1). Results are
  deterministic for a given seed and torch thread count; a different thread count is a different run.

``--family qwen2_5_vl`` / ``--family idefics3`` (:data:`DEMO_FAMILIES`) run the same curriculum, data and schedule on
a random model of that transformers class instead (:func:`medvlm.model.families.tiny.build_demo_family`, saved in
the hub layout as ``models/untrained``), through the same public stage code as ``medvlm train`` (the family backend,
:mod:`medvlm.train.family_stage`). The native lessons carry over as sizes of the family's own config: 64 image tokens
per 64 px image (patch 8; Qwen with ``merge_size`` 1, Idefics3 with one tile and ``scale_factor`` 1), a 64-wide 2-layer
tower, a 3-layer 128-wide LM initialised with std 0.1, and stage 1 trains tower, LM and connector. What differs is
what the family defines: its chat template (Qwen's default system prompt included, Idefics3's ``User:`` /
``Assistant:``), its connector (Qwen's merger MLP, Idefics3's linear modality projection) and Qwen's M-RoPE
positions. At the same data and schedule (1000 images) both families score what the native model scores; the default
runs (seed 0, 2 threads, idle machine) reach closed 99.8 / open 100 in 692 s (idefics3) and closed 91.2 / open 91.8
in 876 s (qwen2_5_vl: the lesion side stays at 67 %).
Figures per family: benchmarks/README.md, "Demo per family".
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from medvlm.errors import MedvlmError
from medvlm.notice import NOTICE, SHORT_NOTICE
from medvlm.utils.cli import renamed
from medvlm.utils.io import read_json, write_json_atomic

MARKER = "medvlm_demo.json"
PROTOCOLS: tuple[str, ...] = ("llava-med", "strict")
_PART_SIZES = {
    # CLIP tower: 64 px, patch 8 -> 8 x 8 = 64 image tokens.
    "vision": dict(
        image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    ),
    # A 3-layer Llama of width 128 (init std 0.1, see the module doc); the tiny BPE tokenizer (1k tokens).
    "lm": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
    ),
}


@dataclass
class DemoConfig:
    """What the demo runs; the defaults are the tuned full run (``fast`` shrinks it for tests)."""

    out: str = "medvlm_demo"
    """Output folder (data, models, evaluation, report); rerunning replaces what an earlier demo wrote there."""
    seed: int = 0
    """Seed of the dataset, the model's initial weights and the training order."""
    n_images: int | None = None
    """Synthetic images in all; None = 8400 (1000 with ``fast``)."""
    n_test_images: int = 400
    """Images held out for the VQA test split (at most a fifth of ``n_images``); 4 questions each."""
    fast: bool = False
    """A smaller, quicker run (1000 images): a smoke run of the whole pipeline, below the accuracy targets."""
    stage1_epochs: float = 2.4
    """Epochs of stage 1 (one caption per train image; 600 steps of 32 on 8000 train images)."""
    stage2_epochs: float = 4.8
    """Epochs of stage 2 (one conversation per train image, 6 questions each; 4800 steps of 8)."""
    train_extra_closed: int = 0
    """Closed questions of kinds not asked yet added to each train image (:func:`medvlm.data.synth.generate_synth`)."""
    train_closed_kinds: tuple[str, ...] = ("COUNT", "POS")
    """One more closed question of each of these kinds per train image (after ``train_extra_closed``): the
    default gives 4 closed + 2 open questions per train image, the test split keeps 2 + 2."""
    stage2_tune_vision_tower: bool = True
    """Train the tower in stage 2 too (False: only stage 1 trains it; stage 2 trains projector and LM)."""
    stage2_group_by_image: bool = True
    """Train stage 2 on the VQA questions merged per image into one conversation (LLaVA-1.5's format for VQA
    data, :mod:`medvlm.data.benchmarks.group`): each image is encoded once per 6 questions instead of 6 times."""
    stage1_lr: float = 1e-3
    """Peak learning rate of stage 1 (cosine schedule)."""
    stage2_lr: float = 5e-4
    """Peak learning rate of stage 2 (cosine schedule)."""
    stage1_batch_size: int = 32
    """Captions per optimizer step in stage 1."""
    stage2_batch_size: int = 8
    """Conversations per optimizer step in stage 2 (48 questions; the yes/no questions need many updates)."""
    eval_batch_size: int = 64
    """Questions per generate call when answering the test split."""
    max_new_tokens: int = 16
    """Upper bound on answer tokens (VQA answers are a word or two)."""
    family: str | None = None
    """None: the native medvlm LLaVA built from parts. A model family (:data:`DEMO_FAMILIES`): the same curriculum on
    a random demo-size model of that transformers class (:func:`medvlm.model.families.tiny.build_demo_family`)."""

    def images(self) -> int:
        """The number of synthetic images this run uses."""
        return self.n_images if self.n_images is not None else (1000 if self.fast else 8400)

    def test_images(self) -> int:
        """The number of held-out test images (``n_test_images``, at most a fifth of all images)."""
        return max(1, min(self.n_test_images, self.images() // 5))


@dataclass
class DemoResult:
    """The demo's final numbers (what ``--summary-out`` writes, plus paths)."""

    scores: dict[str, Any]
    """The ``llava-med`` scores.json object of the trained model."""
    strict: dict[str, Any]
    """The ``strict`` scores.json object of the trained model."""
    blind: dict[str, Any]
    """The image-blind baseline (x100, as the scores): majority answer per question kind, train -> test."""
    untrained: dict[str, dict[str, Any]]
    """Headline numbers of the untrained model per protocol (``closed_accuracy``, ``open_recall``)."""
    losses: dict[str, list[float]]
    """Logged training losses per stage."""
    seconds: float
    """Wall time of the whole run."""
    out: str
    model: str
    """The trained model folder."""
    report: str

    def to_json(self) -> dict[str, Any]:
        """The ``--summary-out`` object: ``scores``, ``strict``, ``blind``, ``seconds`` (+ untrained, losses)."""
        return {
            "scores": self.scores,
            "strict": self.strict,
            "blind": self.blind,
            "seconds": self.seconds,
            "untrained": self.untrained,
            "losses": self.losses,
        }


DEMO_FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "idefics3")
"""Model families ``--family`` builds (:data:`medvlm.model.families.tiny.DEMO_BUILDERS`); None is the native model."""


def check_family(family: str | None) -> None:
    """Refuse, before any work, a ``--family`` the demo has no model for (the message lists the ones it has)."""
    if family is not None and family not in DEMO_FAMILIES:
        raise MedvlmError(
            f"--family {family}: the demo builds only {', '.join(DEMO_FAMILIES)} (or leave --family out "
            "for the native medvlm LLaVA); other families train through medvlm train with "
            "medvlm model init --preset tiny-<family>"
        )


def _prepare_out(out: Path) -> None:
    """Refuse to write into a non-empty folder that an earlier demo did not make."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise MedvlmError(f"--out {out}: exists and is not a medvlm demo folder (no {MARKER}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def build_parts(folder: Path, seed: int) -> tuple[Path, Path]:
    """Save a random tiny CLIP vision tower and a random tiny Llama LM (+ tokenizer) as the stage-1 parts."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from medvlm.model.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vision = CLIPVisionModel(CLIPVisionConfig(**_PART_SIZES["vision"]))
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False,
                **_PART_SIZES["lm"],
            )
        )
    vision_dir, lm_dir = folder / "vision_tower", folder / "language_model"
    vision.save_pretrained(vision_dir)
    lm.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    return vision_dir, lm_dir


MODEL_KWARGS: dict[str, Any] = {"template": "mistral_instruct", "image_aspect": "pad", "vision_feature_layer": -1}
"""How stage 1 composes the parts (the tower's last layer feeds the projector: a 2-layer tower has no spare layer)."""


def stage_configs(cfg: DemoConfig, data: Path, parts: tuple[Path, Path] | Path, models: Path) -> list[tuple[str, dict]]:
    """The two training recipes (``configs/debug/stage1_align.yaml`` / ``stage2_sft.yaml`` adapted, see module doc).

    ``parts``: the native tower and LM folders, or with ``cfg.family`` the untrained family checkpoint. A family
    keeps its own chat template and connector, so its recipes name neither (the training config refuses them).
    """
    common = dict(
        image_folder=str(data / "images"),
        max_length=512,
        lr_scheduler_type="cosine",
        warmup_ratio=0.03,
        weight_decay=0.0,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=cfg.seed,
        resume_from_checkpoint=None,
        feature_cache="off",
        tune_vision_tower=True,
        # Pinned: the demo's own recipe, not the from-scratch defaults of medvlm.train.stages.ScratchRecipe (its
        # stage-2 file is grouped by stage2_data when stage2_group_by_image; its images are never augmented).
        group_by_image=False,
        image_augment=False,
    )
    if cfg.family is None:
        start = dict(
            template="plain",
            vision_tower_path=str(parts[0]),
            language_model_path=str(parts[1]),
            projector_type="mlp2x_gelu",
            model_kwargs=dict(MODEL_KWARGS),
        )
        family: dict[str, Any] = dict(template=MODEL_KWARGS["template"])
    else:
        start = dict(model_name_or_path=str(parts), family=cfg.family)
        family = dict(family=cfg.family)
    stage1 = dict(
        common,
        stage="align",
        **start,
        tune_language_model=True,
        data_path=str(data / "alignment.json"),
        output_dir=str(models / "stage1_align"),
        num_train_epochs=cfg.stage1_epochs,
        per_device_train_batch_size=cfg.stage1_batch_size,
        learning_rate=cfg.stage1_lr,
    )
    stage2 = dict(
        common,
        stage="sft",
        **family,
        model_name_or_path=str(models / "stage1_align"),
        tune="full",
        data_path=str(stage2_data(cfg, data)),
        output_dir=str(models / "stage2_sft"),
        num_train_epochs=cfg.stage2_epochs,
        tune_vision_tower=cfg.stage2_tune_vision_tower,
        per_device_train_batch_size=cfg.stage2_batch_size,
        learning_rate=cfg.stage2_lr,
    )
    return [("stage 1 (alignment: captions)", stage1), ("stage 2 (fine-tuning on the VQA train split)", stage2)]


def stage2_data(cfg: DemoConfig, data: Path) -> Path:
    """Stage 2's training file: the VQA train split, merged per image when ``stage2_group_by_image``."""
    return data / "vqa" / ("train_grouped.json" if cfg.stage2_group_by_image else "train.json")


def _loss_printer(name: str, console: Any):
    """A TrainerCallback printing step, loss and elapsed time at each logging step (the loss going down)."""
    from transformers import TrainerCallback

    class LossPrinter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:
                console.print(
                    f"  {name}  step {state.global_step:>4}/{state.max_steps}  "
                    f"loss {float(logs['loss']):.3f}  ({time.time() - self.start:.0f} s)"
                )

    return LossPrinter()


def _train(name: str, keys: dict, console: Any, log_file: Path) -> list[float]:
    from medvlm.train.config import load_config
    from medvlm.train.run import run_training

    cfg = load_config(None, dict(keys, logging_steps=max(1, _steps(keys) // 10)))  # ~10 loss lines per stage
    short = name.split(" (")[0]
    console.print(f"[bold]{name}[/bold] -> {cfg.output_dir}")
    # The trainer prints every log dict to stdout; those go to the log file, the LossPrinter shows the progress.
    with open(log_file, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        res = run_training(cfg, callbacks=[_loss_printer(short, console)])
    losses = [float(h["loss"]) for h in res.log_history if "loss" in h]
    console.print(f"  {short}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {res.steps} steps, {res.seconds:.0f} s")
    return losses


def _steps(keys: dict) -> int:
    """Optimizer steps of a stage (records x epochs / batch), from the data file's record count."""
    return int(len(read_json(keys["data_path"])) * keys["num_train_epochs"] / keys["per_device_train_batch_size"])


def _answer_and_score(
    model: Path, data: Path, answers_dir: Path, scores_dir: Path, cfg: DemoConfig, prefix: str
) -> dict[str, dict]:
    """Answer the VQA test split into ``answers_dir`` and score it under each protocol
    (``scores_dir/scores_*.json``)."""
    from medvlm.eval.protocols import score_files
    from medvlm.eval.vqa import run_vqa
    from medvlm.infer.engine import GenerationSettings

    answers = answers_dir / "answers.jsonl"
    if answers.exists():
        answers.unlink()  # a new model: never resume another model's answers
    run_vqa(
        model,
        data / "vqa" / "test.json",
        answers,
        data / "images",
        GenerationSettings(max_new_tokens=cfg.max_new_tokens),
        batch_size=cfg.eval_batch_size,
        progress=False,
    )
    out = {}
    for protocol in PROTOCOLS:
        out[protocol] = score_files(data / "vqa" / "test.json", answers, protocol)
        write_json_atomic(scores_dir / f"scores_{prefix}{protocol}.json", out[protocol])
    return out


def _headline(scores: dict) -> dict[str, float]:
    return {"closed_accuracy": scores["closed"]["accuracy"], "open_recall": scores["open"]["recall"]}


def blind_scores(baseline: dict[str, Any]) -> dict[str, Any]:
    """The synthetic dataset's blind baseline on the scores' scale (x100)."""
    q = baseline["by_question"]
    return {
        "closed": {"accuracy": 100 * baseline["closed"]},
        "open": {"recall": 100 * baseline["open_recall"]},
        "per_question_prior": {"closed": {"accuracy": 100 * q["closed"]}, "open": {"recall": 100 * q["open_recall"]}},
        "by_kind": baseline["by_kind"],
        "n_closed": baseline["n_closed"],
        "n_open": baseline["n_open"],
        "method": "majority answer per question kind learned on the train split (no image); "
        "per_question_prior: majority answer per exact question text",
    }


def results_table(blind: dict, untrained: dict[str, dict], trained: dict[str, dict]) -> Any:
    """A rich table: each protocol's closed accuracy and open recall, blind / untrained / trained."""
    from rich.table import Table

    t = Table(title="VQA test split (synthetic): x100")
    for col in ("protocol", "metric", "blind baseline", "untrained model", "trained model"):
        t.add_column(col, justify="left" if col in ("protocol", "metric") else "right")
    for p in PROTOCOLS:
        u, tr = _headline(untrained[p]), _headline(trained[p])
        t.add_row(
            p,
            "closed accuracy",
            f"{blind['closed']['accuracy']:.1f}",
            f"{u['closed_accuracy']:.1f}",
            f"[bold]{tr['closed_accuracy']:.1f}[/bold]",
        )
        t.add_row(
            p,
            "open recall",
            f"{blind['open']['recall']:.1f}",
            f"{u['open_recall']:.1f}",
            f"[bold]{tr['open_recall']:.1f}[/bold]",
        )
    return t


@contextlib.contextmanager
def _no_load_bars():
    """Hide transformers' per-load "Loading weights" / "Writing model shards" bars (the demo loads ~10 models)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def run_demo(config: DemoConfig | None = None, console: Any = None) -> DemoResult:
    """Run the whole demo (see the module doc); returns the final numbers."""
    with _no_load_bars():
        return _run_demo(config, console)


def _run_demo(config: DemoConfig | None, console: Any) -> DemoResult:
    from rich.console import Console

    from medvlm.data.benchmarks.group import group_file
    from medvlm.data.synth import generate_synth
    from medvlm.eval.report import write_report

    cfg = config or DemoConfig()
    check_family(cfg.family)
    console = console or Console(file=sys.stdout)
    started = time.time()
    out = Path(cfg.out)
    _prepare_out(out)
    write_json_atomic(out / MARKER, {"config": asdict(cfg), "notice": NOTICE})
    data, models, eval_dir = out / "data", out / "models", out / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    log_file = out / "train_log.txt"
    log_file.write_text("", encoding="utf-8")
    console.print(f"[bold]medvlm demo[/bold] -> {out}  (model: {cfg.family or 'native medvlm LLaVA'}; {SHORT_NOTICE})")

    manifest = generate_synth(
        data,
        n_images=cfg.images(),
        seed=cfg.seed,
        image_size=64,
        overwrite=True,
        test_fraction=cfg.test_images() / cfg.images(),
        train_extra_closed=cfg.train_extra_closed,
        train_closed_kinds=cfg.train_closed_kinds,
    )
    if cfg.stage2_group_by_image:
        group_file(data / "vqa" / "train.json", stage2_data(cfg, data), seed=cfg.seed)
    blind = blind_scores(manifest.blind_baseline)
    console.print(
        f"data: {manifest.n_train_images} train / {manifest.n_test_images} test synthetic images, "
        f"{manifest.files['vqa/test.json']} test questions ({time.time() - started:.0f} s)"
    )

    untrained_dir = models / "untrained"
    if cfg.family is None:
        parts: tuple[Path, Path] | Path = build_parts(models / "parts", cfg.seed)
        recipes = stage_configs(cfg, data, parts, models)
        _save_untrained(parts, recipes[0][1], untrained_dir)
    else:
        from medvlm.model.families.tiny import init_demo_family

        # The family's untrained checkpoint is both stage 1's start and the before-training model.
        init_demo_family(cfg.family, untrained_dir, seed=cfg.seed, title=f"medvlm demo ({cfg.family}): untrained")
        recipes = stage_configs(cfg, data, untrained_dir, models)
    # The untrained model's scores go beside the trained ones, so the report plots both.
    untrained = _answer_and_score(untrained_dir, data, eval_dir / "untrained", eval_dir, cfg, "untrained_")
    console.print(
        "untrained model: "
        + ", ".join(
            f"{p} closed {untrained[p]['closed']['accuracy']:.1f} / open recall {untrained[p]['open']['recall']:.1f}"
            for p in PROTOCOLS
        )
    )

    losses = {}
    for name, keys in recipes:
        losses[name.split(" (")[0]] = _train(name, keys, console, log_file)
    final = models / "stage2_sft"
    trained = _answer_and_score(final, data, eval_dir, eval_dir, cfg, "")
    report = write_report(eval_dir)
    seconds = time.time() - started

    console.print(results_table(blind, untrained, trained))
    console.print(f"report: {report}")
    example = json.loads((data / "vqa" / "test.json").read_text(encoding="utf-8"))[0]
    question = example["conversations"][0]["value"].replace("<image>", "").strip()
    console.print("chat with the trained model:")
    console.print(
        f"  medvlm chat --model {final} --image {data / 'images' / example['image']} --prompt \"{question}\"",
        soft_wrap=True,
        highlight=False,
    )
    console.print(f"done in {seconds:.0f} s. {SHORT_NOTICE}")
    return DemoResult(
        scores=trained["llava-med"],
        strict=trained["strict"],
        blind=blind,
        untrained={p: _headline(untrained[p]) for p in PROTOCOLS},
        losses=losses,
        seconds=seconds,
        out=str(out),
        model=str(final),
        report=str(report),
    )


def _save_untrained(parts: tuple[Path, Path], stage1: dict, dest: Path) -> None:
    """The model stage 1 starts from (parts composed, fresh projector), saved for the before-training scores."""
    from medvlm.model.build import compose, save_checkpoint

    model, processor = compose(
        parts[0],
        parts[1],
        projector=stage1["projector_type"],
        template=MODEL_KWARGS["template"],
        aspect=MODEL_KWARGS["image_aspect"],
        feature_layer=MODEL_KWARGS["vision_feature_layer"],
        seed=stage1["seed"],
    )
    save_checkpoint(model, processor, dest, title="medvlm demo: untrained")


MAIN_SETTINGS = {"cls": renamed({"--json-out": "--summary-out"})}
"""``app.command`` settings of the ``medvlm demo`` verb (registered by :mod:`medvlm.cli`)."""


def main(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("medvlm_demo"),
    seed: Annotated[int, typer.Option("--seed", help="Seed of data, weights and training order.")] = 0,
    n_images: Annotated[
        Optional[int],
        typer.Option("--n-images", help="Synthetic images (default 8400, 400 of them test; 1000 with --fast)."),
    ] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="A smaller, quicker run (1000 images; below the accuracy targets).")
    ] = False,
    summary_out: Annotated[
        Optional[Path], typer.Option("--summary-out", help="Also write the final numbers as JSON here.")
    ] = None,
    family: Annotated[
        Optional[str],
        typer.Option(
            "--family",
            help=f"Run the curriculum on a demo-size model of this transformers family "
            f"({', '.join(DEMO_FAMILIES)}); default: the native medvlm LLaVA.",
        ),
    ] = None,
) -> None:
    """Train and evaluate a tiny LLaVA-Med-style model on synthetic data end to end (minutes on a CPU)."""
    res = run_demo(DemoConfig(out=str(out), seed=seed, n_images=n_images, fast=fast, family=family))
    if summary_out is not None:
        write_json_atomic(summary_out, res.to_json())
        typer.echo(f"wrote {summary_out}")
