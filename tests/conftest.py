"""Helpers shared by the tests."""

import json
import os

import pytest
import torch

# Nothing in the tests may reach the network: the Hub is read from caches the tests write.
os.environ["HF_HUB_OFFLINE"] = "1"

# pytest-xdist's workers (pyproject.toml: a worker per core) share the cores: each computes on its
# share, and so do the processes its tests start (which inherit OMP_NUM_THREADS), so that no core
# runs two spinning thread pools (2 workers of 2 threads each on 2 cores: 16:51 against 8:26).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    _threads = max(1, _cores // _workers)
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def strict_json(text: str):
    """``text`` read as strict JSON readers (jq, JavaScript's JSON.parse) read it: NaN and Infinity refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm statistics and affine terms, every LayerNorm affine terms, and every layer
    scale a size, away from the identity (of the size trained networks have), so that a wrong fold,
    conversion or ordering shows; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=generator) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            elif isinstance(m, torch.nn.LayerNorm) and m.elementwise_affine:
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=generator) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return model.eval()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty, offline Hub cache; returns the function that puts a commit of a repository in it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def commit(repo: str, revision: str = "main", commit_hash: str = "a" * 40):
        """The snapshot folder of ``commit_hash`` in ``repo``, which ``revision`` points at."""
        storage = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit_hash)
        snapshot = storage / "snapshots" / commit_hash
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot

    return commit
