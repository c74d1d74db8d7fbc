"""Our CoAtNet-0 on a GPU against a float64 reference on the CPU: logits of every inference path
(float32, bfloat16 autocast, a bfloat16 model, compile_for_inference) and the gradients of a
training step, eager and compiled with activation checkpointing. Prints one line per path:
relative error ||out - ref|| / ||ref|| and top-1 agreement.

Run by benchmarks/gpu_check.sh; ``python benchmarks/gpu_parity.py [DEVICE]`` (default cuda)."""

import argparse
import copy

import torch
import torch.nn.functional as F

import coatnet


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def main(device: str) -> None:
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_0", drop_path_rate=0.0)  # no random drops: one function to compare
    x, target = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    ref_model = copy.deepcopy(model).double()  # its training step moves BatchNorm's statistics
    with torch.no_grad():
        ref = ref_model.eval()(x.double())
    ref_model.train()
    F.cross_entropy(ref_model(x.double()), target).backward()
    ref_grad = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
    ref_model.zero_grad(set_to_none=True)

    model = model.float().to(device)
    xd = x.to(device)
    rows = []

    def check(name: str, forward, autocast: bool = False, dtype: torch.dtype = torch.float32) -> None:
        with torch.inference_mode(), torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            out = forward(xd.to(dtype)).float()
        rows.append((name, rel(out, ref), (out.argmax(1).cpu() == ref.argmax(1)).float().mean().item()))

    model.eval()
    check("float32", model)
    check("bfloat16 autocast", model, autocast=True)
    check("compile_for_inference, bfloat16 autocast", coatnet.compile_for_inference(model), autocast=True)
    bf16 = coatnet.create_model("coatnet_0", drop_path_rate=0.0)
    bf16.load_state_dict(model.state_dict())
    check("model.to(bfloat16)", bf16.to(device, torch.bfloat16).eval(), dtype=torch.bfloat16)

    start = copy.deepcopy(model.state_dict())
    model.train()
    for autocast in (False, True):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(xd), target.to(device))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        rows.append((f"training step gradients, {'bfloat16 autocast' if autocast else 'float32'}",
                     rel(grad, ref_grad), float("nan")))
        model.zero_grad(set_to_none=True)

    # --grad-checkpointing with --compile: the compiled recomputation gives the reference's
    # gradients and moves BatchNorm's statistics once, as an eager step does.
    eager, checkpointed = (coatnet.create_model("coatnet_0", drop_path_rate=0.0).to(device) for _ in range(2))
    for m in (eager, checkpointed):
        m.load_state_dict(start)
    checkpointed.set_grad_checkpointing(True)
    for m, forward in ((eager, eager), (checkpointed, torch.compile(checkpointed))):
        F.cross_entropy(forward(xd), target.to(device)).backward()
    grad = torch.cat([p.grad.flatten() for p in checkpointed.parameters()])
    rows.append(("training step gradients, compiled + checkpointing", rel(grad, ref_grad), float("nan")))

    def statistics(m):
        return torch.cat([b.flatten().double().cpu() for n, b in m.named_buffers() if "running" in n])
    rows.append(("  BatchNorm statistics after it, against eager", rel(statistics(checkpointed), statistics(eager)),
                 float("nan")))

    print(f"coatnet_0 on {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), "
          f"torch {torch.__version__}; reference: float64 on the CPU")
    for name, error, agree in rows:
        print(f"{name:44s} rel. error {error:.2e}" + ("" if agree != agree else f"  top-1 agreement {agree:.0%}"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("device", nargs="?", default="cuda", help="where to run our model (default: cuda)")
    main(parser.parse_args().device)
