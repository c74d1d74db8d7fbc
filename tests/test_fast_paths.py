"""Every fast path computes what the plain path computes, to 1e-5 in float32 and to bfloat16's
precision in bfloat16.

The inference fast paths (BatchNorm folded into the conv, the activation fused as a oneDNN
post-op of the conv and of the FFN's first linear layer, squeeze-excitation scaling in place,
MBConv over chunks of a wide batch) run when autograd is off; with autograd on, the same eval-mode
model runs its plain layers. They compute a module without calling its submodules, so they step
aside for what must see those calls: hooks, a BatchNorm left in train mode, layers of other kinds,
forward-mode AD and torch.func's transforms, dispatch modes such as FlopCounterMode. The
attention's explicit formula, where a gradient is wanted, gives PyTorch's fused kernel's outputs and
gradients, and the squeeze-excitation's mean mean()'s.
Activation checkpointing must leave outputs, gradients and BatchNorm statistics unchanged.
"""

import pytest
import torch
import torch.nn.functional as F

import coatnet
import coatnet.models.fast_path as fast_path
from coatnet.models.coatnet import MBConv
from coatnet.models.fast_path import ConvBNAct
from conftest import randomise_norms


# Our paper models (GELU), and rw variants for SiLU, ReLU-in-SE, SE before the depthwise norm,
# strides by pooling and the MLP relative position bias.
MODELS = [("coatnet_pico", 32), ("coatnet_0", 64), ("c_t_t_t", 64), ("coatnet_0_rw", 64),
          ("coatnet_rmlp_nano_rw", 64)]


@pytest.mark.parametrize("name,size", MODELS)
def test_inference_fast_paths_match_the_plain_path(name, size):
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model(name, img_size=size)).eval()
    x = torch.randn(3, 3, size, size)
    with torch.enable_grad():  # autograd on: the plain layers
        plain = model(x).detach()
    with torch.inference_mode():  # folded, fused, in place
        fast = model(x)
        again = model(x)
    with torch.no_grad():
        no_grad = model(x)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_grad, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, fast)


def _fast_and_plain(model, x):
    """The output at inference, the fast path, and with autograd on, the plain layers."""
    with torch.inference_mode():
        fast = model(x)
    with torch.enable_grad():
        plain = model(x).detach()
    return fast, plain


ONEDNN_BF16 = torch.bfloat16 in fast_path._ONEDNN_DTYPES


FUSED_KERNELS = {"mkldnn::_convolution_pointwise", "mkldnn::_linear_pointwise", "aten::baddbmm"}


def _fused_kernels(run) -> set[str]:
    """The fused kernels that ``run()`` calls: oneDNN's conv and linear with post-ops, and the
    batched matmul of the SE-scaled projection."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {e.key for e in profile.key_averages()} & FUSED_KERNELS


@pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("how", ["autocast", "model"])
def test_bfloat16_fast_paths_are_fused_and_match_the_plain_path(how):
    """bfloat16 as users run it: autocast around a float32 model, or the model converted. The fused
    kernels run (the convs' BatchNorm and GELU, the FFN's GELU, MBConv's SE scaling and residual add
    in its projection), and the logits are as close to the float32 model's as the plain bfloat16
    layers' are."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_0", img_size=64, num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        full = model(x)
    if how == "model":
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=how == "autocast")

    def fast():
        with torch.inference_mode(), autocast:
            return model(x).float()

    with torch.enable_grad(), autocast:
        plain = model(x).detach().float()
    assert _fused_kernels(fast) == FUSED_KERNELS
    scale = full.abs().max().item()
    torch.testing.assert_close(plain, full, rtol=0, atol=0.03 * scale)  # what bfloat16 costs anyway
    torch.testing.assert_close(fast(), full, rtol=0, atol=0.03 * scale)
    torch.testing.assert_close(fast(), plain, rtol=0, atol=0.03 * scale)


