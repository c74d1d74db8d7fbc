"""The command line: output, JSON, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys

import pytest

from coatnet.cli import main


def test_info_json(capsys):
    assert main(["info", "coatnet_0", "coatnet_pico", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == ["coatnet_0", "coatnet_pico"]
    r = rows[0]
    assert r["img_size"] == 224 and r["paper_params"] == 25e6 and r["paper_flops"] == 4.2e9
    assert abs(r["params_diff_pct"]) < 2 and abs(r["flops_diff_pct"]) < 5
    assert rows[1]["paper_params"] is None and rows[1]["img_size"] == 32


def test_info_table_at_384(capsys):
    assert main(["info", "coatnet_2", "--img-size", "384"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("coatnet_2"))
    assert " 384 " in line and "49.80B" in line and "75.00M" in line


def test_info_compares_with_the_paper_only_at_its_sizes(capsys):
    """At 4096 px the tables hold 43% of coatnet_0's parameters; the paper's 25M is for its sizes."""
    assert main(["info", "coatnet_0", "--img-size", "4096", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["paper_params"] is None and row["params_diff_pct"] is None and row["params"] > 40e6


@pytest.mark.parametrize("argv,message", [
    (["info", "coatnet_99"], "unknown model 'coatnet_99'; known models: coatnet_0"),
    (["info", "coatnet_0", "--img-size", "100"], "not a multiple of the model's stride 32; use e.g. 128x128"),
    (["info", "coatnet_0", "--img-size", "1000000"], "img_size must be one or two integers up to 4096"),
    # Flags are checked by the range they declare, and argparse's own refusals are one line too.
    (["info", "coatnet_0", "--img-size", "-1"], "coatnet info: error: argument --img-size: must be an integer >= 1"),
    (["predict", "--checkpoint", "x", "y.png", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["eval", "--checkpoint", "x", "--workers", "-2"], "argument -j/--workers: must be an integer >= 0"),
    (["bench", "--threads", "zero"], "argument --threads: must be an integer >= 1, got 'zero'"),
    (["study", "layouts", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    # An unknown flag is the command's, with the flag it most looks like (before: "coatnet: error: ...")
    (["train", "--no-such-flag"], "coatnet train: error: unrecognized arguments: --no-such-flag; `coatnet train --help` "
                                  "lists its flags"),
    (["train", "--batch_size", "8"], "coatnet train: error: unrecognized arguments: --batch_size 8; did you mean "
                                     "--batch-size?"),
    (["study", "layouts", "--epochz=3"], "coatnet study layouts: error: unrecognized arguments: --epochz=3; did you "
                                        "mean --epochs?"),
    # timm's flags that mean something else here say what to write instead (before: "did you mean --model?")
    (["train", "--model-ema"], "coatnet train: error: unrecognized arguments: --model-ema; timm's --model-ema: use "
                               "--ema DECAY"),
    (["train", "--warmup-epochs", "5"], "unrecognized arguments: --warmup-epochs 5; timm's --warmup-epochs: use "
                                        "--warmup-steps, in optimizer steps"),
    (["train", "--aa", "rand-m9-mstd0.5"], "timm's --aa: use --randaugment N,M (rand-m9-n2 is --randaugment 2,9)"),
    (["eval", "--dataset", "torch/cifar10"], "coatnet eval: error: unrecognized arguments: --dataset torch/cifar10; "
                                             "timm's --dataset: use --data (digits, imagefolder, cifar10 ...)"),
    # ... and a mistyped flag beside one of timm's still says the one it most looks like
    (["train", "--model-ema", "--batch_size", "8"], "unrecognized arguments: --model-ema --batch_size 8; timm's "
                                                    "--model-ema: use --ema DECAY; did you mean --batch-size?"),
    # ... but only with a flag of ours in its place: eval has no --ema
    (["eval", "--model-ema"], "coatnet eval: error: unrecognized arguments: --model-ema; `coatnet eval --help` lists"),
    # timm's --drop, its head's dropout, is refused (before: taken as --drop-path, of which it is a prefix)
    (["train", "--drop", "0.1"], "coatnet train: error: argument --drop: timm's head dropout: CoAtNet's head has "
                                 "none; --drop-path RATE is the stochastic depth"),
    # timm's --output, the parent of each run's folder, is refused (before: taken as --output-dir, the run's files
    # written among the other runs' folders)
    (["train", "--output", "runs"], "coatnet train: error: argument --output: timm's --output is the folder each "
                                    "run's own goes under; --output-dir is the run's own folder here: --output-dir "
                                    "runs/NAME"),
    # timm's training flags for what training takes from the weights or the data set (before: did you mean
    # --drop-path? --ema? --help?)
    (["train", "--crop-pct", "0.9"], "timm's --crop-pct: training prepares images as the weights it starts from "
                                     "expect, else as the data set's own; eval and predict take --crop-pct"),
    (["train", "--mean", "0.5", "0.5", "0.5"], "unrecognized arguments: --mean 0.5 0.5 0.5; timm's --mean: training"),
    (["train", "--hflip", "0.5"], "timm's --hflip: half the training images are flipped at random, timm's default "
                                  "0.5 (not digits: a mirrored digit is another symbol); --no-aug for none"),
    # eval's --pretrained is a switch, which takes no PATH (before: "use --pretrained PATH", then refused)
    (["train", "--initial-checkpoint", "w.pth"], "timm's --initial-checkpoint: use --pretrained PATH"),
    (["eval", "--initial-checkpoint", "w.pth"], "coatnet eval: error: unrecognized arguments: --initial-checkpoint "
                                                "w.pth; `coatnet eval --help` lists"),
    (["frobnicate"], "coatnet: error: argument COMMAND: invalid choice: 'frobnicate'"),
    # a mistyped command or choice: the one it most looks like, as for flags
    (["trian"], "invalid choice: 'trian' (choose from 'info', 'train', 'eval', 'predict', 'bench', 'export', 'plan', "
                "'convert-timm', 'study'); did you mean train?"),
    (["study", "layout"], "coatnet study: error: argument STUDY: invalid choice: 'layout' (choose from 'layouts'); "
                          "did you mean layouts?"),
    (["predict", "--checkpoint", "x", "--mean", "0.5", "0.5", "cat.jpg"], "argument --mean: takes three numbers, R G "
                                                                        "B; got 'cat.jpg'"),
    (["eval", "--crop-mode", "centre"], "argument --crop-mode: invalid choice: 'centre' (choose from 'center', "
                                        "'squash'); did you mean center?"),
])
def test_info_bad_input_is_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_mistyped_choice_is_named_however_argparse_lists_the_choices():
    """Python 3.14's argparse lists the choices unquoted (str, not repr): the one a typo most looks like is
    named there too (before: no hint)."""
    from coatnet.cli import _FlagError, _Parser

    for choices in ("'info', 'train'", "info, train"):
        with pytest.raises(_FlagError, match="did you mean train"):
            _Parser(prog="coatnet").error(f"argument COMMAND: invalid choice: 'trian' (choose from {choices})")


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "coatnet", "info", "coatnet_pico"], capture_output=True, text=True)
    assert out.returncode == 0 and "coatnet_pico" in out.stdout


def test_under_torchrun_only_the_first_process_reports_a_bad_flag(monkeypatch, capsys):
    """Every process of a torchrun job parses the same flags: one line for the job, not one per process."""
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert main(["train", "--epochs", "zero"]) == 2
        assert capsys.readouterr().err.count("\n") == lines


def test_a_switch_a_resumed_run_inherited_can_be_turned_off():
    """--amp, --compile, ... default to the recipe's or the resumed run's; --no-amp turns one off."""
    from coatnet.cli import build_parser

    for argv, amp in (([], None), (["--amp"], True), (["--no-amp"], False)):
        assert build_parser().parse_args(["train", *argv]).amp is amp


def test_timms_short_and_renamed_flags_mean_the_same_here():
    """-b, -j and --smoothing, as timm's train.py and validate.py take them."""
    from coatnet.cli import build_parser

    args = build_parser().parse_args(["train", "-b", "32", "-j", "2", "--smoothing", "0.2"])
    assert (args.batch_size, args.workers, args.label_smoothing) == (32, 2, 0.2)
    args = build_parser().parse_args(["eval", "-b", "16", "-j", "1"])
    assert (args.batch_size, args.workers) == (16, 1)


