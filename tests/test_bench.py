"""`coatnet bench` measures and reports; it asserts nothing about speed (these machines are shared)."""

import json

import pytest

from coatnet.cli import main


def _bench(capsys, *argv) -> dict:
    assert main(["bench", "--repeats", "2", "--threads", "1", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_reports_every_field(capsys, monkeypatch):
    """Every field of every row, onnxruntime's too where it is installed; and each process, having
    reported, is left to exit on its own, not killed: a compiled model's worker pool then cleans up
    after itself (killed, its semaphores leaked, which Python warned about at the end)."""
    import importlib.util

    from coatnet import bench

    processes = []
    finish = bench.Runner.finish

    def finish_and_record(runner):
        finish(runner)
        processes.append(runner.process)
    monkeypatch.setattr(bench.Runner, "finish", finish_and_record)
    onnx = importlib.util.find_spec("onnxruntime") is not None
    # Without --img-size, the model's own, as info and plan take it (coatnet_pico's 32; before: 224 for every model)
    result = _bench(capsys, "--model", "coatnet_pico", "--batch-size", "2", *["--onnx"] * onnx)
    assert result["img_size"] == 32
    assert [p.exitcode for p in processes] == [0] * (3 + onnx)  # inference, (onnxruntime,) train, the matmul
    assert result["threads"] == 1 and result["matmul_gflops"]["median"] > 0
    assert [(r["model"], r["mode"]) for r in result["rows"]] == [
        ("coatnet_pico", "inference"), *[("coatnet_pico (onnxruntime)", "inference")] * onnx, ("coatnet_pico", "train")]
    for row in result["rows"]:
        ips = row["images_per_s"]
        assert 0 < ips["min"] <= ips["median"] <= ips["max"]
        # peak_mib: over the process's peak after its imports, which a model this small may not pass
        assert row["vs_timm"] is None and row["peak_mib"] >= 0 and row["matmul_fraction"] > 0
    inference, train = result["rows"][0], result["rows"][-1]
    assert train["gflop_per_image"] == pytest.approx(3 * inference["gflop_per_image"])
    assert result["rows"][1]["gflop_per_image"] == pytest.approx(inference["gflop_per_image"])
    # 2 x the multiply-adds `coatnet info` counts for coatnet_pico at 32 (16.0M)
    assert inference["gflop_per_image"] == pytest.approx(0.032, rel=0.02)


@pytest.mark.parametrize("name", ["coatnet_0", "coatnet_nano_rw", "coatnet_rmlp_nano_rw"])
def test_timms_model_is_ours_in_size(name):
    """The model timm's row times is ours in timm's code: the same parameters (the rw variants exactly;
    timm's paper-style models differ by 64-192 of 25-75M)."""
    pytest.importorskip("timm")
    from coatnet.bench import build
    from coatnet.complexity import count_parameters

    ours, theirs = build("coatnet", name, 64), build("timm", name, 64)
    assert count_parameters(theirs) == pytest.approx(count_parameters(ours), rel=1e-4)


def test_timms_row_names_the_size_it_was_built_at():
    from coatnet.bench import Job

    def label(img_size):
        return Job("timm", "coatnet_0", "inference", True, img_size, 8, None, "cpu").label
    assert label(224) == "coatnet_0_224 (compiled)"
    assert label(256) == "coatnet_0_224 at 256 (compiled)"  # timm's name, built for 256


@pytest.mark.parametrize("mode", ["inference", "train", "matmul"])
def test_a_bfloat16_measurement(mode):
    """Each of a --dtype bfloat16 bench's processes, run here (spawning it, as the bench does, adds only
    its start): it builds, warms up, times a round and reports its peak memory."""
    import multiprocessing

    from coatnet import bench

    parent, child = multiprocessing.Pipe()
    job = bench.Job("torch" if mode == "matmul" else "coatnet", "mm" if mode == "matmul" else "coatnet_pico", mode,
                    False, 64 if mode == "matmul" else 32, 2, None, "cpu", dtype="bfloat16")
    for request in ("build", "run", "stop"):
        parent.send(request)
    bench._worker(job, child)
    (ready, flop), seconds, peak = parent.recv(), parent.recv(), parent.recv()
    assert ready == "ready" and flop > 0 and seconds > 0 and peak >= 0


@pytest.mark.parametrize("argv,message", [
    (["--model", "coatnet_pico", "--compare", "timm"], "timm has no counterpart of coatnet_pico"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--batch-size", "0"], "argument -b/--batch-size: must be an integer >= 1, got '0'"),
    (["--model", "coatnet_pico", "--img-size", "33", "--repeats", "1"], "not a multiple of the model's stride"),
    (["--model", "coatnet_pico", "--dtype", "tf32"], "--dtype tf32 is a precision of NVIDIA GPUs from Ampere (sm_80) on: add --device cuda"),
    (["--model", "coatnet_pico", "--device", "foo"], "--device foo is not a device; use cpu, cuda or cuda:N"),
    (["--model", "coatnet_pico", "--device", "meta"], "--device meta: this machine has no meta device; use cpu"),
])
def test_bench_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coatnet bench: error: ") and message in err


def test_a_gpu_index_past_the_machines_gpus_is_one_line(capsys, monkeypatch):
    """--device cuda:N is checked against the GPUs there are: on a machine of 2, cuda:1 is the last one
    and cuda:2 a one-line error naming how many there are (not CUDA's "invalid device ordinal" later)."""
    import torch

    from coatnet.validate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1") and resolve_device("cuda") == torch.device("cuda")
    assert resolve_device(None) == torch.device("cuda")
    for name in ("cuda:2", "cuda:3"):
        with pytest.raises(ValueError, match=rf"^--device {name}: this machine has 2 cuda device\(s\)$"):
            resolve_device(name)


def test_bench_onnx_is_cpu_float32(capsys):
    assert main(["bench", "--model", "coatnet_pico", "--onnx", "--dtype", "bfloat16"]) == 2
    assert "--onnx times onnxruntime on the CPU in float32" in capsys.readouterr().err


def test_a_failed_measurement_is_its_rows_one_line_and_the_others_go_on():
    import multiprocessing

    from coatnet.bench import Job, Runner, format_table

    runner = Runner(Job("coatnet", "no_such_model", "inference", False, 32, 2, 1, "cpu"),
                    multiprocessing.get_context("spawn"))
    runner.build()
    runner.wait_ready()  # the process reports its failure instead of being ready
    runner.process.join(timeout=60)
    assert runner.error.startswith("no_such_model inference: ValueError: unknown model 'no_such_model'")
    # Failed before it was asked to build, and ended: its reason still read (before: "its process ended")
    early = Runner(Job("coatnet", "coatnet_pico", "inference", False, 32, 2, 1, "bogus"),
                   multiprocessing.get_context("spawn"))
    early.process.join(timeout=60)
    early.build()
    early.wait_ready()
    assert early.error.startswith("coatnet_pico inference: RuntimeError:") and "bogus" in early.error
    ok = dict(model="coatnet_pico", mode="train", images_per_s=dict(median=5.0, min=4.0, max=6.0), vs_timm=None,
              achieved_gflops=1.0, matmul_fraction=0.5, peak_mib=10.0)
    table = format_table(dict(model="coatnet_pico", img_size=32, batch_size=2, dtype="float32", device="cpu",
                              threads=1, torch="x", repeats=2, matmul_size=2048,
                              matmul_gflops=dict(median=2.0, min=2.0, max=2.0),
                              rows=[dict(model="no_such_model", mode="inference", error=runner.error), ok]))
    lines = table.splitlines()
    assert any(line.split()[:3] == ["no_such_model", "inference", "failed"] for line in lines)
    assert any(line.split()[:3] == ["coatnet_pico", "train", "5.00"] for line in lines)
    assert lines[-1] == f"failed: {runner.error}" and "\n" not in runner.error
    assert not any(line.startswith("note:") for line in lines)  # the matmul and the rows steady: no note
    noisy = format_table(dict(model="coatnet_pico", img_size=32, batch_size=2, dtype="float32", device="cpu",
                              threads=1, torch="x", repeats=2, matmul_size=2048,
                              matmul_gflops=dict(median=2.0, min=1.0, max=2.5), rows=[ok])).splitlines()
    assert noisy[2].startswith("note: the matmul's rounds differ by 2.5x: something else is using this machine")
    # a row whose rounds differ while the matmul's do not is named
    swinging = dict(ok, mode="inference", images_per_s=dict(median=5.0, min=1.0, max=8.0))
    lines = format_table(dict(model="coatnet_pico", img_size=32, batch_size=2, dtype="float32", device="cpu",
                              threads=1, torch="x", repeats=2, matmul_size=2048,
                              matmul_gflops=dict(median=2.0, min=2.0, max=2.0), rows=[swinging, ok])).splitlines()
    assert lines[2].startswith("note: the rounds of coatnet_pico inference (8.0x) differ by more than 1.5x: something "
                               "else is using this machine, so those figures are noisy")


def test_more_threads_than_cores_are_said(capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["bench", "--model", "coatnet_pico", "--threads", "3", "--dtype", "tf32"]) == 2
    note = capsys.readouterr().err.splitlines()[0]
    assert note == "coatnet bench: note: --threads 3 is more than this machine's 2 cores: its threads take turns on them"


def test_bfloat16_on_a_cpu_that_emulates_it_is_said(capsys, monkeypatch):
    import torch

    def stop():  # the notes are said: stop before anything is built
        raise ValueError("stopped here")

    monkeypatch.setattr("coatnet.bench._import_timm", stop)
    for has, said in ((False, True), (True, False)):
        cpu = dict(torch.cpu.get_capabilities(), architecture="x86_64", avx512_bf16=has, amx_bf16=False)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: cpu)
        assert main(["bench", "--model", "coatnet_pico", "--device", "cpu", "--dtype", "bfloat16",
                     "--compare", "timm"]) == 2
        err = capsys.readouterr().err
        assert ("coatnet bench: note: this CPU has no native bfloat16 (neither AVX512-BF16 nor AMX), so it is "
                "emulated: 2-3.5x slower than float32, the matmul included\n" in err) == said, err


def test_ctrl_c_is_one_line(tmp_path):
    """Ctrl-C in a terminal reaches the bench and every measurement's process: one line, no tracebacks."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    bench = subprocess.Popen([sys.executable, "-m", "coatnet", "bench", "--model", "coatnet_pico", "--img-size", "32",
                              "--batch-size", "2", "--threads", "1", "--repeats", "100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    children = Path(f"/proc/{bench.pid}/task/{bench.pid}/children")
    deadline = time.monotonic() + 60
    while len(children.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # the first measurement's process, beside multiprocessing's resource tracker
    time.sleep(3)  # its Python started, building or measuring
    # the signal reaches the measurements' processes before the bench acts on it (as it may, in a terminal)
    for child in children.read_text().split():
        os.kill(int(child), signal.SIGINT)
    time.sleep(1)
    os.kill(bench.pid, signal.SIGINT)
    out, err = bench.communicate(timeout=60)
    assert (bench.returncode, out, err) == (130, "", "coatnet bench: interrupted\n")


def test_a_process_dying_or_hanging_while_timed_fails_its_row_only(capsys, monkeypatch):
    """A measurement that dies between rounds (the OOM killer, say; train here) or stops answering
    (stopped with SIGSTOP; onnxruntime's here) is its row's one-line failure, the hung one after
    REPLY_TIMEOUT_S instead of holding the bench forever; the other rows are still timed and
    reported, and the command exits with status 1."""
    import os
    import signal

    from coatnet import bench

    time_one = bench.Runner.time_one

    def dying_or_hanging(runner):
        if len(runner.seconds) == 1 and runner.job.mode == "train":
            runner.process.kill()
            runner.process.join()
        if len(runner.seconds) == 1 and runner.job.implementation == "onnxruntime":
            os.kill(runner.process.pid, signal.SIGSTOP)
            monkeypatch.setattr(bench, "REPLY_TIMEOUT_S", 3.0)  # the others answer in ms
        time_one(runner)

    monkeypatch.setattr(bench.Runner, "time_one", dying_or_hanging)
    assert main(["bench", "--model", "coatnet_pico", "--img-size", "32", "--batch-size", "2", "--repeats", "3",
                 "--onnx", "--json"]) == 1
    rows = {r["model"] + " " + r["mode"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["coatnet_pico train"]["error"] == ("coatnet_pico train: its process ended (killed, most likely out of "
                                                   "memory; lower --batch-size)")
    assert rows["coatnet_pico (onnxruntime) inference"]["error"] == ("coatnet_pico (onnxruntime) inference: no answer "
                                                                     "in 3 s, its process hangs")
    ok = rows["coatnet_pico inference"]
    assert ok["images_per_s"]["median"] > 0 and "error" not in ok


def test_the_matmul_dying_stops_the_bench(capsys, monkeypatch):
    """The matmul is every row's measure: without it the command stops, in one line, with status 2."""
    from coatnet import bench

    time_one = bench.Runner.time_one

    def dying(runner):
        if runner.job.mode == "matmul" and len(runner.seconds) == 1:
            runner.process.kill()
            runner.process.join()
        time_one(runner)

    monkeypatch.setattr(bench.Runner, "time_one", dying)
    assert main(["bench", "--model", "coatnet_pico", "--img-size", "32", "--batch-size", "2", "--repeats", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coatnet bench: error: the matmul, the measure of every row, failed: mm matmul: its process "
                          "ended (killed") and err.count("\n") == 1


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "68719476736 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_on_the_cpu_is_said_as_on_the_gpu(monkeypatch, error):
    """The CPU allocator's refusal is the row's short out-of-memory line, not its message."""
    import multiprocessing

    from coatnet import bench

    def prepare(job, device):
        raise error
    monkeypatch.setattr(bench, "_prepare", prepare)
    parent, child = multiprocessing.Pipe()
    parent.send("build")
    bench._worker(bench.Job("coatnet", "coatnet_pico", "train", False, 32, 2, None, "cpu"), child)
    assert parent.recv() == ("error", "coatnet_pico train: out of memory: every row's process holds its model on cpu "
                                      "at once; lower --batch-size")


def test_timms_model_is_built_with_our_head_and_a_difference_in_work_is_said():
    """"vs timm" divides images/s: timm's model must do the same job. Its coatnet_3_rw_224 defaults to
    its weights' 11,821 classes (16.6M parameters more to train than ours, before), and its paper-style
    coatnet_0_224 strides the depthwise conv (Table 9's variant, 9.8% more multiply-adds): the table
    says so (before: a bare ratio)."""
    pytest.importorskip("timm")
    import torch

    from coatnet.bench import build, format_table
    from coatnet.complexity import count_parameters

    with torch.device("meta"):
        ours, theirs = build("coatnet", "coatnet_3_rw", 224), build("timm", "coatnet_3_rw", 224)
    assert theirs.num_classes == ours.config.num_classes == 1000
    assert count_parameters(theirs) == count_parameters(ours)

    def row(implementation, model, gflop):
        return dict(implementation=implementation, model=model, mode="inference", compiled=False,
                    images_per_s=dict(median=10.0, min=10.0, max=10.0), vs_timm=None, gflop_per_image=gflop,
                    achieved_gflops=1.0, matmul_fraction=0.5, peak_mib=10.0)
    result = dict(model="coatnet_0", img_size=224, batch_size=2, dtype="float32", device="cpu", threads=1,
                  torch="x", repeats=2, matmul_size=2048, matmul_gflops=dict(median=2.0, min=2.0, max=2.0),
                  rows=[row("coatnet", "coatnet_0", 2 * 4.1419), row("timm", "coatnet_0_224", 2 * 4.5465)])
    lines = format_table(result).splitlines()
    assert lines[2] == ("note: coatnet_0_224 does 9.8% more multiply-adds per image than ours (4.55 against 4.14 G): "
                        "'vs timm' compares images/s, so part of it is the networks' difference; GFLOP/s and "
                        "'of matmul' compare the rate")
    result["rows"][1]["gflop_per_image"] = 2 * 4.1419  # the same work: no note
    assert not any(line.startswith("note:") for line in format_table(result).splitlines())


class FakeRunner:
    """A measurement's process that reports fabricated figures: the seconds of each round, FLOP per image
    (per matmul) and peak memory, so that what run_bench computes from them can be checked exactly."""

    SECONDS = {("coatnet", "inference", False): [0.5, 0.25, 1.0], ("timm", "inference", False): [1.0, 0.5, 2.0],
               ("coatnet", "train", False): [2.0, 1.0, 4.0], ("timm", "train", False): [2.0, 2.0, 2.0],
               ("coatnet", "inference", True): [0.2, 0.2, 0.2], ("timm", "inference", True): [0.5, 0.5, 0.5],
               ("coatnet", "train", True): [1.0, 1.0, 1.0], ("timm", "train", True): [4.0, 4.0, 4.0],
               ("torch", "matmul", False): [1.0, 2.0, 4.0]}

    def __init__(self, job, context):
        import types

        self.job, self.error, self.seconds, self.finished = job, None, [], False
        self.flop = self.peak_mib = 0.0
        self.process = types.SimpleNamespace(join=lambda timeout=None: None, kill=lambda: None)

    def build(self):
        pass

    def wait_ready(self):
        self.flop = 2e9 if self.job.mode == "matmul" else 1e9 * (1 if self.job.mode == "inference" else 3)

    def time_one(self):
        self.seconds.append(self.SECONDS[self.job.implementation, self.job.mode, self.job.compiled][len(self.seconds)])

    def finish(self):
        self.peak_mib, self.finished = 100.0, True


def test_the_figures_are_computed_from_the_rounds(capsys, monkeypatch):
    """images/s = batch / seconds, its median and range over the rounds; 'vs timm' the ratio of medians
    (ours over timm's, of the same mode, compiled or not); GFLOP/s = FLOP per image x images/s; 'of matmul'
    that over the matmul's median FLOP/s. Fabricated rounds, nothing timed."""
    from coatnet import bench

    monkeypatch.setattr(bench, "Runner", FakeRunner)
    monkeypatch.setattr(bench, "_import_timm", lambda: None)  # nothing is built
    result = _bench(capsys, "--model", "coatnet_nano_rw", "--batch-size", "4", "--repeats", "3", "--compare", "timm",
                    "--compile")
    # the matmul: 2 GFLOP in 1, 2 and 4 s
    assert result["matmul_gflops"] == dict(median=1.0, min=0.5, max=2.0)
    rows = {(r["implementation"], r["mode"], r["compiled"]): r for r in result["rows"]}
    ours = rows["coatnet", "inference", False]
    assert ours["images_per_s"] == dict(median=8.0, min=4.0, max=16.0)  # 4 images in 0.5, 1 and 0.25 s
    assert ours["vs_timm"] == pytest.approx(2.0)  # timm's median: 4 images/s
    assert ours["gflop_per_image"] == 1.0 and ours["achieved_gflops"] == 8.0 and ours["matmul_fraction"] == 8.0
    assert ours["peak_mib"] == 100.0
    train = rows["coatnet", "train", False]
    assert train["images_per_s"]["median"] == 2.0 and train["vs_timm"] == pytest.approx(1.0)
    assert train["gflop_per_image"] == 3.0 and train["achieved_gflops"] == 6.0 and train["matmul_fraction"] == 6.0
    # compiled rows are compared with timm's compiled rows
    assert rows["coatnet", "inference", True]["vs_timm"] == pytest.approx(2.5)
    assert rows["coatnet", "train", True]["vs_timm"] == pytest.approx(4.0)
    assert rows["timm", "inference", False]["vs_timm"] is None
    line = next(line for line in bench.format_table(result).splitlines() if line.startswith("coatnet_nano_rw "))
    assert line.split() == ["coatnet_nano_rw", "inference", "8.00", "(4.00..16.00)", "2.00x", "8.0", "800%", "100"]


def test_the_matmuls_work_is_2_n_cubed():
    """A square n x n product is n^3 multiply-adds, 2 n^3 FLOP: the measure every row is a fraction of."""
    import torch

    from coatnet.bench import Job, _prepare

    run, flop = _prepare(Job("torch", "mm", "matmul", False, 16, 1, None, "cpu"), torch.device("cpu"))
    assert flop == 2 * 16**3


def test_the_tables_first_line_says_thread_or_threads():
    """One thread is "1 thread", more are "N threads" (before: "1 threads")."""
    from coatnet.bench import format_table

    for threads, said in ((1, ", cpu, 1 thread, torch x;"), (2, ", cpu, 2 threads, torch x;")):
        first = format_table(dict(model="coatnet_pico", img_size=32, batch_size=2, dtype="float32", device="cpu",
                                  threads=threads, torch="x", repeats=2, matmul_size=2048,
                                  matmul_gflops=dict(median=2.0, min=2.0, max=2.0), rows=[])).splitlines()[0]
        assert said in first, first