def test_scaled_projection_is_the_scaling_the_conv_and_the_add():
    """MBConv's bfloat16 fast path folds the SE scale into each image's copy of the projection's
    weight: the same function as scaling, convolving and adding (checked here in float32)."""
    torch.manual_seed(0)
    project = torch.nn.Conv2d(12, 5, 1)
    hidden = torch.randn(3, 12, 6, 7).contiguous(memory_format=torch.channels_last)
    scale, residual = torch.rand(3, 12, 1, 1), torch.randn(3, 5, 6, 7)
    with torch.inference_mode():
        out = fast_path.scaled_projection(project, hidden, scale, residual, torch.float32)
        torch.testing.assert_close(out, residual + project(hidden * scale), atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_formula_gives_the_fused_kernels_outputs_and_gradients(dtype):
    """Where the bias needs a gradient (training on the CPU), Eq. 3 is computed as written; it
    must agree with ``F.scaled_dot_product_attention`` in value and in every gradient."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 3, 16, 16, dtype=dtype, requires_grad=True)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    out = fast_path.attention(q, k, v, bias)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias))
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    reference_grads = torch.autograd.grad(reference.float().square().sum(), (q, k, v, bias))
    torch.testing.assert_close(out, reference, **tolerance)
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g, r, **tolerance)


def test_fast_path_really_runs_and_follows_updates(monkeypatch):
    """The folded weights are used at inference, and follow a change of a parameter or statistic."""
    torch.manual_seed(0)
    unit = randomise_norms(ConvBNAct(8, 16, 3)).eval()
    x = torch.randn(2, 8, 10, 10)
    folds = []
    fold = fast_path.fold_batch_norm
    monkeypatch.setattr(fast_path, "fold_batch_norm", lambda conv, norm: folds.append(1) or fold(conv, norm))
    with torch.inference_mode():
        unit(x)
    assert folds
    with torch.no_grad():
        unit[1].running_var.mul_(3.0)
        unit[0].weight.add_(0.1)
    torch.testing.assert_close(*_fast_and_plain(unit, x), atol=1e-5, rtol=1e-5)


def test_spatial_mean_is_the_mean_with_its_gradient():
    """The squeeze-excitation's mean: gradcheck in float64, and a whole SE forward and backward as
    training runs it (the gradient of the mean added to the scaling's) against torchvision's."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_path.SpatialMean.apply, (x,), check_forward_ad=True)
    # torch.func's transforms: jacrev runs the backward under vmap
    torch.testing.assert_close(torch.func.jacrev(fast_path.SpatialMean.apply)(x),
                               torch.func.jacrev(lambda t: t.mean((2, 3), keepdim=True))(x))
    torch.manual_seed(0)
    se = fast_path.SqueezeExcite(16, 4, activation=torch.nn.GELU)
    for dtype, tolerance in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        x = torch.randn(3, 16, 14, 14).contiguous(memory_format=torch.channels_last)
        grad = torch.randn_like(x)
        results = []
        for scale in (se._scale, super(fast_path.SqueezeExcite, se)._scale):  # ours, torchvision's
            leaf = x.clone().requires_grad_()
            with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
                hidden = leaf * 2  # the scaled map is an intermediate, as in MBConv
                out = hidden * scale(hidden)
            out.backward(grad.to(out.dtype))
            results.append((out.float(), leaf.grad, *(p.grad.clone() for p in se.parameters())))
            se.zero_grad()
        for ours, theirs in zip(*results):
            torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


def test_torch_func_grad_through_the_model():
    """The input gradient by torch.func.grad, forward-mode AD and autograd agree (eval mode: what
    saliency maps and adversarial examples take)."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=4).eval()
    x, direction = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    by_func = torch.func.grad(lambda t: model(t).sum())(x)
    leaf = x.clone().requires_grad_()
    model(leaf).sum().backward()
    torch.testing.assert_close(by_func, leaf.grad)
    forward_ad = torch.autograd.forward_ad
    with forward_ad.dual_level():  # the derivative along one direction
        tangent = forward_ad.unpack_dual(model(forward_ad.make_dual(x, direction))).tangent
    torch.testing.assert_close(tangent.sum(), (leaf.grad * direction).sum(), rtol=1e-4, atol=1e-4)


def test_off_the_cpu_the_plain_layers_run(monkeypatch):
    """On a GPU the folded conv's bias and the squeeze-excitation's average pool are slower than the
    plain layers (docs/performance.md: the H200 profile): off the CPU (here the meta device) neither runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a CPU fast path ran off the CPU")
    monkeypatch.setattr(fast_path, "fold_batch_norm", refuse)
    monkeypatch.setattr(F, "avg_pool2d", refuse)
    with torch.device("meta"):
        model = coatnet.create_model("coatnet_pico").eval()
        with torch.inference_mode():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_fast_paths_after_training_steps():
    """Inference, training, inference: each sees the current weights, and training is unaffected."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=4)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model.eval()
        with torch.inference_mode():
            fast = model(x)
        with torch.enable_grad():
            plain = model(x).detach()
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        model.train()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_channels_last_input_gives_the_same_result():
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x),
                                   atol=1e-5, rtol=1e-5)


def test_mbconv_runs_a_wide_batch_in_even_chunks(monkeypatch):
    """At inference, a block whose hidden tensor would pass MAX_HEAP_BLOCK runs the batch in chunks
    of even size, with the plain path's result; with autograd on, in one piece."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_0", img_size=64)).eval()
    block = model.stages[0][1]  # S1's second block: 384 hidden channels at 16x16 for a 64x64 input
    monkeypatch.setattr(fast_path, "MAX_HEAP_BLOCK", 2 * 384 * 16 * 16 * 4)  # two images' hidden tensors
    calls, mbconv_inference = [], fast_path.mbconv_inference

    def chunk(b, x):  # the chunks' calls
        if b is block:
            calls.append(len(x))
        return mbconv_inference(b, x)
    monkeypatch.setattr(fast_path, "mbconv_inference", chunk)
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        chunked = model(x)
    assert calls == [2, 2, 1]  # 3 chunks: the fewest that fit, evened out
    calls.clear()
    with torch.enable_grad():
        plain = model(x).detach()
    assert calls == []  # the plain block, whole
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    assert chunked.shape == (5, 1000)


def test_an_image_too_large_for_the_heap_runs_whole(monkeypatch):
    """A single image whose hidden tensor passes MAX_HEAP_BLOCK cannot be split further: it runs
    whole (coatnet_3_rw at its own 224 px is such a model in float32)."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", img_size=32, num_classes=10)).eval()
    monkeypatch.setattr(fast_path, "MAX_HEAP_BLOCK", 1024)  # below one image's hidden tensor
    torch.testing.assert_close(*_fast_and_plain(model, torch.randn(3, 3, 32, 32)), atol=1e-5, rtol=1e-5)


def test_float64_under_bfloat16_autocast_stays_float64():
    """Autocast leaves float64 alone; so does the fast path."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", img_size=32, num_classes=10)).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.autocast("cpu", torch.bfloat16):
        fast, plain = _fast_and_plain(model, x)
    assert fast.dtype == plain.dtype == torch.float64
    torch.testing.assert_close(fast, plain, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name,size", [("coatnet_pico", 32), ("coatnet_rmlp_nano_rw", 64)])
def test_grad_checkpointing_changes_nothing(name, size):
    """Same loss, gradients and BatchNorm running statistics (updated once per step, not twice)."""
    def step(checkpointing: bool):
        torch.manual_seed(0)
        model = coatnet.create_model(name, img_size=size, num_classes=5, drop_path_rate=0.0).train()
        for m in model.modules():  # the MLP bias's dropout draws from the RNG: keep both runs alike
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.set_grad_checkpointing(checkpointing)
        x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers()}

    loss0, grads0, buffers0 = step(False)
    loss1, grads1, buffers1 = step(True)
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=1e-5)
    for n, g in grads0.items():
        torch.testing.assert_close(grads1[n], g, atol=1e-5, rtol=1e-5, msg=n)
    for n, b in buffers0.items():
        torch.testing.assert_close(buffers1[n], b, atol=1e-5, rtol=1e-5, msg=n)


