#!/usr/bin/env bash
# The README's GPU figures in one lease of a GPU machine (issues 13 and 15), each stage's output in
# OUT_DIR/STAGE.txt:
#   fsdp     one epoch of FSDP bfloat16 training of CoAtNet-5 at 224 px per `coatnet plan` option,
#            its peak memory beside the plan's prediction (benchmarks/gpu_fsdp.py)
#   parity   every inference path and a training step on the GPU against float64 on the CPU
#   bench-*  `coatnet bench --compare timm`: bfloat16 with compiled rows, float32, float32 compiled,
#            TF32 compiled
#   profile, profile-compiled  where the GPU's time goes, ours beside timm's (benchmarks/gpu_profile.py)
#   modes    the bfloat16 training step with activation checkpointing, eager and compiled, and
#            compiled inference with CUDA graphs (gpu_profile.py's ckpt and cudagraphs variants)
# Usage, from the repository's root: bash benchmarks/gpu_check.sh OUT_DIR [STAGE...] (default: all)
# On an H100 fsdp took about 2.5 minutes; on an H200 parity 1-2, modes 4, bench-bf16 2, bench-fp32 0.5,
# bench-fp32-compiled and bench-tf32-compiled 1.5 each (2 at batch 128), profile 1 and
# profile-compiled 2: about 16 in all, more than one lease: name the stages you need.
# The machine's python3 needs torch, torchvision, timm, safetensors, huggingface_hub, scikit-learn,
# tqdm and matplotlib; the package itself is taken from src/.
set -uo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then  # this header, less its comment signs
  sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0
fi
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [STAGE...]}
shift
all_stages="fsdp parity modes bench-bf16 bench-fp32 bench-fp32-compiled bench-tf32-compiled profile profile-compiled"
stages=${*:-$all_stages}
for s in $stages; do
  [[ " $all_stages " == *" $s "* ]] || { echo "unknown stage '$s'; the stages: $all_stages" >&2; exit 2; }
done
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
batch=${BENCH_BATCH:-128}
# float32 compiled at half the batch by default: at 128 the nine processes need more than 80 GiB
# together (an H100's); on an H200, COMPILED_BATCH=128
compiled_batch=${COMPILED_BATCH:-$((batch / 2))}

stage() {  # NAME SECONDS COMMAND...: the command's output and exit status in $out/NAME.txt
  local name=$1 limit=$2; shift 2
  [[ " $stages " == *" $name "* ]] || return 0
  echo "== $name ($(date +%T)): $*" | tee "$out/$name.txt"
  timeout "$limit" "$@" >> "$out/$name.txt" 2>&1
  local status=$?
  echo "exit status $status ($(date +%T))" | tee -a "$out/$name.txt"
  [[ $status == 0 ]] || failed+=" $name"
}
failed=

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; lscpu | grep 'Model name'
  $py -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
} > "$out/env.txt" 2>&1
stage fsdp 330 $py benchmarks/gpu_fsdp.py --model "${FSDP_MODEL:-coatnet_5}" --img-size 224 --batch-size 128
stage parity 120 $py benchmarks/gpu_parity.py cuda
stage modes 330 $py benchmarks/gpu_profile.py coatnet-bfloat16-inference-compiled \
  coatnet-bfloat16-inference-compiled-cudagraphs coatnet-bfloat16-train coatnet-bfloat16-train-ckpt \
  coatnet-bfloat16-train-compiled coatnet-bfloat16-train-compiled-ckpt
stage bench-bf16 240 $py -m coatnet bench --compare timm --device cuda --dtype bfloat16 --compile --batch-size "$batch" --repeats 20
stage bench-fp32 120 $py -m coatnet bench --compare timm --device cuda --batch-size "$batch" --repeats 20
stage bench-fp32-compiled 240 $py -m coatnet bench --compare timm --device cuda --compile --batch-size "$compiled_batch" --repeats 20
stage bench-tf32-compiled 240 $py -m coatnet bench --compare timm --device cuda --dtype tf32 --compile --batch-size "$compiled_batch" --repeats 20
stage profile 150 $py benchmarks/gpu_profile.py coatnet-bfloat16-inference timm-bfloat16-inference \
  coatnet-bfloat16-train timm-bfloat16-train coatnet-float32-inference coatnet-bfloat16-inference-folded \
  coatnet-float32-inference-folded
stage profile-compiled 330 $py benchmarks/gpu_profile.py coatnet-float32-inference-compiled \
  timm-float32-inference-compiled coatnet-float32-inference-compiled-tf32 coatnet-bfloat16-inference-compiled

cat "$out/env.txt"
for f in $stages; do [[ -f $out/$f.txt ]] && { echo; tail -n 16 "$out/$f.txt"; }; done
[[ -z $failed ]] || { echo "failed:$failed"; exit 1; }
