"""`medvlm model make-delta` / `apply-delta`: LLaVA-Med v1.0 delta semantics, exact round trip, streaming shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medvlm.cli import main as cli_main
from medvlm.errors import MedvlmError
from medvlm.model.convert.delta import apply_delta, make_delta

EMBED, HEAD, PROJ_W, PROJ_B = (
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.mm_projector.weight",
    "model.mm_projector.bias",
)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _write(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    return folder


@pytest.fixture()
def pair(tmp_path):
    """A tiny LLaMA base (vocab 40) and a v1.0-layout target (vocab 44, fine-tuned weights, linear projector)."""
    g = torch.Generator().manual_seed(0)
    base = {
        EMBED: torch.randn(40, 16, generator=g),
        HEAD: torch.randn(40, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(16, 32, generator=g),
        "model.norm.weight": torch.ones(16),
    }
    target = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    target[EMBED] = torch.cat([target[EMBED], torch.randn(4, 16, generator=g)])  # [PAD] <im_patch> <im_start> <im_end>
    target[HEAD] = torch.cat([target[HEAD], torch.randn(4, 16, generator=g)])
    target[PROJ_W], target[PROJ_B] = torch.randn(16, 8, generator=g), torch.randn(16, generator=g)
    b = _write(tmp_path / "llama-7b", base, {"model_type": "llama", "vocab_size": 40})
    t = _write(
        tmp_path / "llava-med-7b", target, {"model_type": "llava", "vocab_size": 44, "mm_use_im_start_end": True}
    )
    return b, t, base, target


def test_make_then_apply_gives_the_target_exactly(pair, tmp_path):
    b, t, base, target = pair
    counts = make_delta(b, t, tmp_path / "delta", dtype="float64", max_shard_bytes=2000)
    assert counts == {"tensors": 7, "differences": 5, "kept_as_stored": 2, "inexact_elements": 0}
    delta = _tensors(tmp_path / "delta")
    assert (tmp_path / "delta" / "model.safetensors.index.json").is_file()  # sharded: streamed shard by shard
    # v1.0 semantics: differences, base subtracted from the top-left block, extra rows and projector as stored
    assert torch.equal(delta["model.norm.weight"], (target["model.norm.weight"].double() - 1.0))
    assert torch.equal(delta[EMBED][:40], target[EMBED][:40].double() - base[EMBED].double())
    assert torch.equal(delta[EMBED][40:], target[EMBED][40:].double())
    assert torch.equal(delta[PROJ_W], target[PROJ_W]) and delta[PROJ_W].dtype == torch.float32
    out = apply_delta(b, tmp_path / "delta", tmp_path / "target", max_shard_bytes=1500)
    assert out == {"tensors": 7, "added_to_base": 5, "kept_as_stored": 2}
    rebuilt = _tensors(tmp_path / "target")
    assert sorted(rebuilt) == sorted(target)
    for k, v in target.items():
        assert rebuilt[k].dtype == v.dtype and torch.equal(rebuilt[k], v), k
    # the non-weight files of the v1.0 checkpoint travel with it (import reads them)
    assert json.loads((tmp_path / "target" / "config.json").read_text())["vocab_size"] == 44
    assert (tmp_path / "target" / "tokenizer_config.json").is_file()


def test_delta_in_target_dtype_reports_what_does_not_round_trip(pair, tmp_path):
    b, t, _, target = pair
    counts = make_delta(b, t, tmp_path / "delta")  # as published: the delta in the target's dtype
    assert all(v.dtype == torch.float32 for v in _tensors(tmp_path / "delta").values())
    apply_delta(b, tmp_path / "delta", tmp_path / "target")
    rebuilt = _tensors(tmp_path / "target")
    differing = sum(int((rebuilt[k] != v).sum()) for k, v in target.items())
    assert differing == counts["inexact_elements"]
    assert all(torch.allclose(rebuilt[k], v, atol=1e-6, rtol=0) for k, v in target.items())


def test_cli_round_trip_in_bfloat16(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    base = {
        EMBED: torch.randn(10, 8, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(8, generator=g).bfloat16(),
    }
    target = {
        EMBED: torch.randn(12, 8, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(8, generator=g).bfloat16(),
        PROJ_B: torch.randn(8, generator=g).bfloat16(),
    }
    b = _write(tmp_path / "b", base, {})
    t = _write(tmp_path / "t", target, {})
    for argv in (
        ["make-delta", "--base", str(b), "--target", str(t), "--out", str(tmp_path / "d"), "--dtype", "float32"],
        ["apply-delta", "--base", str(b), "--delta", str(tmp_path / "d"), "--out", str(tmp_path / "out")],
    ):
        with pytest.raises(SystemExit) as e:
            cli_main(["model", *argv])
        assert e.value.code == 0, capsys.readouterr().err
    assert "1 kept as stored" in capsys.readouterr().out
    assert _tensors(tmp_path / "d")[EMBED].dtype == torch.float32  # widened; the target dtype is recorded
    rebuilt = _tensors(tmp_path / "out")
    for k, v in target.items():
        assert rebuilt[k].dtype == torch.bfloat16 and torch.equal(rebuilt[k], v), k


def test_bad_inputs(pair, tmp_path):
    b, t, base, target = pair
    make_delta(b, t, tmp_path / "delta")
    # a tensor other than the embeddings / head whose shape differs from the base
    wrong = dict(base)
    wrong["model.norm.weight"] = torch.ones(12)
    w = _write(tmp_path / "wrong-base", wrong, {})
    out = tmp_path / "target"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(MedvlmError, match=r"'model.norm.weight': shape \(16,\) does not match the base's \(12,\)"):
        apply_delta(w, tmp_path / "delta", out)
    assert (out / "keep.txt").read_text() == "old" and not (out / "model.safetensors").exists()
    # a pickled base is refused, never read
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(MedvlmError, match=r"only has pickled weights \(pytorch_model.bin\).*safetensors"):
        apply_delta(pickled, tmp_path / "delta", tmp_path / "t2")
    with pytest.raises(MedvlmError, match="delta folder .* not found"):
        apply_delta(b, tmp_path / "missing", tmp_path / "t2")
    with pytest.raises(MedvlmError, match="unknown delta dtype 'int8'"):
        make_delta(b, t, tmp_path / "d2", dtype="int8")
    assert not (tmp_path / "t2").exists() and not (tmp_path / "d2").exists()