# -- the fast path keeps no state: right after any change of the weights, in any mode, any thread --


def _pico(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_norms(coatnet.create_model("coatnet_pico", num_classes=10)).eval()


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    copy = coatnet.create_model("coatnet_pico", num_classes=10).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_inference_sees_fused_optimizer_steps_and_in_place_copies():
    """Fused AdamW and ``p.data.copy_`` change weights without bumping their version counters; the
    next inference must still use the new weights (as a fresh model given the same state dict)."""
    model = _pico()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model(x)  # a first inference, whose derived weights a cache would keep
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()  # eval mode: BatchNorm frozen
    optimizer.step()
    with torch.no_grad():
        assert torch.equal(model(x), _fresh_copy(model)(x))
        other = _pico(seed=1)
        for p, q in zip(model.parameters(), other.parameters()):
            p.data.copy_(q.data)
        assert torch.equal(model(x), _fresh_copy(model)(x))


def test_model_built_under_inference_mode():
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model = _pico()
        fast = model(x)
    reference = _pico()
    with torch.enable_grad():
        torch.testing.assert_close(fast, reference(x).detach(), atol=1e-5, rtol=1e-5)


def test_model_moved_to_bfloat16_after_float32_inference():
    model = _pico()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        full = model(x)
        model.to(torch.bfloat16)
        half = model(x.bfloat16()).float()
    torch.testing.assert_close(half, full, atol=0.05 * full.abs().max().item(), rtol=0.05)


def test_called_from_two_threads_at_once():
    import threading

    model = _pico()
    inputs = [torch.randn(3, 3, 32, 32) for _ in range(2)]
    with torch.inference_mode():
        expected = [model(x) for x in inputs]
    results = [[] for _ in inputs]

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(5):
                results[i].append(model(inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in enumerate(results):
        assert len(outs) == 5 and all(torch.equal(out, expected[i]) for out in outs)


def test_compile_for_inference_in_bfloat16_gives_the_float32_logits():
    """The frozen compiled snapshot of a bfloat16 model agrees with the float32 model to bfloat16's
    precision (Inductor on the CPU: about 20 s of compiling)."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", img_size=32, num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        served = coatnet.compile_for_inference(model.to(torch.bfloat16))
        logits = served(x.to(torch.bfloat16)).float()
    torch.testing.assert_close(logits, expected, rtol=0, atol=0.02 * expected.abs().max().item())
    assert logits.argmax(1).tolist() == expected.argmax(1).tolist()


# -- the fast path steps aside for what must see each submodule's call --


def _plain(model, x):
    """The eval model's output with autograd on: its plain layers, every submodule called."""
    with torch.enable_grad():
        return model(x).detach()


def test_forward_hooks_see_the_plain_path(monkeypatch):
    """A hook on a submodule (one that changes its output, one that keeps it, and pruning's, which
    recomputes the weight) gets what the plain path gives it, and so does the model's output; a
    block's hook fires once per call, with the whole batch, where the block would run in chunks."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    model = _pico()
    handle = model.stem[0][0].register_forward_hook(lambda module, args, out: out * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)
    handle.remove()

    from torch.nn.utils import prune

    prune.l1_unstructured(model.stem[0][0], "weight", amount=0.3)
    with torch.no_grad():
        model.stem[0][0].weight_orig.mul_(2)  # the pruned weight is recomputed from it by a hook
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)

    kept = []
    depthwise = model.stages[0][0].residual.depthwise
    depthwise.register_forward_hook(lambda module, args, out: kept.append((out, out.clone())))
    with torch.no_grad():
        model(x)
    assert torch.equal(*kept[0])  # not scaled in place afterwards

    calls = []
    model.stages[0][0].register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    with torch.inference_mode():
        model(x)
        if ONEDNN_BF16:  # the block's bfloat16 path too
            model.to(torch.bfloat16)(x.bfloat16())
    assert calls == [4] * (1 + ONEDNN_BF16)

    model = randomise_norms(coatnet.create_model("coatnet_0", img_size=64)).eval()
    monkeypatch.setattr(fast_path, "MAX_HEAP_BLOCK", 2 * 384 * 16 * 16 * 4)  # S1's second block in chunks of 2
    calls = []
    model.stages[0][1].register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    x = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        hooked = model(x)
    assert calls == [5]
    torch.testing.assert_close(hooked, _plain(model, x), atol=1e-5, rtol=1e-5)


def test_batch_norm_left_in_train_mode_normalizes_by_the_batch():
    """Test-time adaptation sets the BatchNorms of an eval model to train: at inference they use the
    batch's statistics and update their running ones, as the plain path does."""
    x = torch.randn(4, 3, 32, 32)
    fast, plain = _pico(), _pico()
    for model in (fast, plain):
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.train()
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, _plain(plain, x), atol=1e-5, rtol=1e-5)
    for a, b in zip(fast.buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_forward_mode_ad_and_torch_func_transforms_at_inference():
    """Forward-mode AD under no_grad (reverse mode off) and torch.func.jvp give the tangent of the
    plain path; vmap over the model gives per-sample gradients, as a loop of backward passes does."""
    model = _pico()
    x, direction = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    forward_ad = torch.autograd.forward_ad
    tangents = []
    for mode in (torch.enable_grad, torch.no_grad):
        with mode(), forward_ad.dual_level():
            tangents.append(forward_ad.unpack_dual(model(forward_ad.make_dual(x, direction))).tangent)
    tangents.append(torch.func.jvp(model, (x,), (direction,))[1])
    for tangent in tangents[1:]:
        torch.testing.assert_close(tangent, tangents[0], atol=1e-5, rtol=1e-5)

    params = dict(model.named_parameters())
    target = torch.tensor([1, 2, 3])

    def loss(p, image, label):
        logits = torch.func.functional_call(model, p, (image[None],))
        return F.cross_entropy(logits, label[None])

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), target[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, atol=1e-5, rtol=1e-4)


def test_flop_counter_sees_the_plain_layers():
    """FlopCounterMode at inference (eval, no_grad) counts what it counts with autograd on: a fused
    oneDNN kernel is not one it knows, so the plain layers run under it."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _pico()
    counts = []
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with FlopCounterMode(display=False) as counter, mode():
            model(torch.randn(1, 3, 32, 32))
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts == [counts[0]] * 3


def test_modules_of_other_kinds_run_as_they_are():
    """The fast path reads a conv's, a norm's and a linear layer's weights and computes them itself:
    where a user put other kinds in their place (a LoRA-style wrapper that exposes the base layer's
    weight, a conv subclass, the tanh GELU, a BatchNorm without statistics or affine terms, a block
    of their own), the model's output is the plain path's, and dynamic quantization runs."""
    class LoRA(torch.nn.Module):  # as peft wraps a layer: the base layer's weight, plus a low-rank update
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.down, self.up = torch.nn.Linear(base.in_features, 2), torch.nn.Linear(2, base.out_features)
            self.weight, self.bias = base.weight, base.bias

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    class Shifted(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    class Doubled(MBConv):  # with a forward of its own
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    transformer = next(m for m in model.modules() if isinstance(m, fast_path.FeedForward))
    transformer[0] = LoRA(transformer[0])
    unit = model.stem[0]
    shifted = Shifted(unit[0].in_channels, unit[0].out_channels, 3, unit[0].stride, 1, bias=False)
    shifted.load_state_dict(unit[0].state_dict())
    unit[0] = shifted
    block = model.stages[0][0]
    block.residual.depthwise[2] = torch.nn.GELU(approximate="tanh")
    block.residual.expand[1] = torch.nn.BatchNorm2d(block.residual.expand[1].num_features, affine=False).eval()
    model.stages[1][0].__class__ = Doubled
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)
    quantized = torch.ao.quantization.quantize_dynamic(_pico(), {torch.nn.Linear}).eval()
    with torch.no_grad():
        assert quantized(x).shape == (2, 10)


def test_the_compiler_traces_the_model_in_one_graph():
    """torch.compile(fullgraph=True) traces the model in training and at inference without a graph
    break: the fast path's checks are constants to the compiler, which sees the plain layers (the
    "eager" backend: tracing only, nothing compiled)."""
    model = _pico().train()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_the_compiler_takes_checkpointed_blocks():
    """With gradient checkpointing the compiler traces the blocks too (before: Dynamo refused the
    context that puts BatchNorm's statistics back after a recomputation, which a compiled graph does
    not need: it writes them once); gradients and statistics are those of the eager model without it
    (AOTAutograd's partitioner, which decides what is recomputed, without Inductor's kernels)."""
    model = _pico().train()
    x = torch.randn(4, 3, 32, 32)
    eager = _fresh_copy(model).train()
    eager(x).square().mean().backward()
    model.set_grad_checkpointing(True)
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
    for (name, a), b in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-4, msg=name)
    for a, b in zip(eager.buffers(), model.buffers()):
        torch.testing.assert_close(b, a)


def test_a_forward_set_on_the_instance_is_called():
    """accelerate's hooks (offloading, device maps) replace a layer's ``forward`` on the instance and
    call the class's from it: the fast path must not read the layer's weights past it, for the
    stem's conv, an MBConv block's projection or the FFN's first linear layer."""
    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    transformer = next(m for m in model.modules() if isinstance(m, fast_path.FeedForward))
    for layer, scale in ((model.stem[0][0], 0.5), (model.stages[0][0].residual.project, 2.0), (transformer[0], 3.0)):
        def scaled(*args, old=layer.forward, scale=scale):
            return old(*args) * scale
        layer.forward = scaled
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)