def test_drop_path_can_ask_for_the_models_own_rate(monkeypatch, capsys):
    """--drop-path model gives the model its own rate (Table 10's, as the ImageNet recipes do) over a recipe's
    0 (before: only a number could be given, so digits could not ask for it without looking it up)."""
    settings = []
    monkeypatch.setattr("coatnet.train.train", lambda cfg, **kwargs: settings.append(cfg.drop_path))
    for argv in ([], ["--drop-path", "model"], ["--drop-path", "MODEL"], ["--drop-path", "0.1"],
                 ["--recipe", "imagenet1k-pretrain"], ["--recipe", "imagenet1k-pretrain", "--drop-path", "0"]):
        assert main(["train", *argv]) == 0
    assert settings == [0.0, None, None, 0.1, None, 0.0]
    assert main(["train", "--drop-path", "fast"]) == 2
    err = capsys.readouterr().err
    assert err == ("coatnet train: error: argument --drop-path: a rate (0 <= rate < 1) or 'model' expected; "
                   "got 'fast'\n"), err


@pytest.mark.parametrize("error,size", [
    # torch's CPU allocator (predict --img-size 4096: a relative bias of 512 GiB), and CUDA's paragraph
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 549755813888 bytes. Error "
                  "code 12 (Cannot allocate memory)"), " (one tensor of 512.0 GiB)"),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.1 GiB of "
                  "which 1.2 GiB is free.\nIncluding non-PyTorch memory, ..."), " (one tensor of 20.00 GiB)"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3145728 bytes."),
     " (one tensor of 3.0 MiB)"),
    (MemoryError(), ""),
])
def test_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path, error, size):
    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr("coatnet.complexity.measure", exhausted)
    assert main(["info", "coatnet_pico"]) == 1
    err = capsys.readouterr().err
    assert err == f"coatnet info: error: out of memory{size}; give a smaller --batch-size or --img-size, or use a " \
                  f"machine with more memory\n"


