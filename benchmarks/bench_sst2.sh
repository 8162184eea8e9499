#!/usr/bin/env bash
# Re-creates benchmarks/results/bench_sst2*/: fine-tunes PABEE (bundled MiniLM) on SST-2, then times inference
# on the whole SST-2 dev set with `pabee bench`, with plain and with length-sorted batches.
#
#   bash benchmarks/bench_sst2.sh            # from the repository root, inside the project's virtualenv
#
# The model is trained on the first $TRAIN_SAMPLES SST-2 training sentences for one epoch (CPU budget), which
# is enough for exits to behave as on a fully trained model; set TRAIN_SAMPLES=67349 for the full set.
set -euo pipefail
GLUE_DIR=${GLUE_DIR:-../shared/glue}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-20000}
MODEL=${MODEL:-runs/sst2_bench_model}
RESULTS=benchmarks/results

if [ ! -f "$MODEL/model.safetensors" ]; then
  pabee run-glue --task_name SST-2 --data_dir "$GLUE_DIR/SST-2" --do_train --do_eval \
    --max_train_samples "$TRAIN_SAMPLES" --num_train_epochs 1 --per_device_train_batch_size 32 \
    --learning_rate 1e-4 --patience 1,2,3,4,5 --save_strategy no --seed 42 --output_dir "$MODEL"
fi
mkdir -p "$RESULTS/sst2_model"
cp "$MODEL/eval_results.md" "$MODEL/eval_results.json" "$MODEL/patience_curve.png" "$RESULTS/sst2_model/"

common=(--model "$MODEL" --task_name SST-2 --data_dir "$GLUE_DIR" --patience 1,2,3 --batch_sizes 8,32
        --repeats 5 --warmup 1 --threads 2 --seed 0 --overwrite_output_dir)
pabee bench "${common[@]}" --profile --training_cost --output_dir "$RESULTS/bench_sst2"
pabee bench "${common[@]}" --sort_by_length --output_dir "$RESULTS/bench_sst2_sorted"
pabee bench "${common[@]}" --sort_by_length --attn_implementation eager --output_dir "$RESULTS/bench_sst2_sorted_eager"
python benchmarks/bench_targets.py "$RESULTS"/bench_sst2*/bench.json