def test_more_layers_of_other_kinds():
    """A residual branch with a forward of its own, a first FFN layer without a bias and a conv with
    ``padding="same"``: the output is the plain path's (before: the branch's forward skipped, an
    AttributeError, oneDNN refusing the padding)."""
    class Doubled(torch.nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    model.stages[0][0].residual.__class__ = Doubled
    ffn = next(m for m in model.modules() if isinstance(m, fast_path.FeedForward))
    ffn[0].bias = None
    conv = model.stem[0][0]
    same = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding="same", bias=False)
    same.load_state_dict(conv.state_dict())
    model.stem[0][0] = same
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)


def test_squeeze_excitation_pool_is_called_where_it_must_be():
    """The squeeze-excitation's own pool is called where a hook watches it or a user replaced it
    (before: SpatialMean in its place on every path, the hook never called, a max pool ignored)."""
    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    se = model.stages[0][0].residual.se
    calls = []
    se.avgpool.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    with torch.no_grad():
        model(x)
    _plain(model, x)
    assert len(calls) == 2
    se.avgpool = torch.nn.AdaptiveMaxPool2d(1)
    hidden = torch.randn(2, se.fc1.in_channels, 8, 8)
    expected = torch.sigmoid(se.fc2(se.activation(se.fc1(hidden.amax((2, 3), keepdim=True)))))
    torch.testing.assert_close(se._scale(hidden), expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)


