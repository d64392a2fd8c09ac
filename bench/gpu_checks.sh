#!/usr/bin/env bash
# The GPU path in one go (bf16, sdpa on CUDA, throughput and MFU, the default recipe end to end).
#   bash bench/gpu_checks.sh OUT_DIR [all|bench|peft|deepspeed|speed|online]
#   (peft: QLoRA and LoRA hand-off on CUDA only, and both under ZeRO-3; deepspeed: the default recipe under ZeRO-3
#   through the deepspeed launcher, beside the same recipe in one plain process; speed: issue 23 on one
#   H100/H200 in under 8 minutes: SFT at Llama-3.2-1B's shape, seq 4096, bf16 (MFU, posttrain vs the raw
#   loop vs TRL tuned for the device), padding-free with the auto micro-batch, the Kahan optimizer's
#   memory, and Llama-3.1-8B's shape full fine-tuned with bf16 stochastic-rounding AdamW; online: issue 23's
#   GRPO samples/s and DPO pairs/s at Llama-3.2-1B's shape in about 6 minutes, posttrain vs TRL)
# On a GPU machine with no package index: carry wheels of what it lacks in .whl/ (trl, datasets,
# hydra-core, omegaconf, antlr4-python3-runtime, transformers, dill, multiprocess; for peft:
# peft, bitsandbytes, pytest, pluggy, iniconfig; for deepspeed: its sdist and hjson, ninja,
# py-cpuinfo, einops, msgpack, pydantic(-core), annotated-types, typing-inspection, nvidia-ml-py);
# they are installed into /tmp/site first.
set -o pipefail
out=${1:-/tmp/gpu-checks}
what=${2:-all}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
if ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1 && { [ "$what" = deepspeed ] || [ "$what" = peft ]; }; then
  # a target of its own: pip --target does not add scripts (the `deepspeed` launcher) to an existing bin/
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/ds-site \
    .whl/deepspeed-*.tar.gz 2>&1 | tail -3
  export PYTHONPATH=/tmp/ds-site:$PYTHONPATH PATH=/tmp/ds-site/bin:$PATH
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, trl; print(torch.__version__, transformers.__version__, trl.__version__)" | tee -a "$out/gpu.txt"
if [ "$what" = deepspeed ]; then
  for setting in "" "deepspeed=zero3 launcher=deepspeed launcher.gpus=1"; do
    name=$(echo "${setting:-plain}" | cut -d' ' -f1 | tr -cd 'a-z0-9')
    /usr/bin/time -f "$name wall %e s" timeout 240 python3 -m posttrain.cli $setting run.output_dir="/tmp/ds-$name" \
      run.cache_dir="/tmp/ds-cache-$name" 2>&1 | grep -v -i warn | grep -v "^\[20" | tail -14 | tee -a "$out/deepspeed_runs.log"
    cp "/tmp/ds-$name/summary.json" "$out/summary-$name.json" 2>/dev/null
    cp "/tmp/ds-$name/launch/deepspeed-sft.json" "$out/deepspeed-sft-$name.json" 2>/dev/null
  done
  exit 0
fi
if [ "$what" = speed ]; then
  # every step has its own timeout; their sum (460 s) keeps the mode under 8 minutes
  flash=$(python3 -c "import importlib.util as u; print('flash_attention_2' if u.find_spec('flash_attn') else 'sdpa')")
  echo "attention for padding-free: $flash; liger: $(python3 -c "import importlib.util as u; print(bool(u.find_spec('liger_kernel')))")" \
    | tee "$out/speed.txt"
  # what the plan says: the auto micro-batch at 1B, the bytes per parameter of each optimizer at 8B
  for plan in "model=llama3_2_1b sft.per_device_train_batch_size=auto sft.global_batch_size=16 sft.max_length=4096" \
    "model=llama3_1_8b sft.optimizer=adamw_kahan_bf16" "model=llama3_1_8b sft.optimizer=adamw_sr_bf16"; do
    timeout 15 python3 -m posttrain.cli plan=true align=none run.tuned_for=null $plan run.output_dir=/tmp/speed-plan 2>&1 \
      | grep -E "memory:|micro-batch|activation|error" | tee -a "$out/speed.txt"
  done
  # each run's line as it finishes (a timeout still leaves them), the table, errors
  keep='^\[bench\]|^\||^posttrain:|Error|error:|Traceback|out of memory'
  cd bench
  # 1B, seq 4096, bf16 autocast with fp32 master weights: posttrain, the raw loop (before and after), TRL tuned
  timeout 140 python3 sft_throughput.py --size llama3_2_1b --seq 4096 --batch 4 --steps 30 --warmup 3 --budget 15 \
    --runs posttrain,raw,trl_tuned 2>&1 | grep -E "$keep" | tee "$out/speed_1b.log"
  # padding-free (flash-attention's varlen kernels when installed) with the micro-batch auto picks for 16 rows
  timeout 45 python3 sft_throughput.py --size llama3_2_1b --seq 4096 --batch 16 --steps 6 --warmup 1 --budget 10 \
    --runs posttrain --set sft.padding_free=true --set model.attn_implementation=$flash \
    --set sft.per_device_train_batch_size=auto --set sft.global_batch_size=16 2>&1 | grep -E "$keep" \
    | tee "$out/speed_1b_padding_free_auto.log"
  # bf16 weights with Kahan-compensated AdamW: its peak beside the default's (speed_1b.log)
  timeout 45 python3 sft_throughput.py --size llama3_2_1b --seq 4096 --batch 4 --steps 20 --warmup 2 --budget 10 \
    --runs posttrain --set sft.optimizer=adamw_kahan_bf16 2>&1 | grep -E "$keep" | tee "$out/speed_1b_kahan.log"
  # 8B, seq 4096, one sequence per micro-batch: bf16 stochastic-rounding AdamW (8 bytes per parameter)
  # and activation checkpointing as auto decides; the raw loop the same; TRL tuned with bf16 weights
  # (its AdamW keeps bf16 moments) and activation checkpointing
  timeout 185 python3 sft_throughput.py --size llama3_1_8b --seq 4096 --batch 1 --steps 20 --warmup 2 --budget 12 \
    --runs posttrain,raw,trl_tuned --trl-checkpointing --set sft.optimizer=adamw_sr_bf16 2>&1 | grep -E "$keep" \
    | tee "$out/speed_8b.log"
  cd ..
  cp bench/results/sft_throughput.jsonl "$out/" 2>/dev/null
  exit 0
