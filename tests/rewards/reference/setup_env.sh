#!/usr/bin/env bash
# Build the reference environment for the reward parity tests, from scratch:
#
#     tests/rewards/reference/setup_env.sh [DIR]        # DIR defaults to .venv-reference
#     DRAFT_REFERENCE_PYTHON=DIR/bin/python python -m pytest -m parity tests/rewards
#
# A virtual environment already at DIR is replaced; any other DIR that exists is refused.
# PYTHON picks the interpreter (default python3; 3.11, as the pins in requirements.txt).
# Any failure, including a reference package that does not import, stops the script
# with a non-zero exit.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/../../../.venv-reference}
python=${PYTHON:-python3}

if [ -e "$dir" ] && [ ! -f "$dir/pyvenv.cfg" ]; then
    echo "setup_env.sh: $dir exists and is not a virtual environment; not replacing it" >&2
    exit 2
fi
rm -rf "$dir"
"$python" -m venv "$dir"
dir=$(cd "$dir" && pwd)
"$dir/bin/python" -m pip install --quiet --no-deps -r "$here/requirements.txt"

# PyPI's torchvision is built against the CUDA torch; with the CPU torch its compiled
# operators do not load and `import torchvision` fails. A .pth file runs the hook in
# torchvision_python_only.py at interpreter start (it does nothing where they load).
site=$("$dir/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp "$here/torchvision_python_only.py" "$site/"
echo "import torchvision_python_only" > "$site/torchvision_python_only.pth"

# Every reference implementation must import; fail here, loudly, if one does not.
"$dir/bin/python" -W ignore - <<'PY'
import sys
import torch, torchvision, open_clip, clip, torchmetrics, transformers, timm, fairscale, scipy
from torchmetrics.multimodal.clip_score import CLIPScore
import importlib.util
assert importlib.util.find_spec("ImageReward"), "image-reward is not installed"
print(f"reference environment: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"open_clip {open_clip.__version__}, transformers {transformers.__version__}, "
      f"torchmetrics {torchmetrics.__version__}")
PY
echo "export DRAFT_REFERENCE_PYTHON=$dir/bin/python"