def test_relu_keeps_a_nan_as_the_plain_path_does():
    """oneDNN's ReLU post-op is max(x, 0), which turns NaN into 0: with ReLU in the convs (a config
    option), a NaN pixel (a corrupt image) must give NaN logits for its image, as the plain layers
    do, not plausible ones (before: finite logits, in float32 and bfloat16)."""
    torch.manual_seed(0)
    model = randomise_norms(coatnet.create_model("coatnet_pico", num_classes=10, stem=dict(activation="relu"),
                                                 mbconv=dict(activation="relu")))
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 5, 5] = float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        fast, plain = _fast_and_plain(model.to(dtype), x.to(dtype))
        assert fast[0].isnan().all() and fast[1].isfinite().all()
        torch.testing.assert_close(fast, plain, equal_nan=True, atol=1e-5 if dtype == torch.float32 else 0.02,
                                   rtol=1e-5 if dtype == torch.float32 else 0.02)
    unit = randomise_norms(ConvBNAct(4, 8, 3, activation="relu"))
    x = torch.randn(2, 4, 6, 6)
    x[0, :, 2, 2] = float("nan")
    fast, plain = _fast_and_plain(unit, x)
    torch.testing.assert_close(fast, plain, equal_nan=True, atol=1e-5, rtol=1e-5)


