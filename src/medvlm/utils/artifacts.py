"""The names of the files medvlm writes into (and looks for in) checkpoint, run and output folders: named once, here.

A native checkpoint (``model_type: medvlm``) is a Hugging Face ``save_pretrained`` folder plus medvlm's processor
and trainable-parts files and a model card; a model-family checkpoint is the hub layout of its transformers class
plus :data:`FAMILY_FILE` and a card. A training run adds its config, data manifest, log and loss curve to the
final checkpoint (the config and manifest to each intermediate one). ``tests/test_checkpoint_files.py`` pins the
exact sets.
"""

from __future__ import annotations

# -- medvlm's own files ------------------------------------------------------------------------
PROCESSOR_FILE = "medvlm_processor.json"
"""A native checkpoint's processor settings (template, aspect, image tokens); its presence marks a medvlm folder."""
PARTS_FILE = "trainable_parts.json"
"""Trainable / total parameters per part at save time (native checkpoints)."""
FAMILY_FILE = "medvlm_family.json"
"""A model-family checkpoint's family, template and image settings."""
MODEL_CARD_FILE = "README.md"
"""The model card, with the research-only notice (every checkpoint and conversion medvlm writes)."""
TRAIN_CONFIG_FILE = "train_config.yaml"
"""The resolved training config (final and intermediate checkpoints)."""
DATA_MANIFEST_FILE = "data_manifest.json"
"""What the training data held and what was dropped (final and intermediate checkpoints)."""
LOSS_CURVE_FILE = "loss_curve.png"
"""The training loss plot (the run's output folder)."""
TRAIN_LOG_FILE = "train_log.jsonl"
"""One JSON line per logging step (the run's output folder)."""
TRAINABLE_BASE_FILE = "trainable_base.safetensors"
"""A LoRA run's ``checkpoint-N``: the trained base weights the PEFT adapter file does not hold (a family's connector,
a fully tuned LM beside tower LoRA), restored on resume (:mod:`medvlm.train.checkpoint`)."""
REF_LOGPS_FILE = "ref_logps.safetensors"
"""DPO's stored reference log-probabilities, in the run's output folder."""
CONVERSION_FILE = "conversion.json"
"""Where an imported / exported checkpoint came from and how it was converted."""
DELTA_FILE = "delta.json"
"""The base, target and semantics of a delta-weights folder."""
DECODING_FILE = "decoding.json"
"""The decoding settings of an answer file, beside it (``eval vqa``: a resumed run must match them)."""
EVAL_SCORES_FILE = "eval_scores.json"
"""``medvlm train --eval-questions``: per-kind scores beside the image-blind baseline, in the run's output folder."""
EVAL_ANSWERS_FILE = "eval_answers.jsonl"
"""``medvlm train --eval-questions``: the trained model's answers to the eval file, in the run's output folder."""
GROUPED_DIR = "grouped"
"""``group_by_image``: the training files with each image's questions merged, in the run's output folder."""

# -- Hugging Face's files, as medvlm checks and writes them ----------------------------------
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
HF_PROCESSOR_FILE = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TRAINER_STATE_FILE = "trainer_state.json"
"""The HF Trainer's state in each ``checkpoint-N`` folder (what marks one resumable)."""
