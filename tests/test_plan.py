"""``coatnet plan``: the state bytes, the measured activations against a real run, the choice of
configuration, the command, and one-line refusals."""

import json
import shlex

import pytest
import torch

from coatnet import plan as planner
from coatnet.models import coatnet as coatnet_module
from coatnet.cli import build_parser, main
from coatnet.complexity import count_parameters
from coatnet.models import create_model
from coatnet.plan import ADAMW_STATE_BYTES, GiB, _divisors, make_plan, measure_activations


def _params(name: str, img_size: int) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name, img_size=img_size))


def test_state_bytes_ddp_replicated_fsdp_sharded():
    plan = make_plan("coatnet_pico", 32, batch_size=64, gpus=4, gpu_memory_gib=80)
    params = _params("coatnet_pico", 32)
    assert plan.params == params
    ddp, _, fsdp, _ = plan.options
    assert ddp.weights + ddp.gradients + ddp.optimizer == ADAMW_STATE_BYTES * params == 16 * params
    assert ddp.working == (4 + 2) * params  # gradient buckets, autocast's bfloat16 weights
    sharded = fsdp.weights + fsdp.gradients + fsdp.optimizer
    assert abs(sharded - 16 * params / 4) <= 3  # each rounded up to a whole byte
    largest_unit = max(planner._unit_sizes(create_model("coatnet_pico", img_size=32)))
    assert fsdp.working == 2 * 2 * largest_unit + (2 + 4) * largest_unit
    assert ddp.total == sum((ddp.weights, ddp.gradients, ddp.optimizer, ddp.working, ddp.activations, ddp.allowance))
    # one GPU trains without DDP (train.py wraps the model for more than one process): no buckets
    alone = make_plan("coatnet_pico", 32, batch_size=64, gpus=1, gpu_memory_gib=80).options[0]
    assert alone.working == 2 * params