def test_layers_taken_out_or_without_affine_terms():
    """A BatchNorm whose affine terms were set to None (F.batch_norm's identity) and an MBConv
    block with its squeeze-excitation or depthwise conv deleted (an ablation): the plain path's
    output at inference (before: AttributeError in the fast path)."""
    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    norm = model.stem[0][1]
    norm.weight, norm.bias = None, None
    del model.stages[0][0].residual.se
    del model.stages[1][0].residual.depthwise
    with torch.no_grad():
        torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not ONEDNN_BF16, reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_bfloat16_projection_of_other_kinds():
    """MBConv's bfloat16 path folds a per-image, per-channel SE scale into a 1x1 projection: where
    a user made the squeeze-excitation per pixel (its pool an Identity) or the projection another
    conv (grouped, 3x3), the block computes what the plain path does (before: RuntimeError)."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    for change in ("pool", "grouped", "3x3"):
        model = _pico()
        residual = model.stages[0][0].residual
        c, out = residual.project.in_channels, residual.project.out_channels
        if change == "pool":
            residual.se.avgpool = torch.nn.Identity()
        else:
            residual.project = (torch.nn.Conv2d(c, out, 1, groups=4) if change == "grouped"
                                else torch.nn.Conv2d(c, out, 3, padding=1))
        model = model.eval().to(torch.bfloat16)
        fast, plain = _fast_and_plain(model, x)
        torch.testing.assert_close(fast.float(), plain.float(), rtol=0, atol=0.03 * plain.abs().max().item(),
                                   msg=change)


def test_a_forward_patched_on_the_class_is_called(monkeypatch):
    """A ``forward`` patched onto a class (a user's monkeypatch: every GELU the tanh one, every conv
    scaled, every MBConv block without its residual branch) is called, as the plain path calls it
    (before: the fast path computed the classes' own functions in their place)."""
    x = torch.randn(2, 3, 32, 32)
    model = _pico()
    patches = [(torch.nn.GELU, lambda self, t: F.gelu(t, approximate="tanh")),
               (torch.nn.Conv2d, lambda self, t, conv=torch.nn.Conv2d.forward: conv(self, t) * 0.5),
               (MBConv, lambda self, t: self.shortcut(t))]
    for kind, forward in patches:
        with monkeypatch.context() as patch:
            patch.setattr(kind, "forward", forward)
            with torch.no_grad():
                torch.testing.assert_close(model(x), _plain(model, x), atol=1e-5, rtol=1e-5, msg=kind.__name__)


@pytest.mark.parametrize("bias", [False, True])
def test_a_folded_conv_is_the_conv_and_its_batchnorm(bias):
    """fold_batch_norm's weight and bias compute ``norm(conv(x))`` with its running statistics, eps
    included: in float64, with variances near eps, where dropping it would change the output by half
    (the model-level tests, in float32 at 1e-5 with variances near 1, would not see it)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=bias).double()
    norm = torch.nn.BatchNorm2d(6, eps=1e-3).double().eval()
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(5e-4, 2e-3)
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    weight, shift = fast_path.fold_batch_norm(conv, norm)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, weight, shift, padding=1), norm(conv(x)), rtol=1e-12, atol=1e-12)
