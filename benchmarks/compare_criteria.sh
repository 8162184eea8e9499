#!/usr/bin/env bash
# Re-creates benchmarks/results/criteria_{mrpc,sst2}/: every exit criterion read off one full pass over the dev
# set of the same fine-tuned PABEE model, then the measured speed-up of each criterion's pick with `pabee bench`.
#
#   bash benchmarks/compare_criteria.sh      # from the repository root, inside the project's virtualenv
#
# Models: MRPC as the retired benchmarks/reproduce_glue.py trained it (mean pooling, 3 epochs, its hyper-parameters,
# below), SST-2 from benchmarks/bench_sst2.sh (20k sentences, 1 epoch); each is trained first if missing.
# criteria.md summarises these folders; benchmarks/criteria_report.py wrote it (retired: git show 331e1a0:benchmarks/criteria_report.py).
set -euo pipefail
GLUE_DIR=${GLUE_DIR:-../shared/glue}
MRPC_MODEL=${MRPC_MODEL:-runs/reproduce/MRPC/pabee_mean}
SST2_MODEL=${SST2_MODEL:-runs/sst2_bench_model}
RESULTS=benchmarks/results
CRITERIA=patience,entropy,confidence,patience+confidence,static

[ -f "$MRPC_MODEL/model.safetensors" ] || pabee run-glue --task_name MRPC --data_dir "$GLUE_DIR" --do_train --do_eval \
  --patience 1,2,3,4,5 --seed 42 --num_train_epochs 3 --per_device_train_batch_size 32 --learning_rate 0.0001 \
  --max_seq_length 128 --save_strategy no --overwrite_output_dir --output_dir "$MRPC_MODEL" --pooling mean
[ -f "$SST2_MODEL/model.safetensors" ] || MODEL="$SST2_MODEL" bash benchmarks/bench_sst2.sh

for pair in "MRPC:$MRPC_MODEL:mrpc" "SST-2:$SST2_MODEL:sst2"; do
  IFS=: read -r task model name <<< "$pair"
  pabee run-glue --task_name "$task" --data_dir "$GLUE_DIR" --model_name_or_path "$model" --do_eval \
    --exit_criterion "$CRITERIA" --patience 1,2,3,4,5 --output_dir "$RESULTS/criteria_$name" --overwrite_output_dir
done

# Wall clock: one setting per criterion, at similar layer speed-ups (batch 32, length-sorted, eager attention).
for pair in "MRPC:$MRPC_MODEL:mrpc" "SST-2:$SST2_MODEL:sst2"; do
  IFS=: read -r task model name <<< "$pair"
  pabee bench --model "$model" --task_name "$task" --data_dir "$GLUE_DIR" --batch_sizes 32 --sort_by_length \
    --attn_implementation eager --repeats 3 --warmup 1 --threads 2 --bs1_examples 64 \
    --exit_criterion "$CRITERIA" --patience 2 \
    --exit_threshold entropy=0.3 confidence=0.9 patience+confidence=0.9 static=4 \
    --output_dir "$RESULTS/criteria_$name/bench" --overwrite_output_dir
done
