"""`coatnet export` refuses bad input in one line, exit status 2, before it exports, and writes nothing."""

import pytest
import torch

import coatnet
from coatnet.cli import main
from coatnet.export import export_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return coatnet.create_model("coatnet_pico", num_classes=7).save_pretrained(tmp_path_factory.mktemp("pico") / "m")


def tree(path):
    """Every file and folder under ``path``, with the files' contents."""
    return {p.relative_to(path): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def refused(capsys, argv, *fragments):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("coatnet export: error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("format,suffix", [("onnx", ".onnx"), ("torchscript", ".pt"), ("exported", ".pt2")])
def test_output_that_is_a_folder(folder, tmp_path, capsys, format, suffix):
    out = tmp_path / "exports"
    (out / "old").mkdir(parents=True)
    (out / "old" / "m.onnx").write_bytes(b"an earlier export")
    before = tree(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", format, "--output", str(out)],
            f"'{out}' is a folder; give a file path like '{out / ('model' + suffix)}'")
    assert tree(tmp_path) == before  # the folder as it was, no temporary file beside it


def test_an_existing_output_is_replaced_only_with_overwrite(folder, tmp_path, capsys):
    """Nothing already written is lost: not a user's file; not the files of a model folder (the
    checkpoint's own weights), even with --overwrite (before: replaced by the export, the checkpoint
    broken)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    before = notes.read_bytes()
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(notes)],
            f"output '{notes}' exists; give another path, or overwrite it (--overwrite")
    assert notes.read_bytes() == before
    for name in ("model.safetensors", "config.json", "ema.safetensors"):  # the last one not there yet
        existing = folder / name
        before = existing.read_bytes() if existing.exists() else None
        refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(existing),
                         "--overwrite"], f"output '{existing}' is a file of the model folder '{folder}', which it "
                                         f"would break; give another path")
        assert (existing.read_bytes() if existing.exists() else None) == before
    roundabout = f"{folder}/new/../model.safetensors"  # the same file, however the path reaches it
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", roundabout,
                     "--overwrite"], "is a file of the model folder")
    assert not (folder / "new").exists()
    assert main(["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(notes),
                 "--overwrite"]) == 0
    assert torch.jit.load(str(notes)) is not None and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_weights_file_exported_is_not_replaced_by_the_export(tmp_path, capsys):
    """`--model NAME --checkpoint w.pt --format torchscript --output w.pt --overwrite` (TorchScript's suffix is a
    weights file's too): refused, the weights kept (before: replaced by the export, which no command then read
    as weights); an earlier export of them is still replaced."""
    weights = tmp_path / "w.pt"
    torch.save(coatnet.create_model("coatnet_pico", num_classes=3).state_dict(), weights)
    before = weights.read_bytes()
    for output in (weights, tmp_path / "new" / ".." / "w.pt"):  # however the path reaches it
        refused(capsys, ["export", "--model", "coatnet_pico", "--checkpoint", str(weights), "--format", "torchscript",
                         "--output", str(output), "--overwrite"],
                f"output '{output}' is the weights file the model is read from; give another path")
    assert weights.read_bytes() == before and not (tmp_path / "new").exists()
    (tmp_path / "w.ts.pt").write_bytes(b"an earlier export")
    assert main(["export", "--model", "coatnet_pico", "--checkpoint", str(weights), "--format", "torchscript",
                 "--output", str(tmp_path / "w.ts.pt"), "--overwrite"]) == 0
    # the export given back as weights: said to be one
    refused(capsys, ["export", "--model", "coatnet_pico", "--checkpoint", str(tmp_path / "w.ts.pt"), "--format",
                     "onnx", "--output", str(tmp_path / "w.onnx")],
            "is an exported model (TorchScript, run by torch.jit.load), not weights")
    assert not (tmp_path / "w.onnx").exists()


def test_an_output_under_a_file(folder, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    before = tree(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "onnx", "--output",
                     str(tmp_path / "m.onnx" / "sub.onnx")],
            f"'{tmp_path / 'm.onnx'}' is a file, so it cannot hold '{tmp_path / 'm.onnx' / 'sub.onnx'}'")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag,value,message", [
    ("--img-size", "100000", "image size 100000: give an integer multiple of the model's stride 16 from 16 to 4096"),
    ("--img-size", "4112", "image size 4112: give"),  # a multiple of the stride, but above the bound
    ("--img-size", "0", "image size 0: give"),
    ("--img-size", "-16", "image size -16: give"),
    ("--img-size", "40", "not a multiple of the model's stride 16"),
    # the flag's values near it, as eval and predict name them (before: "resize or crop to e.g. 48x48", of images)
    ("--img-size", "33", "--img-size 33 is not a multiple of the model's stride 16; pass --img-size 32 or "
                         "--img-size 48"),
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got '0'"),
])
def test_input_size_out_of_range(folder, tmp_path, capsys, flag, value, message):
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output",
                     str(tmp_path / "m.pt"), flag, value], message)
    assert list(tmp_path.iterdir()) == []


def test_largest_size_is_accepted(folder):
    """The bound itself is a valid size: checked on the meta device, without running a 4096-pixel export."""
    from coatnet.export import MAX_IMG_SIZE, check_img_size

    check_img_size(coatnet.from_pretrained(folder), MAX_IMG_SIZE)


def test_a_model_over_two_gib_is_refused_as_onnx_and_nothing_is_left(tmp_path):
    """CoAtNet-5's float32 weights (2.7 GB) exceed what one ONNX (protobuf) file holds. Said in one line
    before anything is traced (here on the meta device: no weights exist), with what to use instead;
    only the user's own folder of that name stays."""
    with torch.device("meta"):
        model = coatnet.create_model("coatnet_5", img_size=32)
    (tmp_path / ".tmp-m.onnx").mkdir()  # a folder of the user's, named as an earlier version named its own
    (tmp_path / ".tmp-m.onnx" / "keep").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(ValueError, match="an ONNX file holds at most 2 GiB and coatnet_5's graph at 32x32 is more; "
                                         "export it with --format exported"):
        export_model(model, "onnx", tmp_path / "m.onnx")
    assert tree(tmp_path) == before


def test_an_output_that_appears_while_exporting_is_kept(folder, tmp_path, monkeypatch):
    """Without overwrite, a file written at the output's path during the export (a second export, a
    copy) is not replaced at its end: the export fails in one line and leaves nothing of its own."""
    import coatnet.export as export

    out = tmp_path / "m.pt"
    trace = export._EXPORTERS["torchscript"]

    def meanwhile(*args):
        trace(*args)
        out.write_text("written meanwhile")
    monkeypatch.setitem(export._EXPORTERS, "torchscript", meanwhile)
    with pytest.raises(ValueError, match="appeared while exporting, and is kept"):
        export_model(coatnet.from_pretrained(folder), "torchscript", out)
    assert out.read_text() == "written meanwhile" and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_refused_export_leaves_no_folder_and_clears_a_killed_ones_files(tmp_path):
    """Folders the export made are removed when it fails; the temporary files of an export killed
    outright (its process gone) are removed by the next one there, anyone else's kept."""
    import os

    model = coatnet.create_model("coatnet_pico", num_classes=7).to(torch.bfloat16)
    with pytest.raises(ValueError, match="onnxruntime runs no bfloat16 convolutions"):
        export_model(model, "onnx", tmp_path / "a" / "b" / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    killed = tmp_path / ".tmp-m.pt-999999999-x1"  # no such process
    running = tmp_path / f".tmp-m.pt-{os.getpid()}-x2"
    mine = tmp_path / ".tmp-m.pt-999999999-x3"  # a user's folder of that shape
    for path in (killed, running, mine):
        path.mkdir()
        (path / "m.pt").write_bytes(b"half")
    (mine / "notes.txt").write_text("mine")
    export_model(model.float(), "torchscript", tmp_path / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.pt", running.name, mine.name])


def test_python_api_sizes_and_suffixes(tmp_path):
    import numpy as np

    model = coatnet.create_model("coatnet_pico", num_classes=7).eval()
    program = torch.jit.load(str(export_model(model, "torchscript", tmp_path / "a.pt", img_size=[32, 64])))
    assert program(torch.randn(1, 3, 32, 64)).shape == (1, 7)
    export_model(model, "torchscript", tmp_path / "b.pt", img_size=np.int64(32).item())
    for kwargs, message in ((dict(img_size=32.0), "image size 32.0: give an integer multiple"),
                            (dict(img_size=(32,)), r"image size \(32,\): give one side, or \(height, width\)"),
                            (dict(img_size=[32, 32, 32]), r"image size \[32, 32, 32\]: give one side"),
                            (dict(batch_size=2.5), "batch size must be an integer of at least 1, got 2.5")):
        with pytest.raises(ValueError, match=message):
            export_model(model, "torchscript", tmp_path / "c.pt", **kwargs)
    with pytest.raises(ValueError, match="torch.export's files end in .pt2; give an output like '.*m.pt2'"):
        export_model(model, "exported", tmp_path / "m.bin")


def test_sigterm_stops_an_export_as_ctrl_c_does(folder, tmp_path):
    """Stopped by SIGTERM (timeout, a job scheduler) during the export: one line, status 130, and its
    half-written file removed."""
    import subprocess
    import sys

    script = f"""
import os, signal, time
import coatnet.export as export
from coatnet.cli import main

def half_written(model, example, output, *rest):
    output.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
export._EXPORTERS["torchscript"] = half_written
raise SystemExit(main(["export", "--checkpoint", {str(folder)!r}, "--format", "torchscript",
                       "--output", {str(tmp_path / "m.pt")!r}]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "coatnet export: interrupted\n")
    assert list(tmp_path.iterdir()) == []


def test_an_output_ending_in_a_slash_is_a_folder(folder, tmp_path, capsys):
    """`--output exports/` names a folder: refused as an existing folder is (before: a file named
    `exports` was written, Path() having dropped the slash)."""
    out = tmp_path / "exports"
    for named in (f"{out}/", f"{out}/."):
        refused(capsys, ["export", "--checkpoint", str(folder), "--format", "onnx", "--output", named],
                "is a folder; give a file path like")
    assert list(tmp_path.iterdir()) == []


def test_a_link_to_nothing_at_the_output_is_an_existing_output(folder, tmp_path, capsys):
    """A dangling link is refused at once as an existing output (before: exported, then refused as
    a file that "appeared while exporting")."""
    link = tmp_path / "m.pt"
    link.symlink_to(tmp_path / "nowhere.pt")
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(link)],
            f"output '{link}' exists; give another path, or overwrite it (--overwrite")
    assert link.is_symlink() and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_models_an_exporter_cannot_take_are_refused_before_tracing(tmp_path, capfd):
    """A float64 model (the exporter failed on the attention's mask, after printing its whole graph)
    and, for torch.export, weights made under inference_mode (torch's own RuntimeError): each one
    line, nothing traced, nothing written."""
    model = coatnet.create_model("coatnet_pico", num_classes=7).double()
    with pytest.raises(ValueError, match="the ONNX exporter takes no float64 attention: export the float32 model"):
        export_model(model, "onnx", tmp_path / "m.onnx")
    with torch.inference_mode():
        model = coatnet.create_model("coatnet_pico", num_classes=7)
    with pytest.raises(ValueError, match="inference tensors .* torch.export cannot trace"):
        export_model(model, "exported", tmp_path / "m.pt2")
    assert capfd.readouterr().err == "" and list(tmp_path.iterdir()) == []


def test_an_export_run_from_another_thread(folder, tmp_path):
    """main() in a thread (a GUI, a server) exports: only the SIGTERM handler is left out (before:
    refused, "signal only works in main thread")."""
    import threading

    done = []
    thread = threading.Thread(target=lambda: done.append(main(
        ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(tmp_path / "m.pt")])))
    thread.start()
    thread.join()
    assert done == [0] and torch.jit.load(str(tmp_path / "m.pt")) is not None


def test_a_killed_exports_files_are_cleared_whatever_its_name(tmp_path):
    """The temporary folder of an export killed outright is found by its name taken literally: a
    name with [ ] is no pattern (before: never matched, so never removed)."""
    killed = tmp_path / ".tmp-m[1].pt-999999999-x1"  # no such process
    killed.mkdir()
    (killed / "m[1].pt").write_bytes(b"half")
    export_model(coatnet.create_model("coatnet_pico", num_classes=7), "torchscript", tmp_path / "m[1].pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m[1].pt"]


def test_a_full_disk_is_one_line_and_leaves_nothing(folder, tmp_path, capsys):
    """A tmpfs, where this machine lets the tests mount one. Without room for the weights, each format
    is refused before tracing; with room for the weights but not the file, ONNX and torch.export fail
    as they write: one line naming the output, the half-written file removed and closed (before:
    TorchScript and torch.export aborted the process, torch's writer throwing a second error in its
    destructor, and left it)."""
    import os
    import subprocess

    weights = (folder / "model.safetensors").stat().st_size
    for size, formats in ((2**20, ("torchscript", "exported", "onnx")), (weights + 2**14, ("exported", "onnx"))):
        mount = tmp_path / f"small-{size}"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        try:
            for format in formats:
                output = mount / f"m{ {'torchscript': '.pt', 'exported': '.pt2', 'onnx': '.onnx'}[format]}"
                said = "MiB free, the weights alone take" if size == 2**20 else "No space left on device"
                refused(capsys, ["export", "--checkpoint", str(folder), "--format", format, "--output", str(output)],
                        said, f": {output}")
                assert list(mount.iterdir()) == []
            assert not [fd for fd in os.listdir("/proc/self/fd")
                        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(mount))]
        finally:
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mount)], check=False)


def test_export_under_torchrun_is_refused_once(folder, tmp_path, capsys, monkeypatch):
    """As eval and predict: every process would export the same file, all but one then refused as "appeared
    while exporting" (before: the job failed that way, its file written). The first process says it; the
    others leave with status 2 and say nothing (eval and predict too: before, each said it)."""
    out = tmp_path / "m.onnx"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "onnx", "--output", str(out)],
            "coatnet export runs in one process: run it without torchrun (WORLD_SIZE unset)")
    monkeypatch.setenv("RANK", "1")
    for command in (["export", "--format", "onnx", "--output", str(out)], ["eval"], ["predict", "x.png"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([*command, "--checkpoint", str(folder)])
        assert e.value.code == 2 and capsys.readouterr().err == ""
    assert not out.exists()


def test_an_output_that_is_no_regular_file_is_refused_even_with_overwrite(folder, tmp_path, capsys):
    """`--output /dev/null --overwrite` (a check that the export runs): the export's file was renamed over
    the device, so that, run as root (a container), the system's /dev/null became a regular file holding
    the model. A FIFO stands for it here: refused, kept as it was, nothing written beside it."""
    import os
    import stat

    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    link = tmp_path / "stdout.onnx"  # as /dev/stdout: a link to what is no regular file
    link.symlink_to(fifo)
    for out in (fifo, link):
        for fmt in ("onnx", "torchscript"):
            refused(capsys, ["export", "--checkpoint", str(folder), "--format", fmt, "--output", str(out),
                             "--overwrite"], f"output '{out}' is not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe.onnx", "stdout.onnx"]


def test_a_timm_repositorys_own_weights_are_not_replaced_by_the_export(tmp_path, capsys):
    """A timm repository downloaded into a folder (its config.json and pytorch_model.bin) is a model folder
    too: `--output FOLDER/pytorch_model.bin --overwrite` is refused as model.safetensors is (before: its
    weights replaced by the TorchScript export, the folder then refused by every command)."""
    import json

    folder = tmp_path / "w"
    folder.mkdir()
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=7)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architecture": "coatnet_pico", "num_classes": 7}))
    before = tree(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output",
                     str(folder / "pytorch_model.bin"), "--overwrite"],
            f"output '{folder / 'pytorch_model.bin'}' is a file of the model folder '{folder}'")
    assert tree(tmp_path) == before


def test_export_of_a_run_directory_says_which_checkpoint_it_exports(tmp_path, capsys):
    """As eval and predict say it: a run directory stands for `last`, which is not `best` (before: no word
    of which checkpoint's weights went into the file)."""
    from coatnet.models.folder import write_model_folder

    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=7)
    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"ckpt-0000000{step}").mkdir(parents=True)
        write_model_folder(run / f"ckpt-0000000{step}", {"model": model.config.name, "config": model.config.to_dict(),
                                                         "pretrained_cfg": model.pretrained_cfg.to_dict()}, model)
    (run / "last").symlink_to("ckpt-00000002")
    (run / "best").symlink_to("ckpt-00000001")
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]) == 0
    assert f"coatnet export: using {run / 'last'} -> ckpt-00000002" in capsys.readouterr().err


@pytest.mark.parametrize("format,output", [("torchscript", "m.onnx"), ("onnx", "m.pt"), ("onnx", "m.pt2"),
                                           ("torchscript", "m.pt2")])
def test_an_output_named_as_another_formats_file_is_refused(folder, tmp_path, capsys, format, output):
    """A TorchScript archive written as `m.onnx`, or an ONNX file as `m.pt` (before: written without a word;
    onnxruntime then failed to parse it, and `coatnet predict --model NAME --checkpoint m.pt` called the ONNX
    file "corrupt, truncated or not a weights file")."""
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", format, "--output", str(tmp_path / output)],
            "give an output like")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("format,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_a_compiled_model_exports_as_the_model_it_wraps(tmp_path, format, suffix):
    """`export_model(torch.compile(model), ...)`: the model torch.compile wraps (before: torch's RuntimeError,
    "Detected that you are using FX to torch.jit.trace a dynamo-optimized function", for ONNX and TorchScript)."""
    torch.manual_seed(0)
    model = coatnet.create_model("coatnet_pico", num_classes=7).eval()
    out = export_model(torch.compile(model), format, tmp_path / f"m{suffix}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
    if format == "onnx":
        ort = pytest.importorskip("onnxruntime")
        got = torch.from_numpy(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                               .run(None, {"images": x.numpy()})[0])
    else:
        got = torch.jit.load(str(out))(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_preprocessing_recorded_is_of_the_size_exported_at(tmp_path):
    """A server reads the input size from the file: the export's, not the size the model was built at."""
    import json

    from coatnet.export import PREPROCESSING_KEY

    model = coatnet.create_model("coatnet_pico", img_size=32, num_classes=3).eval()
    files = {PREPROCESSING_KEY: ""}
    torch.jit.load(str(export_model(model, "torchscript", tmp_path / "m.pt", img_size=[64, 32])), _extra_files=files)
    recorded = json.loads(files[PREPROCESSING_KEY])
    assert recorded["input_size"] == [3, 64, 32]
    assert recorded["mean"] == list(model.pretrained_cfg.mean) and recorded["std"] == list(model.pretrained_cfg.std)


def test_a_model_built_not_square_is_exported_at_its_own_height_and_width(tmp_path):
    import json

    from coatnet.export import PREPROCESSING_KEY

    model = coatnet.create_model("coatnet_pico", img_size=(32, 64), num_classes=3).eval()
    files = {PREPROCESSING_KEY: ""}
    program = torch.jit.load(str(export_model(model, "torchscript", tmp_path / "m.pt")), _extra_files=files)
    assert json.loads(files[PREPROCESSING_KEY])["input_size"] == [3, 32, 64]
    assert program(torch.randn(1, 3, 32, 64)).shape == (1, 3)
