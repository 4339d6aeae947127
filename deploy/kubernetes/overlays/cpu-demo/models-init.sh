#!/bin/sh
# Writes the cpu-demo's models to a directory (the shared volume, in the
# encore-models Job):
#
#   $ENCORE_MODELS_DIR/base/                  tiny base policy (pretrained)
#   $ENCORE_MODELS_DIR/rewards/quality/       quality regressor (ratings)
#   $ENCORE_MODELS_DIR/rewards/adherence/     prompt-adherence dual encoder
#   $ENCORE_MODELS_DIR/rewards/preference/    Bradley-Terry preference model
#   $ENCORE_MODELS_DIR/READY                  written last
#
# Does nothing when READY is already there. The sizes default to a demo that
# learns something in a few minutes of CPU; scripts/observe-check.sh runs
# this same script with much smaller ones.
set -eu

models="${ENCORE_MODELS_DIR:?set ENCORE_MODELS_DIR to the models directory}"
scratch="${ENCORE_SCRATCH_DIR:-/tmp/encore-models-init}"
pretrain_steps="${DEMO_PRETRAIN_STEPS:-300}"
records="${DEMO_REWARD_RECORDS:-2000}"
epochs="${DEMO_REWARD_EPOCHS:-3}"

if [ -f "$models/READY" ]; then
    echo "models already in $models (remove $models/READY to write them again)"
    exit 0
fi
mkdir -p "$models/rewards" "$scratch"

echo "==> base policy: tiny preset, $pretrain_steps steps"
encore pretrain --preset tiny --steps "$pretrain_steps" --follow-prompts 0 \
    --out "$models/base"

echo "==> quality model on $records rated clips"
encore reward data ratings --n "$records" --out "$scratch/ratings.jsonl"
encore reward train quality --data "$scratch/ratings.jsonl" --epochs "$epochs" \
    --out "$models/rewards/quality"

# The other two start their audio tower from the quality model's.
echo "==> adherence model on $records captioned clips"
encore reward data clips --n "$records" --out "$scratch/clips.jsonl"
encore reward train adherence --data "$scratch/clips.jsonl" --epochs "$epochs" \
    --init-audio "$models/rewards/quality" --out "$models/rewards/adherence"

echo "==> preference model on $records pairs"
encore reward data preferences --n "$records" --out "$scratch/preferences.jsonl"
encore reward train preference --data "$scratch/preferences.jsonl" --epochs "$epochs" \
    --init-audio "$models/rewards/quality" --out "$models/rewards/preference"

rm -rf "$scratch"
touch "$models/READY"
echo "==> models ready in $models"
