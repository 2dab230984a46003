#!/usr/bin/env bash
# Train the bundled default model (qwen3coder-tiny) on one GPU machine and pack what comes back.
#
#   bash scripts/train_bundled.sh OUT_DIR [--set SECTION.FIELD=VALUE ...]   (from the repository root;
#   the repo need not be installed)
#
# 1. `python -m qwen3coder.train --profile gpu` into a scratch directory (data, tokenizer, pretraining
#    ~290 s, SFT ~40 s, export; about 7.5 minutes), under a hard time limit;
# 2. packs the exported model and the reports (data report, loss curves JSON/PNG, train log, summary)
#    as OUT_DIR/bundle.tgz.part-aa, -ab, ... (15 MB pieces: the device tool returns at most 8 files of
#    16 MiB); unpack with `cat bundle.tgz.part-* | tar xzf -`;
# 3. if `qwen3coder.eval` is importable, runs `run_all(model, OUT_DIR/eval.json, "gpu")` with the time
#    left before the 10-minute limit of one device command.
# Environment: PROFILE (default gpu; cpu-smoke tries the script anywhere), PYTHON (default python), QWEN3CODER_TRAIN_WORK (scratch dir), TRAIN_LIMIT_S (default 540),
# TOTAL_LIMIT_S (default 585).
set -uo pipefail

OUT=${1:?usage: bash scripts/train_bundled.sh OUT_DIR [--set SECTION.FIELD=VALUE ...]}
shift
PROFILE=${PROFILE:-gpu}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
WORK=${QWEN3CODER_TRAIN_WORK:-$(mktemp -d /tmp/qwen3coder-train.XXXXXX)}
TRAIN_LIMIT_S=${TRAIN_LIMIT_S:-540}
TOTAL_LIMIT_S=${TOTAL_LIMIT_S:-585}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)

echo "== qwen3coder-tiny training: work dir $WORK, output $OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"

timeout --signal=TERM --kill-after=10 "$TRAIN_LIMIT_S" \
    "$PY" -m qwen3coder.train --profile "$PROFILE" --out "$WORK" --no-eval "$@" 2>&1 | tee "$WORK/stdout.log"
train_rc=${PIPESTATUS[0]}
echo "== training exited with $train_rc after $(( $(date +%s) - start ))s"

# pack: the exported model (if training got that far) + reports + console log
items=()
for item in model reports stdout.log; do
    [ -e "$WORK/$item" ] && items+=("$item")
done
if [ ${#items[@]} -gt 0 ]; then
    tar czf - -C "$WORK" "${items[@]}" | split -b 15m - "$OUT/bundle.tgz.part-"
    ls -l "$OUT"
else
    echo "nothing to pack in $WORK" >&2
fi

# evaluation with the time that is left (written straight to OUT: small files)
if [ "$train_rc" -eq 0 ] && [ -f "$WORK/model/config.json" ] && "$PY" -c "from qwen3coder.eval import run_all" 2>/dev/null; then
    left=$(( TOTAL_LIMIT_S - ( $(date +%s) - start ) ))
    if [ "$left" -gt 20 ]; then
        echo "== evaluation (${left}s left)"
        timeout --signal=TERM --kill-after=5 "$left" "$PY" -c \
            "import sys; from qwen3coder.eval import run_all; run_all(sys.argv[1], sys.argv[2], sys.argv[3])" \
            "$WORK/model" "$OUT/eval.json" "$PROFILE" > "$OUT/eval_log.txt" 2>&1
        echo "== evaluation exited with $? ($(tail -n 3 "$OUT/eval_log.txt" | tr '\n' ' '))"
    else
        echo "== no time left for evaluation (${left}s)"
    fi
else
    echo "== evaluation skipped (training rc $train_rc, or qwen3coder.eval.run_all not importable)"
fi
echo "== total $(( $(date +%s) - start ))s"
exit "$train_rc"
