#!/usr/bin/env bash
# The quick start: install, tokenize the Python standard library (byte-level), train tiny-moe on 2 CPU ranks with
# torchrun + DeepSpeed (ZeRO-2, gloo) for a few minutes, plot the run and sample from the exported model.
# Extra arguments go to scripts/train.py as overrides, e.g. `bash scripts/quickstart.sh --train.steps=50`;
# with --resume the run is continued, not deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one thread per rank: 2 ranks on a 2-core machine
if [ ! -f data/stdlib-byte/meta.json ]; then
    python scripts/prepare_data.py --out data/stdlib-byte
fi
RUN=runs/tiny-moe-cpu
resuming=false
for arg in "$@"; do
    case "$arg" in --resume | --resume=* | --checkpoint.resume | --checkpoint.resume=*) resuming=true ;; esac
done
if [ "$resuming" = false ]; then
    rm -rf "$RUN"  # a fresh run each time; `bash scripts/quickstart.sh --resume auto` continues the last one instead
fi
torchrun --nproc_per_node 2 scripts/train.py --config configs/train/tiny-moe-cpu.yaml --out_dir="$RUN" "$@"
python scripts/plot_run.py "$RUN"
python scripts/generate.py --model "$RUN/model" --prompt "def " --max-new-tokens 200