def test_an_error_that_is_not_out_of_memory_is_not_hidden(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("coatnet.complexity.measure", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["info", "coatnet_pico"])


def test_a_world_size_without_torchrun_says_what_it_waits_for(monkeypatch, capsys):
    """WORLD_SIZE=2 set by hand waits for processes nothing started (30 minutes, silently, before)."""
    for name, value in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def waiting(*args, **kwargs):
        raise ValueError("the test stops here")

    monkeypatch.setattr("coatnet.train.dist.init_process_group", waiting)
    assert main(["train", "--epochs", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "note: waiting for the 2 processes of WORLD_SIZE=2 at 127.0.0.1:29555, as the environment says (torchrun "
        "starts them; unset WORLD_SIZE for one process)")


@pytest.mark.parametrize("command", [["info"], ["bench", "--model"], ["plan", "--model"], ["train", "--model"]])
@pytest.mark.parametrize("name", ["local-dir:./w", "hf-hub:me/w"])
def test_a_models_source_where_a_model_name_goes_says_why_it_is_refused(capsys, command, name):
    """timm's names of where a model is (local-dir:PATH, hf-hub:ORG/NAME) are create_model's only; a command
    that takes a model name says so in one line (before: local-dir: was an unknown model name everywhere, and
    hf-hub: one to info and bench), and reads no folder nor the Hub to say it."""
    assert main([*command, name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert name in err and ("takes a model name" in err or "names where a model is" in err), err


def test_a_weights_file_given_to_pretrained_before_model_says_to_give_it_as_checkpoint(tmp_path, monkeypatch, capsys):
    """``predict --pretrained W --model NAME IMAGE``, timm's flags in train's spelling and another order: argparse
    reads W as an IMAGE and refuses the image after --model, which was said alone (before: "coatnet: error:
    unrecognized arguments: cat.jpg")."""
    monkeypatch.chdir(tmp_path)
    for name in ("w.safetensors", "cat.jpg"):
        (tmp_path / name).write_bytes(b"")
    assert main(["predict", "--pretrained", "w.safetensors", "--model", "coatnet_pico", "cat.jpg"]) == 2
    err = capsys.readouterr().err
    assert "give a weights file as --checkpoint w.safetensors, with --model NAME" in err and err.count("\n") == 1, err


def test_ctrl_c_while_torch_loads_is_one_line():
    """The `coatnet` script imports coatnet.cli before main runs: that must not load torch (a Ctrl-C in
    the seconds it takes would be Python's traceback, outside every handler); inside main, a Ctrl-C
    while torch loads (here raised by an import hook, as the terminal would) is one line, status 130."""
    script = """
import sys
import coatnet.cli
assert "torch" not in sys.modules, "importing coatnet.cli loaded torch"

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.exit(coatnet.cli.main(["train", "--epochs", "1"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "coatnet: interrupted\n")


@pytest.fixture
def own_signals():
    """SIGINT as Python sets it, SIGTERM's default; both, and the unraisable hook, put back after the test."""
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}, sys.unraisablehook
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in saved[0].items():
        signal.signal(s, handler)
    sys.unraisablehook = saved[1]


def test_a_stop_is_recorded_for_its_command_only_and_the_handlers_are_put_back(own_signals):
    """A SIGTERM inside a command is its KeyboardInterrupt, and, where that one is dropped (raised in a hook
    called from C), asked for again at the command's own points; after the command the handlers and the
    unraisable hook are as they were, and the request is forgotten: the next command in the process runs."""
    import signal

    from coatnet import interrupt

    hook = sys.unraisablehook
    with interrupt.stop_on_ctrl_c_and_sigterm():
        interrupt.raise_if_requested()  # nothing asked yet
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):  # the first one dropped: asked for again
            interrupt.raise_if_requested()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == (signal.default_int_handler,
                                                                                   signal.SIG_DFL)
    assert sys.unraisablehook is hook
    try:  # the next command is not stopped by this one's request
        interrupt.raise_if_requested()
        with interrupt.stop_on_ctrl_c_and_sigterm():
            interrupt.raise_if_requested()
    except KeyboardInterrupt:
        pytest.fail("a stop asked for in a command that ended stopped the next one")


def test_a_ctrl_c_that_is_ignored_stays_ignored(own_signals):
    """A job a shell put in the background ignores Ctrl-C: a command keeps it ignored (SIGTERM still stops it)."""
    import signal

    from coatnet import interrupt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupt.stop_on_ctrl_c_and_sigterm():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_only_the_dropped_keyboard_interrupt_goes_unsaid(own_signals):
    """The "Exception ignored" report of the KeyboardInterrupt a stop raised where it was dropped is not
    printed (it is raised again); any other unraisable exception is still reported."""
    import signal
    from types import SimpleNamespace

    from coatnet import interrupt

    seen = []
    sys.unraisablehook = lambda unraisable: seen.append(unraisable.exc_type)
    with interrupt.stop_on_ctrl_c_and_sigterm():
        sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt))  # no stop asked: said
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
        sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt))  # the stop's: not said
        sys.unraisablehook(SimpleNamespace(exc_type=OSError))
    assert seen == [KeyboardInterrupt, OSError]


