"""Checkpoints that ask to run their own code (``auto_map``) never do, and never prompt (issue 15, item 12).

Every transformers load in medvlm passes ``trust_remote_code=False``; without it transformers asks on stdin
whether to run a folder's Python files. Each load below runs in a subprocess with stdin closed, and the
folder's ``evil.py`` leaves a marker file if it is ever imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _build(root: Path) -> None:
    """A medvlm checkpoint, a tiny Llama LM folder and a tiny CLIP tower folder under ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from medvlm.model.build import build_preset, save_checkpoint

    model, proc = build_preset("tiny", projector="mlp2x_gelu", seed=1)
    save_checkpoint(model, proc, root / "ckpt")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdefgh")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(hf),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(root / "lm")
    hf.save_pretrained(root / "lm")
    CLIPVisionModel(
        CLIPVisionConfig(
            image_size=32,
            patch_size=16,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(root / "tower")


_LOAD = """
import sys
from medvlm.errors import MedvlmError
from medvlm.model.build import compose, load_pretrained
root = sys.argv[1]
model, processor = load_pretrained(root + "/ckpt")
print("OK", type(model).__name__)
try:
    compose(root + "/tower", root + "/lm")
    print("OK composed")
except MedvlmError as e:
    print("REFUSED", e)
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def _plant(folder: Path, marker: Path, files: dict[str, dict]) -> None:
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    for name, extra in files.items():
        p = folder / name
        data = json.loads(p.read_text())
        data.update(extra)
        p.write_text(json.dumps(data))


def test_auto_map_in_a_checkpoint_is_never_run_nor_prompted_for(tmp_path):
    _build(tmp_path)
    marker = tmp_path / "evil_ran"
    # a medvlm checkpoint whose config, tokenizer and image processor all point at the folder's own code
    _plant(
        tmp_path / "ckpt",
        marker,
        {
            "config.json": {"auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}},
            "tokenizer_config.json": {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}},
            "preprocessor_config.json": {"auto_map": {"AutoImageProcessor": "evil.EvilProcessor"}},
        },
    )
    # a language model folder whose model type exists only as the folder's own code: refused, clearly
    _plant(
        tmp_path / "lm",
        marker,
        {
            "config.json": {
                "model_type": "evil_lm",
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"},
            }
        },
    )
    composed = _python(_LOAD, str(tmp_path))
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "OK MedVLMForConditionalGeneration" in composed.stdout
    last = composed.stdout.strip().splitlines()[-1]
    assert last.startswith(f"REFUSED {tmp_path / 'lm'}: ") and "trust_remote_code" in last, last
    assert "Do you wish to run the custom code" not in composed.stdout + composed.stderr
    assert not marker.exists()


def test_every_transformers_load_in_src_passes_trust_remote_code_false():
    """AST walk: each ``X.from_pretrained(...)`` call in src/ names ``trust_remote_code=False`` (ours excepted)."""
    import ast

    missing = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "from_pretrained"
            ):
                continue
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "MedVLMProcessor":
                continue  # ours: it loads its tokenizer and image processor with trust_remote_code=False
            flag = next((k.value for k in node.keywords if k.arg == "trust_remote_code"), None)
            if not (isinstance(flag, ast.Constant) and flag.value is False):
                missing.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert missing == []