fi
if [ "$what" = online ]; then
  # every step has its own timeout; their sum (350 s) keeps the mode under 6 minutes
  keep='^\[bench\]|^\||Error|error:|Traceback|out of memory'
  echo "vllm: $(python3 -c "import importlib.util as u; print(bool(u.find_spec('vllm')))")" | tee "$out/online.txt"
  cd bench
  # GRPO samples/s at 1B: posttrain's grpo stage vs TRL's GRPOTrainer tuned (bf16, sdpa or flash, vLLM if installed)
  timeout 200 python3 grpo_throughput.py --size llama3_2_1b --prompts-per-step 8 --num-generations 8 \
    --max-completion-length 128 --steps 8 --warmup 2 --budget 45 2>&1 | grep -E "$keep" | tee "$out/grpo_1b.log"
  # DPO pairs/s at 1B, one beta: posttrain's dpo stage vs TRL's DPOTrainer defaults
  timeout 150 python3 dpo_sweep.py --size llama3_2_1b --seq 1024 --batch 8 --steps 10 --betas 0.1 2>&1 \
    | grep -E "$keep" | tee "$out/dpo_1b.log"
  cd ..
  cp bench/results/grpo_throughput.jsonl bench/results/dpo_sweep.jsonl "$out/" 2>/dev/null
  exit 0
fi
if [ "$what" = peft ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/integration/test_lora_handoff.py -k qlora -rsf --tb=short 2>&1 \
    | grep -v -i warn | grep -v "^\[posttrain\]\|^|" | tail -60 | tee "$out/qlora_tests.log"
  fast="data.builtin.num_sft=256 data.builtin.num_preference=128 data.builtin.num_test=32 sft.max_steps=12
    sft.per_device_train_batch_size=16 sft.learning_rate=3e-3 align.max_steps=6 align.per_device_train_batch_size=16
    align.learning_rate=3e-4 sft.eval.num_prompts=16 align.eval.num_prompts=16"
  # QLoRA and LoRA under ZeRO-3 (one GPU is enough to partition, gather and merge through DeepSpeed)
  for peft in "peft=qlora" "peft=lora peft.handoff=stack" "peft=qlora deepspeed=zero3 launcher=deepspeed launcher.gpus=1" \
    "peft=lora deepspeed=zero3 launcher=deepspeed launcher.gpus=1"; do
    timeout 200 python3 -m posttrain.cli $peft $fast run.output_dir="/tmp/run-${peft//[^a-z]/}" \
      run.cache_dir=/tmp/posttrain-cache 2>&1 | grep -v -i warn | tail -8 | tee -a "$out/peft_runs.log"
  done
  exit 0
fi
(cd bench && timeout 240 python3 sft_throughput.py --size qwen0.5b --seq 2048 --batch 8 --steps 10 --profile) 2>&1 \
  | grep -v -i warn | tee "$out/sft_throughput.log"
(cd bench && timeout 150 python3 sft_throughput.py --size qwen0.5b --seq 2048 --batch 8 --steps 10 \
  --set sft.group_by_length=true) 2>&1 | grep -v -i warn | tail -8 | tee "$out/sft_throughput_grouped.log"
(cd bench && timeout 200 python3 dpo_sweep.py --size qwen0.5b --seq 1024 --batch 8 --steps 30) 2>&1 \
  | grep -v -i warn | tail -8 | tee "$out/dpo_sweep.log"
if [ "$what" = all ]; then
  timeout 200 python3 -m posttrain.cli run.output_dir=/tmp/default-run run.cache_dir=/tmp/posttrain-cache 2>&1 \
    | grep -v -i warn | tail -40 | tee "$out/default_recipe.log"
fi
cp bench/results/*.jsonl "$out/" 2>/dev/null