def test_a_reader_gone_before_the_results_are_written_ends_the_command_quietly():
    """Results small enough to stay in stdout's buffer to the end (`coatnet info --json | true`) are written
    by the command, where a reader gone ends it without a word, status 141, as the reader gone mid-way
    does (test_evaluate.py) (before: Python's "Exception ignored ... BrokenPipeError" at exit, status 120)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([sys.executable, "-m", "coatnet", "info", "coatnet_pico", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # long before it prints: loading torch alone takes a second
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # nothing, where it ended
    assert (proc.returncode, err.decode()) == (141, "")


def test_the_package_names_what_it_exports():
    """`import coatnet` loads the model on first use: its names still import and list as before."""
    done = subprocess.run([sys.executable, "-c", "import coatnet; print(coatnet.models.MBConv.__name__)"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "MBConv\n", done.stderr
    import coatnet
    from coatnet import CoAtNet, create_model

    assert create_model is coatnet.create_model and CoAtNet is coatnet.models.CoAtNet
    assert set(coatnet.__all__) <= set(dir(coatnet))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        coatnet.nothing


def test_each_train_flag_reaches_its_own_setting(monkeypatch):
    """Every flag of `coatnet train` lands in the setting it names, its value as given (a flag parsed
    under another name would be dropped without a word, the recipe's value trained instead)."""
    import coatnet.train

    given = []
    monkeypatch.setattr(coatnet.train, "train", lambda config, **kwargs: given.append(config))
    assert main(["train", "--model", "coatnet_nano", "--img-size", "64", "--epochs", "3", "--batch-size", "24",
                 "--lr", "0.001", "--min-lr", "3e-6", "--warmup-steps", "7", "--weight-decay", "0.02",
                 "--drop-path", "0.15", "--clip-grad", "0.5", "--label-smoothing", "0.2",
                 "--randaugment", "2,9", "--mixup", "0.3", "--cutmix", "0.4", "--ema", "0.99", "--amp",
                 "--channels-last", "--compile", "--grad-checkpointing", "--grad-accum-steps", "2", "--seed", "5",
                 "--workers", "1", "--save-every", "11", "--device", "cpu"]) == 0
    assert main(["train", "--no-aug"]) == 0  # the digits recipe's augmentation turned off
    c, plain = given
    assert plain.augment is False
    assert (c.model, c.img_size, c.epochs, c.batch_size, c.lr, c.min_lr, c.warmup_steps, c.weight_decay) == \
        ("coatnet_nano", 64, 3, 24, 0.001, 3e-6, 7, 0.02)
    assert (c.drop_path, c.clip_grad, c.label_smoothing, c.augment, c.randaugment, c.mixup, c.cutmix, c.ema) == \
        (0.15, 0.5, 0.2, True, (2, 9), 0.3, 0.4, 0.99)  # RandAugment: 2 layers at magnitude 9
    assert (c.amp, c.channels_last, c.compile, c.grad_checkpointing, c.grad_accum_steps, c.seed, c.workers,
            c.save_every, c.device) == (True, True, True, True, 2, 5, 1, 11, "cpu")


def test_info_signs_its_differences_from_the_paper(capsys):
    """Above the paper's figure is +, below it -: an unsigned 1.4% would not say which."""
    assert main(["info", "coatnet_0"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("coatnet_0"))
    assert line.split() == ["coatnet_0", "C-C-T-T", "224", "25.04M", "25.00M", "+0.1%", "4.14B", "4.20B", "-1.4%"]


def test_an_error_raised_in_a_data_loading_worker_is_its_own_line(monkeypatch, capsys):
    """A DataLoader worker's error comes back with the worker's whole traceback as its message: the
    command says the error's own last line, not the traceback's first ("Caught DataError in ...")."""
    message = ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "worker.py", line 1, in _worker_loop\n    data = fetcher.fetch(index)\n'
               "coatnet.data.DataError: cannot read image 'a.png' (Permission denied)\n")

    def failing(*args, **kwargs):
        raise ValueError(message)

    monkeypatch.setattr("coatnet.complexity.measure", failing)
    assert main(["info", "coatnet_pico"]) == 2
    assert capsys.readouterr().err == "coatnet info: error: cannot read image 'a.png' (Permission denied)\n"
