#!/bin/bash
# flock /tmp/langenv-cpu.lock experiments/bench/real_model_iterations.sh   (BENCHMARKS.md "Real model: SmolLM2-135M")
# one iteration of every algorithm on SmolLM2-135M, tiny settings; wall time per run
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/smolbench}; mkdir -p "$OUT"
PY=${PY:-python}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1
for task in arithmetic gsm8k; do
for a in vineppo ppo vc-ppo grpo rloo dpo-plus restem sft reinforce; do
  extra="--samples-per-prompt 2 --minibatch-size 4 --micro-batch-size 2"
  [ $a = vineppo ] && extra="$extra --mc-rollouts 2"
  [ $a = vc-ppo ] && extra="$extra --value-pretrain-steps 2 --value-pretrain-heldout-prompts 2"
  [ $a = restem ] && extra="$extra --epochs 1 --validation-problems 2 --validation-samples 1 --early-stop-method last"
  [ $a = sft ] && extra=""
  s=$(date +%s.%N)
  $PY experiments/run.py algo:$a --task $task --model smollm2-135m --iterations 1 \
     --prompts-per-iteration 2 --max-new-tokens 64 --eval-problems 2 --no-eval-sampled \
     --wandb disabled --out $OUT/$a-$task --overwrite $extra > $OUT/$a-$task.log 2>&1
  rc=$?
  e=$(date +%s.%N)
  echo "$task $a rc=$rc wall=$(echo "$e - $s" | bc) s" >> $OUT/times.txt
done; done
