#!/usr/bin/env bash
# The GPU path in one go (bf16, sdpa on CUDA, throughput and MFU, the default recipe end to end).
#   bash bench/gpu_checks.sh OUT_DIR [all|bench|peft|deepspeed]
#   (peft: QLoRA and LoRA hand-off on CUDA only, and both under ZeRO-3; deepspeed: the default recipe under ZeRO-3
#   through the deepspeed launcher, beside the same recipe in one plain process)
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
