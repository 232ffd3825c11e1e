"""Starting points, the stage-1 projector, resume discovery and the final checkpoint of a run."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medvlm.errors import MedvlmError
from medvlm.train.config import TrainConfig
from medvlm.utils.artifacts import TRAINABLE_BASE_FILE, TRAINER_STATE_FILE
from medvlm.utils.io import atomic_path

# medvlm config field names accepted in ``model_kwargs`` -> the builder's argument names.
_BUILD_ALIASES = {
    "image_aspect": "aspect",
    "vision_feature_layer": "feature_layer",
    "vision_feature_select_strategy": "select_strategy",
}


def _build_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    out = {_BUILD_ALIASES.get(k, k): v for k, v in cfg.model_kwargs.items()}
    if cfg.projector_type:
        out["projector"] = cfg.projector_type
    return out


def load_start(cfg: TrainConfig):
    """The model + processor a run starts from (checkpoint, preset or composition), plus ``pretrain_projector``."""
    from medvlm.model import build

    if cfg.tune == "qlora":
        return _load_4bit(cfg)
    if cfg.model_name_or_path:
        if cfg.model_kwargs or cfg.projector_type:
            raise MedvlmError("model_kwargs / projector_type apply to preset or composed models, not to a checkpoint")
        model, processor = build.load_pretrained(cfg.model_name_or_path)
    elif cfg.preset:
        model, processor = build.build_preset(cfg.preset, seed=cfg.seed, **_build_kwargs(cfg))
    else:
        model, processor = build.compose(
            cfg.vision_tower_path, cfg.language_model_path, seed=cfg.seed, **_build_kwargs(cfg)
        )
    if cfg.pretrain_projector:
        load_projector(model, cfg.pretrain_projector)
    return model, processor


def _load_4bit(cfg: TrainConfig):
    """QLoRA's base: the checkpoint's LM linears in 4-bit NF4 (bitsandbytes, CUDA); tower and projector unquantised."""
    from transformers import BitsAndBytesConfig

    from medvlm.model.modeling import MedVLMForConditionalGeneration
    from medvlm.model.processing import MedVLMProcessor

    if not cfg.model_name_or_path:
        raise MedvlmError(
            "tune: qlora starts from a saved checkpoint (model_name_or_path); save a composed model first"
        )
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cfg.bf16 else torch.float16,
        llm_int8_skip_modules=["vision_tower", "projector", "lm_head"],
    )
    model = MedVLMForConditionalGeneration.from_pretrained(
        cfg.model_name_or_path,
        quantization_config=quant,
        use_safetensors=True,
        local_files_only=True,
        trust_remote_code=False,
    )
    processor = MedVLMProcessor.from_pretrained(cfg.model_name_or_path)
    if cfg.pretrain_projector:
        load_projector(model, cfg.pretrain_projector)
    return model, processor


def _projector_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MedvlmError(f"pretrain_projector {path}: no *.safetensors file in the folder")
    elif path.suffix == ".safetensors":
        files = [path]
    elif path.is_file():
        raise MedvlmError(f"pretrain_projector {path}: only safetensors are loaded (pickled .bin files are refused)")
    else:
        raise MedvlmError(f"pretrain_projector {path}: not found")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            # medvlm: "projector.0.weight"; LLaVA: "model.mm_projector.0.weight"; bare: "0.weight".
            m = re.match(r"^(?:.*\.)?(?:projector|mm_projector)\.(.+)$", k)
            if m:
                state[m.group(1)] = v
            elif len(files) == 1 and path.suffix == ".safetensors":
                state[k] = v
    if not state:
        raise MedvlmError(f"pretrain_projector {path}: no projector weights found")
    return state


def load_projector(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load stage-1 projector weights (strict: every key and shape must match)."""
    path = Path(path)
    state = _projector_state(path)
    own = model.projector.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise MedvlmError(
            f"pretrain_projector {path}: keys do not match the {model.config.projector_type} projector "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise MedvlmError(
                f"pretrain_projector {path}: {k} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}"
            )
    model.projector.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def find_last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` folder with the largest N that has trainer state (complete), or None."""
    d = Path(output_dir)
    if not d.is_dir():
        return None
    best = None
    for p in d.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / TRAINER_STATE_FILE).is_file():
            if best is None or int(m.group(1)) > best[0]:
                best = (int(m.group(1)), p)
    return str(best[1]) if best else None


def resolve_resume(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from (``auto`` = the last one in ``output_dir``, if any)."""
    value = cfg.resume_from_checkpoint
    last = find_last_checkpoint(cfg.output_dir)
    if value in (None, False, "false", "no"):
        if last:
            raise MedvlmError(
                f"output_dir {cfg.output_dir} already holds {Path(last).name}; resume "
                "(resume_from_checkpoint: auto) or choose a new output_dir"
            )
        return None
    if value in ("auto", True, "true", "last"):
        return last
    p = Path(str(value))
    if not (p / TRAINER_STATE_FILE).is_file():
        raise MedvlmError(f"resume_from_checkpoint {p}: not a checkpoint folder (no trainer_state.json)")
    return str(p)


def refuse_resume(cfg: TrainConfig) -> None:
    """For a loop without mid-run checkpoints (``distributed: fsdp2_cpu`` / ``deepspeed_cpu``): refuse a resume request.

    ``auto`` (the default) with nothing to resume passes; an explicit checkpoint, or a ``checkpoint-N`` already in
    ``output_dir`` (which the loop would neither continue nor keep consistent), is a MedvlmError with the fix.
    """
    value = cfg.resume_from_checkpoint
    mode = cfg.distributed
    if value not in (None, False, "false", "no", "auto"):
        raise MedvlmError(
            f"resume_from_checkpoint: {value}: distributed: {mode} writes no mid-run checkpoints and "
            "cannot resume; drop resume_from_checkpoint (or resume under distributed: auto)"
        )
    last = find_last_checkpoint(cfg.output_dir)
    if last:
        raise MedvlmError(
            f"output_dir {cfg.output_dir} already holds {Path(last).name} and distributed: {mode} cannot "
            "resume from it; choose a new output_dir (or resume under distributed: auto)"
        )


def trainable_base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a PEFT model that its adapter file does not hold, by parameter name.

    PEFT's ``save_pretrained`` (what the Trainer writes into ``checkpoint-N``) keeps the adapters, ``modules_to_save``
    and adapter biases; a base weight trained through ``requires_grad`` (a model family's connector, a fully tuned LM
    beside tower LoRA) is not in it. Empty for a model without adapters (the Trainer saves all of it).
    """
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        return {}
    adapter = model.active_adapter
    held = set(get_peft_model_state_dict(model, adapter_name=adapter))
    # PEFT drops the adapter name from its keys: "...lora_A.default.weight" -> "...lora_A.weight",
    # "...projector.modules_to_save.default.0.weight" -> "...projector.0.weight"
    return {
        n: p
        for n, p in model.named_parameters()
        if p.requires_grad and n.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}", "") not in held
    }


def save_trainable_base(model: torch.nn.Module, folder: str | os.PathLike) -> int:
    """Write :func:`trainable_base_state` into ``folder`` (safetensors, atomic) when non-empty;
    returns the tensor count."""
    from safetensors.torch import save_file

    state = trainable_base_state(model)
    if not state:
        return 0
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in state.items()}
    with atomic_path(Path(folder) / TRAINABLE_BASE_FILE, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return len(tensors)


def load_trainable_base(model: torch.nn.Module, checkpoint: str | os.PathLike) -> int:
    """Restore the trained base weights of a PEFT run from ``checkpoint`` (strict); returns the tensor count.

    Called before the Trainer resumes (it restores the adapters, optimizer, scheduler and RNG itself). A
    checkpoint without the file while the run trains such weights is refused: resuming from it would silently
    restart them from their initial values.
    """
    from safetensors import safe_open

    want = trainable_base_state(model)
    if not want:
        return 0
    path = Path(checkpoint) / TRAINABLE_BASE_FILE
    if not path.is_file():
        raise MedvlmError(
            f"resume_from_checkpoint {checkpoint}: no {TRAINABLE_BASE_FILE}, but this run trains "
            f"{len(want)} base weight(s) outside the adapter (e.g. {next(iter(want))}); resuming would "
            "restart them from their initial values; start a fresh run in a new output_dir"
        )
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        missing, extra = sorted(set(want) - have), sorted(have - set(want))
        if missing or extra:
            raise MedvlmError(
                f"{path}: the trained base weights do not match this run's trainable parameters "
                f"(missing {missing[:4]}, unexpected {extra[:4]}); resume with the config that wrote it"
            )
        with torch.no_grad():
            for name, p in want.items():
                value = f.get_tensor(name)
                if value.shape != p.shape:
                    raise MedvlmError(
                        f"{path}: {name} has shape {tuple(value.shape)}, the model needs {tuple(p.shape)}"
                    )
                p.copy_(value.to(dtype=p.dtype, device=p.device))
    return len(want)


def save_final(
    model: torch.nn.Module,
    output_dir: str | os.PathLike,
    lora: bool,
    write: Callable[[torch.nn.Module, Path, str], None],
) -> Path:
    """Make ``output_dir`` itself a loadable checkpoint (LoRA: merged weights, adapter in ``adapter/``).

    ``write(model, folder, title)`` writes the checkpoint files (``build.save_checkpoint`` for the native model,
    ``families.io.save_family`` for a model family) into a temporary folder; they are moved in one by one
    (each an atomic rename), leaving ``checkpoint-*`` folders and logs in place.
    """
    out = Path(output_dir)
    staging = out / ".final.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    if lora:
        adapter_tmp = out / ".adapter.tmp"
        if adapter_tmp.exists():
            shutil.rmtree(adapter_tmp)
        model.save_pretrained(str(adapter_tmp))  # PEFT: adapter_config.json + adapter_model.safetensors
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        os.replace(adapter_tmp, out / "adapter")
        model = model.merge_and_unload()
    write(model, staging, out.name)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
    return out
