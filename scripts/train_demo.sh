#!/usr/bin/env bash
# The exact commands that produce the shipped demo model, medlava-tiny (see its model card).
# Runs on 2 CPU cores; writes everything under build/demo and copies the result into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${BUILD:-build/demo}
STEPS0=${STEPS0:-1500}    # stage 0 (vision tower) optimizer steps
EPOCHS1=${EPOCHS1:-1}     # stage 1 (projector alignment) epochs over the captions
EPOCHS2=${EPOCHS2:-3}     # stage 2 (instruction tuning) epochs over the instructions
N=${N:-3000}              # studies in the training world
JITTER=${JITTER:-0.5}     # intensity augmentation (train/augment.py): display brightness is not a finding

medlava synth --out "$B/world-train" --n "$N" --seed 1
medlava synth --out "$B/world-heldout" --n 120 --seed 777   # never used in training
medlava train init --world "$B/world-train" --out "$B/init" --vocab-size 1024
medlava train vision --world "$B/world-train" --model "$B/init" --out "$B/stage0" --steps "$STEPS0" --batch-size 32 --lr 1e-3 \
    --intensity-jitter "$JITTER"
medlava train align --data "$B/world-train/captions.json" --image-folder "$B/world-train/images" \
    --model "$B/stage0" --out "$B/stage1" --epochs "$EPOCHS1" --batch-size 32 --lr 2e-3 --intensity-jitter "$JITTER"
medlava train instruct --data "$B/world-train/instruct.json" --image-folder "$B/world-train/images" \
    --model "$B/stage1" --out "$B/stage2" --epochs "$EPOCHS2" --batch-size 16 --lr 1e-3 --shuffle-turns --save-every 100 \
    --intensity-jitter "$JITTER"
mkdir -p "$B/eval"
rm -rf "$B/medlava-tiny"
medlava convert "$B/stage2" "$B/medlava-tiny" --dtype bfloat16   # ships at half the size
mkdir -p src/medlava/models/medlava-tiny
cp "$B/medlava-tiny"/* src/medlava/models/medlava-tiny/   # keeps the model card (README.md) there
medlava eval vqa --questions "$B/world-heldout/questions.jsonl" --image-folder "$B/world-heldout/images" \
    --answers "$B/eval/answers.jsonl" --model src/medlava/models/medlava-tiny
medlava eval score --answers "$B/eval/answers.jsonl" --gold "$B/world-heldout/questions.jsonl"
medlava eval vqa --questions "$B/world-heldout/questions.jsonl" --image-folder "$B/world-heldout/images" \
    --answers "$B/eval/answers-shuffled.jsonl" --model src/medlava/models/medlava-tiny --shuffle-images 0
medlava eval score --answers "$B/eval/answers-shuffled.jsonl" --gold "$B/world-heldout/questions.jsonl"