def test_an_ema_is_planned_as_a_float32_copy_of_the_weights():
    """--ema (the fine-tuning recipe's) keeps a float32 copy of the weights: 4 B per parameter,
    sharded with FSDP; the printed command carries it."""
    plain = make_plan("coatnet_pico", 32, batch_size=64, gpus=4, gpu_memory_gib=80)
    averaged = make_plan("coatnet_pico", 32, batch_size=64, gpus=4, gpu_memory_gib=80, ema=0.9999)
    params = plain.params
    ddp, _, fsdp, _ = averaged.options
    assert ddp.ema == 4 * params and fsdp.ema == -(-4 * params // 4) and all(m.ema == 0 for m in plain.options)
    for before, after in zip(plain.options, averaged.options):
        assert after.total - after.allowance == before.total - before.allowance + after.ema
    assert averaged.command.endswith("--batch-size 64 --amp --ema 0.9999") and "--ema" not in plain.command


@pytest.mark.parametrize("amp", [False, True])
def test_meta_activations_match_a_real_cpu_forward(amp, monkeypatch):
    # The same hooks on real tensors, running the same operations: SDPA's math path on both devices
    # (the GPU kernel is CUDA's; the CPU trains with Eq. 3 as written, fast_path.attention).
    meta = measure_activations("coatnet_pico", 64, amp=amp, gpu_attention=False)
    monkeypatch.setattr(coatnet_module, "attention",
                        lambda q, k, v, bias: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    cpu = measure_activations("coatnet_pico", 64, amp=amp, device="cpu", gpu_attention=False)
    # float32: byte for byte; bfloat16: within 0.1% (a few per-channel statistics differ in dtype).
    tolerance = 0.001 if amp else 0.0
    for field in ("per_image", "per_image_checkpointed"):
        assert abs(getattr(meta, field) - getattr(cpu, field)) <= tolerance * getattr(cpu, field)
    # A real image of 64 px keeps some 8.5 MiB in float32, a little over half that in bfloat16.
    assert (4 if amp else 8) * 2**20 < cpu.per_image < (5 if amp else 9) * 2**20


def test_checkpointing_and_gpu_attention_lower_activations():
    math = measure_activations("coatnet_nano", 128, gpu_attention=False)
    gpu = measure_activations("coatnet_nano", 128)
    assert gpu.per_image_checkpointed < gpu.per_image / 1.5
    assert gpu.per_image < math.per_image  # no (N x N) probabilities kept
    assert gpu.per_step > 0 and gpu.per_step_checkpointed < gpu.per_step  # the biases, recomputed


def test_small_model_on_big_gpus_is_plain_ddp():
    plan = make_plan("coatnet_pico", 32, batch_size=256, gpus=8, gpu_memory_gib=80)
    assert (plan.strategy, plan.grad_checkpointing) == ("ddp", False)
    assert plan.per_gpu_batch == plan.micro_batch == 32 and plan.grad_accum_steps == 1
    assert plan.command == ("torchrun --nproc-per-node 8 -m coatnet train --model coatnet_pico --img-size 32 "
                            "--batch-size 256 --amp")


def test_huge_model_on_small_gpus_shards_checkpoints_and_accumulates():
    plan = make_plan("coatnet_7", 224, batch_size=4096, gpus=8, gpu_memory_gib=12, nodes=2)
    assert (plan.strategy, plan.grad_checkpointing) == ("fsdp", True)
    assert plan.per_gpu_batch == 256 and plan.micro_batch * plan.grad_accum_steps == 256 and plan.grad_accum_steps > 1
    assert plan.chosen.total <= 12 * GiB and plan.options[2].micro_batch < 8  # FSDP without checkpointing
    assert plan.options[0].micro_batch == plan.options[1].micro_batch == 0  # DDP: not one image
    assert plan.command.startswith("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d "
                                   "--rdzv-endpoint HOST:29500 -m coatnet train --model coatnet_7 ")
    assert plan.command.endswith(f"--fsdp --amp --grad-checkpointing --grad-accum-steps {plan.grad_accum_steps}")


def test_a_per_gpu_batch_that_divides_badly_is_said_with_a_better_one():
    """509 images per GPU (a prime) that do not fit at once go one at a time; the plan says which
    global batch would go 8 or more at a time. A batch of billions is planned as quickly as 4096."""
    plan = make_plan("coatnet_pico", 128, batch_size=1018, gpus=2, gpu_memory_gib=2)
    assert plan.micro_batch == 1 and plan.grad_accum_steps == 509
    assert plan.note == ("note: no micro-batch of 8 or more that divides 509 images per GPU fits, so each step takes 1 "
                         "at a time; --batch-size 1024 (512 per GPU) would run 8 or more at a time")
    better = make_plan("coatnet_pico", 128, batch_size=1024, gpus=2, gpu_memory_gib=2)
    assert better.micro_batch >= 8 and better.note == ""
    huge = make_plan("coatnet_pico", 32, batch_size=8 * 10**9, gpus=8)  # ran through 10**9 candidates before
    assert huge.micro_batch * huge.grad_accum_steps == 10**9
    assert _divisors(36) == [36, 18, 12, 9, 6, 4, 3, 2, 1] and _divisors(509) == [509, 1]


def test_printed_command_parses_as_coatnet_train(capsys):
    assert main(["plan", "--model", "coatnet_pico", "--img-size", "64", "--batch-size", "1024", "--gpus", "2",
                 "--gpu-memory", "2"]) == 0
    out = capsys.readouterr().out
    assert "GiB per GPU" in out and "activations (x micro-batch)" in out and "vs GPU memory" in out
    line = next(line for line in out.splitlines() if line.startswith("torchrun"))
    words = shlex.split(line)
    train_argv = words[words.index("coatnet") + 1:]
    assert "--grad-accum-steps" in train_argv  # 512 per GPU do not fit 2 GiB at once
    args = build_parser().parse_args(train_argv)
    assert (args.command, args.model, args.img_size, args.batch_size, args.amp) == ("train", "coatnet_pico", 64,
                                                                                      1024, True)
    assert args.grad_accum_steps > 1 and 512 % args.grad_accum_steps == 0


def test_json(capsys):
    assert main(["plan", "--model", "coatnet_pico", "--img-size", "32", "--batch-size", "16", "--gpus", "2",
                 "--no-amp", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["amp"] is False and plan["strategy"] == "ddp" and plan["micro_batch"] == 8
    assert len(plan["options"]) == 4 and plan["activations"]["probe"].startswith("meta, float32")
    assert "--amp" not in plan["command"]


@pytest.mark.parametrize("argv,message", [
    (["--model", "coatnet_pico", "--img-size", "32", "--gpu-memory", "0.5"],
     "coatnet plan: error: coatnet_pico at 32 px does not fit 0.5 GiB GPUs even with FSDP over 8 GPUs"),
    # the need is rounded up: never shown at or below the memory it does not fit
    (["--model", "coatnet_pico", "--img-size", "32", "--batch-size", "2048", "--gpus", "1", "--gpu-memory", "1.52"],
     "it needs 1.54 GiB per GPU"),
    (["--model", "coatnet_pico", "--batch-size", "100", "--gpus", "8"],
     "coatnet plan: error: --batch-size 100 does not split evenly across 8 GPUs"),
    (["--model", "coatnet_99"], "coatnet plan: error: unknown model 'coatnet_99'"),
    (["--model", "coatnet_0", "--gpu-memory", "-80"], "argument --gpu-memory: must be a finite number > 0"),
    (["--model", "coatnet_0", "--gpu-memory", "1e300"], "argument --gpu-memory: must be a finite number > 0 and <= "),
    (["--model", "coatnet_0", "--gpus", "0"], "argument --gpus: must be an integer >= 1"),
])
def test_refusals_are_one_line(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cpu_probe_when_meta_fails(monkeypatch):
    measure = planner.measure_activations

    def no_meta(name, img_size, amp=True, device="meta", gpu_attention=True):
        if device == "meta":
            raise NotImplementedError("no meta kernel")
        return measure(name, img_size, amp, device, gpu_attention)

    monkeypatch.setattr(planner, "measure_activations", no_meta)
    plan = make_plan("coatnet_pico", 128, batch_size=8, gpus=1)
    on_meta = measure("coatnet_pico", 128)  # what the probe stands in for
    assert plan.activations.probe.startswith("meta failed: CPU probe at 64 px x 4 (pixels)")
    assert abs(plan.activations.per_image / on_meta.per_image - 1) < 0.1


def test_a_hub_repository_is_refused_as_training_refuses_it(capsys, monkeypatch):
    """`coatnet train --model hf-hub:...` is refused: the plan says so at once, without reaching for the
    Hub (before: it fetched the repository's config, retrying for a minute offline, and printed a command
    that training refuses)."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")
    monkeypatch.setattr(planner, "create_model", no_model)
    assert main(["plan", "--model", "hf-hub:timm/coatnet_0_rw_224.sw_in1k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coatnet plan: error: --model takes a model name") and err.count("\n") == 1


def test_the_command_says_a_recipes_ema_is_not_planned(capsys):
    """--recipe imagenet1k-finetune, which the printed hint invites, trains with an EMA of the weights
    (4 B per parameter more): a plan without --ema says to plan it (before: nothing said so)."""
    argv = ["plan", "--model", "coatnet_pico", "--img-size", "32", "--batch-size", "16", "--gpus", "1"]
    assert main(argv) == 0
    assert "imagenet1k-finetune keeps an EMA of the weights, which this plan does not count" in capsys.readouterr().out
    assert main([*argv, "--ema", "0.9999"]) == 0
    assert "does not count" not in capsys.readouterr().out


@pytest.mark.parametrize("decay", ["0.9999999", "0.99999995", "1e-07"])
def test_the_commands_ema_is_the_decay_planned(capsys, decay):
    """The printed command's --ema is the decay given, digit for digit (before: six digits, so 0.9999999
    became `--ema 1`, which `coatnet train` refuses, and 0.99999995 another decay)."""
    assert main(["plan", "--model", "coatnet_pico", "--img-size", "32", "--batch-size", "64", "--ema", decay]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("torchrun"))
    words = shlex.split(line)
    args = build_parser().parse_args(words[words.index("coatnet") + 1:])
    assert args.ema == float(decay)


def test_a_non_square_size_is_refused_not_planned_as_a_square():
    """make_plan(img_size=(H, W)): training takes one square size; the plan measured and printed H x H
    without a word (before)."""
    with pytest.raises(ValueError, match=r"--img-size 32x64: training runs square images"):
        make_plan("coatnet_pico", (32, 64), batch_size=64)
    assert make_plan("coatnet_pico", (32, 32), batch_size=64).img_size == 32


def test_a_per_gpu_batch_under_8_that_fits_whole_has_no_note():
    """4 images per GPU that fit at once are the whole batch: no note of a better batch size."""
    plan = make_plan("coatnet_pico", 32, batch_size=32, gpus=8, gpu_memory_gib=80)
    assert plan.per_gpu_batch == plan.micro_batch == 4 and plan.grad_accum_steps == 1
    assert (plan.strategy, plan.grad_checkpointing) == ("ddp", False) and plan.note == ""
