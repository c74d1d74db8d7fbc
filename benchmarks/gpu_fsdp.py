"""The memory a sharded run takes beside what ``coatnet plan`` predicted for it.

For each of the plan's FSDP options (without and with activation checkpointing), one epoch of
``coatnet train --fsdp --amp`` on the embedded digits under torchrun, with the option's micro-batch;
then the run's own record of its peak GPU memory (``gpu_peak_gib``: tensors, ``gpu_reserved_gib``:
what PyTorch's allocator took) beside the plan's total without and with its allowance.

    python benchmarks/gpu_fsdp.py [--model coatnet_5] [--img-size 224] [--batch-size 128]

Run by benchmarks/gpu_check.sh on a GPU machine (one process: on one GPU FSDP shards nothing, so
this checks the plan's terms, not the sharding, which tests/test_fsdp.py checks on 2 processes)."""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from coatnet.plan import format_plan, make_plan

GiB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="coatnet_5")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per training run")
    args = parser.parse_args()
    on_gpu = args.device.startswith("cuda")
    memory = torch.cuda.get_device_properties(0).total_memory / GiB if on_gpu else 80.0
    plan = make_plan(args.model, args.img_size, args.batch_size, gpus=1, gpu_memory_gib=memory)
    print(format_plan(plan), flush=True)
    rows = []
    for option in (m for m in plan.options if m.strategy == "fsdp" and m.micro_batch > 0):
        run_dir = Path(tempfile.mkdtemp(prefix="fsdp-"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "coatnet", "train",
                   "--model", args.model, "--img-size", str(args.img_size), "--batch-size", str(args.batch_size),
                   "--epochs", "1", "--amp", "--fsdp", "--grad-accum-steps", str(args.batch_size // option.micro_batch),
                   "--workers", "8", "--device", args.device, "--output-dir", str(run_dir / "run")]
        command += ["--grad-checkpointing"] if option.grad_checkpointing else []
        print("\n$", " ".join(command[1:]), flush=True)
        launcher = subprocess.Popen(command)
        try:
            try:
                launcher.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                # SIGTERM, which torchrun passes on: its workers run in sessions of their own and
                # would outlive a SIGKILL, holding the GPU's memory through the next option's run
                launcher.terminate()
                launcher.wait()
                raise
            history = (run_dir / "run" / "metrics.jsonl").read_text().splitlines()
            metrics = json.loads(history[-1])
        except (subprocess.TimeoutExpired, OSError, IndexError) as e:
            print(f"no result: {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoint: weights and AdamW state, GBs
        rows.append((option, metrics))

    print(f"\n{args.model} at {args.img_size} px, batch {args.batch_size}, FSDP bfloat16 on 1 "
          f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}, torch {torch.__version__}")
    print(f"{'option':14s} {'micro-batch':>11s} {'planned GiB':>12s} {'measured GiB':>13s} {'planned +allow.':>16s} "
          f"{'reserved GiB':>13s} {'img/s':>7s}")
    for m, h in rows:
        name = "FSDP + ckpt" if m.grad_checkpointing else "FSDP"
        print(f"{name:14s} {m.micro_batch:11d} {(m.total - m.allowance) / GiB:12.1f} "
              f"{h.get('gpu_peak_gib', float('nan')):13.1f} {m.total / GiB:16.1f} "
              f"{h.get('gpu_reserved_gib', float('nan')):13.1f} {h['images_per_second']:7.1f}")


if __name__ == "__main__":
    main()
