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
    """Nothing already written is lost: not a user's file, not the checkpoint's own weights."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    weights = folder / "model.safetensors"
    for existing in (notes, weights):
        before = existing.read_bytes()
        refused(capsys, ["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(existing)],
                f"output '{existing}' exists; give another path, or overwrite it (--overwrite")
        assert existing.read_bytes() == before
    assert main(["export", "--checkpoint", str(folder), "--format", "torchscript", "--output", str(notes),
                 "--overwrite"]) == 0
    assert torch.jit.load(str(notes)) is not None and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_output_under_a_file(folder, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"an earlier export")
    before = tree(tmp_path)
    refused(capsys, ["export", "--checkpoint", str(folder), "--format", "onnx", "--output",
                     str(tmp_path / "m.onnx" / "sub.onnx")],
            f"'{tmp_path / 'm.onnx'}' is a file, so it cannot hold '{tmp_path / 'm.onnx' / 'sub.onnx'}'")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("flag,value,message", [
    ("--img-size", "100000", "image size 100000 is out of range; give a multiple of the model's stride 16 from 16 "
                             "to 4096"),
    ("--img-size", "4112", "image size 4112 is out of range"),  # a multiple of the stride, but above the bound
    ("--img-size", "0", "image size 0 is out of range"),
    ("--img-size", "-16", "image size -16 is out of range"),
    ("--img-size", "40", "not a multiple of the model's stride 16"),
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
