"""Tests for coatnet.data: data sets, transforms, bad-input handling. All inputs are generated."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from coatnet.data import DATASETS, DataBundle, DataError, build_datasets, load_image, mixup_cutmix
from coatnet.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD, PixelRangeError, PretrainedCfg, as_shown
from coatnet.models.preprocessing import eval_transform as _eval_transform


def eval_transform(size: int):
    """Our default evaluation transform at ``size``."""
    return _eval_transform(size, PretrainedCfg.for_size(size))

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalized(uint8_chw: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(uint8_chw).float() / 255 - MEAN) / STD


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return build_datasets("digits", img_size=32)


def test_digits_split_sizes_and_stratification(digits):
    n_train, n_val = len(digits.train), len(digits.val)
    assert n_train + n_val == 1797
    assert n_val == 360  # ceil(0.2 * 1797)
    val_labels = [digits.val[i][1] for i in range(n_val)]
    counts = np.bincount(val_labels, minlength=10)
    assert (counts >= 30).all(), counts  # stratified: every digit ~36 times in val


def test_digits_split_is_the_documented_one():
    """Same split and pixel conversion as an independent sklearn call (img_size 8: no resize)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    _, x_va, _, y_va = train_test_split(
        d.images, d.target, test_size=0.2, stratify=d.target, random_state=0
    )
    b = build_datasets("digits", img_size=8)
    for i in (0, 7, 359):
        img, label = b.val[i]
        assert label == y_va[i]
        expected = np.rint(x_va[i] * 255 / 16).astype(np.uint8)
        torch.testing.assert_close(img, normalized(np.stack([expected] * 3)))


@pytest.mark.parametrize("cfg", [None, PretrainedCfg(crop_pct=0.5, interpolation="nearest")])
def test_digits_are_prepared_as_predict_prepares_a_scan(cfg):
    """An 8x8 scan given to ``coatnet predict`` (eval_transform) becomes the image the data set holds,
    as the preprocessing says: by default, at 64 px too, the whole scan without a crop."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from coatnet.data import default_preprocessing

    cfg = cfg or default_preprocessing("digits", 64)
    assert cfg.crop_pct == (1.0 if cfg.interpolation == "bilinear" else 0.5)
    d = load_digits()
    _, x_va, _, _ = train_test_split(d.images, d.target, test_size=0.2, stratify=d.target, random_state=0)
    held = build_datasets("digits", img_size=64, preprocessing=cfg).val
    for i in (0, 7):
        scan = Image.fromarray(np.rint(x_va[i] * 255 / 16).astype(np.uint8))
        torch.testing.assert_close(held[i][0], _eval_transform(64, cfg)(scan))


def test_digits_deterministic_across_builds(digits):
    other = build_datasets("digits", img_size=32, data_dir="/ignored/for/digits")
    for split in ("train", "val"):
        for i in (0, 100, 1000 % len(getattr(digits, split))):
            a, la = getattr(digits, split)[i]
            b, lb = getattr(other, split)[i]
            assert la == lb
            assert torch.equal(a, b)


def test_digits_no_random_flip_by_default(digits):
    a = digits.train[5][0]
    assert not torch.equal(a, a.flip(-1))  # an asymmetric digit, so a flip would show
    for seed in range(10):
        torch.manual_seed(seed)
        assert torch.equal(a, digits.train[5][0])


def test_digits_classes(digits):
    assert digits.classes == tuple("0123456789")
    assert digits.num_classes == 10
    assert digits.skipped_files == 0


@pytest.mark.parametrize("img_size", [32, 48])
def test_sample_shape_and_dtype(img_size):
    b = build_datasets("digits", img_size=img_size, randaugment=(2, 9), hflip=True)
    for ds in (b.train, b.val):
        img, label = ds[3]
        assert img.shape == (3, img_size, img_size)
        assert img.dtype == torch.float32
        assert type(img) is torch.Tensor  # plain tensor, not a tv_tensor subclass
        assert isinstance(label, int)


def test_augmentation_uses_only_torch_rng():
    b = build_datasets("digits", img_size=32, randaugment=(2, 15), hflip=True)
    draws = []
    for py_seed in (0, 123):
        random.seed(py_seed)
        np.random.seed(py_seed)
        torch.manual_seed(7)
        draws.append(torch.stack([b.train[i][0] for i in range(8)]))
    assert torch.equal(draws[0], draws[1])
    torch.manual_seed(8)
    assert not torch.equal(draws[0], torch.stack([b.train[i][0] for i in range(8)]))


# ----------------------------------------------------------------------------- image folder


def write_image(path: Path, seed: int, fmt: str, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8)  # 20 wide x 24 high
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)


def make_tree(root: Path, classes=("cat", "dog", "bird"), per_class=3) -> Path:
    seed = 0
    for split in ("train", "val"):
        for cls in classes:
            for k in range(per_class):
                seed += 1
                fmt, ext = (("PNG", ".png"), ("JPEG", ".jpg"))[k % 2]
                write_image(root / split / cls / f"{k}{ext}", seed, fmt, "L" if k == 2 else "RGB")
    return root


def test_imagefolder_skips_garbage_and_loads_everything(tmp_path):
    root = make_tree(tmp_path)
    (root / "train" / "dog" / "broken.png").write_bytes(b"this is not a png at all")
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored by extension")
    with pytest.warns(UserWarning, match="broken.png"):
        b = build_datasets("imagefolder", root, img_size=16, randaugment=(2, 9))
    assert b.skipped_files == 1
    assert b.classes == ("bird", "cat", "dog")  # sorted
    assert (len(b.train), len(b.val)) == (9, 9)
    for ds in (b.train, b.val):
        labels = []
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.shape == (3, 16, 16) and img.dtype == torch.float32
            labels.append(label)
        assert sorted(set(labels)) == [0, 1, 2]
    assert b.train.skipped_at_load == 0


def test_imagefolder_for_evaluation_leaves_train_unread(tmp_path):
    """`coatnet eval` builds the validation split alone: train/'s files (1.28M for ImageNet) are not
    scanned, a broken one there is not reported, and train/ need not be there at all."""
    import warnings

    root = make_tree(tmp_path)
    (root / "train" / "dog" / "broken.png").write_bytes(b"this is not a png at all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = build_datasets("imagefolder", root, img_size=16, train=False)
    assert b.train is None and len(b.val) == 9 and b.skipped_files == 0 and b.classes == ("bird", "cat", "dog")
    shutil.rmtree(root / "train")
    assert build_datasets("imagefolder", root, img_size=16, train=False).classes == ("bird", "cat", "dog")


def test_imagefolder_val_is_deterministic(tmp_path):
    b = build_datasets("imagefolder", make_tree(tmp_path), img_size=16)
    torch.manual_seed(0)
    a = b.val[4][0]
    torch.manual_seed(1)
    assert torch.equal(a, b.val[4][0])


def test_truncated_jpeg_is_skipped_at_load(tmp_path):
    root = make_tree(tmp_path)
    bad = root / "train" / "bird" / "1.jpg"  # index 1 of the train set (bird/0.png, bird/1.jpg, ...)
    data = bad.read_bytes()
    sos = data.index(b"\xff\xda")  # start of scan: everything before it is header
    bad.write_bytes(data[: sos + (len(data) - sos) // 2])  # header intact, pixel data cut
    b = build_datasets("imagefolder", root, img_size=16)
    assert b.skipped_files == 0  # the header check cannot see this
    assert b.train.samples[1][0] == str(bad)
    with pytest.warns(UserWarning, match="1.jpg"):
        img, label = b.train[1]
    assert img.shape == (3, 16, 16)
    assert b.train.samples[2][1] == label == 0  # the next sample (bird/2.jpg...) came back
    assert b.train.skipped_at_load == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known-bad file is not decoded or warned about again
        b.train[1]
    assert b.train.skipped_at_load == 1


def test_undecodable_images_found_by_loader_workers_are_counted(tmp_path):
    """The count reaches the main process (summary.json's skipped_files) with --workers too."""
    root = make_tree(tmp_path)
    for bad in (root / "train" / "bird" / "1.jpg", root / "train" / "cat" / "1.jpg"):
        data = bad.read_bytes()
        sos = data.index(b"\xff\xda")
        bad.write_bytes(data[: sos + (len(data) - sos) // 2])
    b = build_datasets("imagefolder", root, img_size=16)
    labels = torch.cat([y for _, y in torch.utils.data.DataLoader(b.train, batch_size=4, num_workers=2)])
    assert len(labels) == 9 and b.train.skipped_at_load == 2


def test_undecodable_images_found_by_other_processes_are_counted(tmp_path, monkeypatch):
    """Under torchrun each process reads its share of the files: summary.json counts those any of them
    found undecodable, each once (before: those of the first process alone)."""
    import torch.distributed as dist

    from coatnet.train import Dist, skipped_data_files

    b = build_datasets("imagefolder", make_tree(tmp_path), img_size=16)
    b.train.undecodable[1] = True  # this process read one bad file

    def all_reduce(marks, op):  # the other process read that one too, and another
        assert op == dist.ReduceOp.MAX
        theirs = torch.zeros_like(marks)
        theirs[[1, 4]] = 1
        marks.copy_(torch.maximum(marks, theirs))
        reduced.append(marks)

    reduced = []
    monkeypatch.setattr("coatnet.train.dist.all_reduce", all_reduce)
    assert skipped_data_files(b, Dist(0, 2, torch.device("cpu"))) == 2
    assert skipped_data_files(b, Dist(0, 1, torch.device("cpu"))) == 1
    # Data sets held in memory have nothing to count, nor to reduce (NCCL would refuse a CPU tensor).
    assert skipped_data_files(build_datasets("digits", img_size=8), Dist(0, 2, torch.device("cpu"))) == 0
    assert len(reduced) == 1


def test_an_undecodable_validation_image_is_left_out_of_the_evaluation(tmp_path):
    """Not counted under its label with another file's pixels: the evaluation covers the decodable
    images only, as an independent count of them gives."""
    from coatnet import create_model
    from coatnet.evaluate import evaluate

    root = make_tree(tmp_path)
    bad = root / "val" / "dog" / "1.jpg"  # the last class: its stand-in would be bird/0.png, another class
    data = bad.read_bytes()
    sos = data.index(b"\xff\xda")
    bad.write_bytes(data[: sos + (len(data) - sos) // 2])
    b = build_datasets("imagefolder", root, img_size=32)
    torch.manual_seed(0)
    model = create_model("coatnet_pico", num_classes=3, img_size=32).eval()
    with pytest.warns(UserWarning, match="1.jpg"):
        result = evaluate(model, torch.utils.data.DataLoader(b.val, batch_size=4), torch.device("cpu"), 3)
    good = [(b.val[i][0], label) for i, (path, label) in enumerate(b.val.samples) if path != str(bad)]
    with torch.no_grad():
        predicted = model(torch.stack([image for image, _ in good])).argmax(1)
    labels = torch.tensor([label for _, label in good])
    assert result["count"] == len(good) == 8 and b.val.skipped_at_load == 1
    assert result["top1"] == pytest.approx(100 * (predicted == labels).float().mean().item())
    assert result["confusion"].sum() == 8


def test_imagefolder_follows_linked_folders_but_not_back_into_the_split(tmp_path):
    """A linked folder inside a class folder is read, as torchvision reads it (before: left out without
    a word); one leading back into the split or in a loop is skipped, saying so."""
    root = make_tree(tmp_path)
    train, more = root / "train", tmp_path / "elsewhere" / "more"
    try:
        (train / "cat" / "up").symlink_to("..", target_is_directory=True)  # would list train/ again
    except OSError:
        pytest.skip("cannot create symlinks here")
    (train / "dog" / "birds").symlink_to("../bird", target_is_directory=True)  # bird's images, as dogs
    (train / "dog" / "linked.png").symlink_to("../cat/0.png")  # a symlinked file is read
    write_image(more / "3.png", 98, "PNG")
    (more / "again").symlink_to(more, target_is_directory=True)  # a loop
    (train / "cat" / "more").symlink_to(more, target_is_directory=True)
    (train / "cat" / "same").symlink_to(more, target_is_directory=True)  # beside another link to it: once
    (tmp_path / "elsewhere" / "fish").mkdir(parents=True)
    write_image(tmp_path / "elsewhere" / "fish" / "0.png", 99, "PNG")
    for split in ("train", "val"):  # a symlinked class folder is a class
        (root / split / "fish").symlink_to(tmp_path / "elsewhere" / "fish", target_is_directory=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_datasets("imagefolder", root, img_size=16)
    assert b.classes == ("bird", "cat", "dog", "fish")
    assert [(Path(p).relative_to(train).as_posix(), label) for p, label in b.train.samples] == [
        ("bird/0.png", 0), ("bird/1.jpg", 0), ("bird/2.png", 0), ("cat/0.png", 1), ("cat/1.jpg", 1),
        ("cat/2.png", 1), ("cat/more/3.png", 1), ("dog/0.png", 2), ("dog/1.jpg", 2), ("dog/2.png", 2),
        ("dog/linked.png", 2), ("fish/0.png", 3)]
    skipped = sorted((str(w.message).split("'")[1], str(w.message).split(": ")[1]) for w in caught
                     if str(w.message).startswith("skipping folder"))
    loop = "it leads to the split's folder or above it, a loop; remove the link"
    listed = "its images are listed through another path already; remove the link"
    assert skipped == [(str(train / "cat" / "more" / "again"), listed), (str(train / "cat" / "same"), listed),
                       (str(train / "cat" / "up"), loop), (str(train / "dog" / "birds"), listed)]


@pytest.mark.parametrize("link", ["folder into val", "file into train", "val is train", "one file elsewhere",
                                  "other files elsewhere", "none"])
def test_images_shared_by_train_and_val_through_links_are_named(tmp_path, link):
    """A link from one split into the other made the validation accuracy count images trained on,
    without a word (before); it is a warning naming the link (a deliberate val -> train link still runs)."""
    root = make_tree(tmp_path)
    try:
        if link == "folder into val":
            (root / "train" / "cat" / "more").symlink_to(root / "val" / "cat", target_is_directory=True)
        elif link == "file into train":
            (root / "val" / "dog" / "3.png").symlink_to(root / "train" / "dog" / "0.png")
        elif link == "val is train":
            shutil.rmtree(root / "val")
            (root / "val").symlink_to(root / "train", target_is_directory=True)
        elif link.endswith("elsewhere"):  # a photo library, its files linked into the splits
            (tmp_path / "photos").mkdir()
            for i in range(2):
                write_image(tmp_path / "photos" / f"{i}.png", i, "PNG")
            (root / "train" / "cat" / "x.png").symlink_to(tmp_path / "photos" / "0.png")
            (root / "val" / "cat" / "y.png").symlink_to(tmp_path / "photos" / f"{int(link.startswith('other'))}.png")
    except OSError:
        pytest.skip("cannot create symlinks here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_datasets("imagefolder", root, img_size=16)
    shared = [str(w.message) for w in caught if "share images" in str(w.message)]
    if link in ("none", "other files elsewhere"):
        assert shared == []
    else:
        through = {"folder into val": root / "train" / "cat" / "more", "file into train": root / "val" / "dog" / "3.png",
                   "val is train": root / "val", "one file elsewhere": root / "train" / "cat" / "x.png"}[link]
        assert shared == [f"train/ and val/ in '{root}' share images (through '{through}'): the validation accuracy "
                          "counts images trained on; remove the link for a held-out measure"]


@pytest.fixture
def no_hang():
    """Fails a test that blocks for 5 s (opening a FIFO waits for a writer) instead of hanging the run."""
    import signal

    def timeout(*_):  # pytest's failure, which no "except OSError" of the code under test catches
        pytest.fail("blocked for 5 s: a FIFO was opened")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_as_an_image_is_skipped_and_counted(tmp_path, no_hang):
    """Opening a FIFO waits for a writer: the header scan hung (before); it is skipped as not an image file."""
    root = make_tree(tmp_path)
    os.mkfifo(root / "val" / "cat" / "pipe.png")
    with pytest.warns(UserWarning, match=r"pipe.png': not an image file but a FIFO \(named pipe\); give a JPEG"):
        b = build_datasets("imagefolder", root, img_size=16)
    assert b.skipped_files == 1 and len(b.val) == 9
    with pytest.raises(DataError, match=r"pipe.png': not an image file but a FIFO"):
        load_image(root / "val" / "cat" / "pipe.png")


def test_a_file_the_system_cannot_open_is_said_to_be_one(tmp_path, monkeypatch):
    """A link to nothing, a file the system refuses to open: said as such (before: "not an image file or
    corrupt ([Errno 2] ...)"), and a decompression bomb's line without its doubled stop."""
    root = make_tree(tmp_path)
    (root / "val" / "cat" / "gone.png").symlink_to(tmp_path / "moved.png")
    with pytest.warns(UserWarning, match=rf"gone.png': a link to '{tmp_path / 'moved.png'}', which is not there; "
                                         rf"fix or remove the link"):
        assert build_datasets("imagefolder", root, img_size=16).skipped_files == 1
    with pytest.raises(DataError, match=r"gone.png': a link to .*, which is not there; fix or remove the link$"):
        load_image(root / "val" / "cat" / "gone.png")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("PIL.Image.open", refused)
    with pytest.raises(DataError, match=r"0.png': permission denied; check that it can be read$"):
        load_image(root / "val" / "cat" / "0.png")
    monkeypatch.undo()
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"attack; downscale it$"):
        load_image(root / "val" / "cat" / "0.png")


def test_imagefolder_skips_hidden_entries_at_any_depth(tmp_path):
    root = make_tree(tmp_path)
    cat = root / "train" / "cat"
    write_image(cat / ".ipynb_checkpoints" / "0-checkpoint.png", 50, "PNG")
    (cat / ".ipynb_checkpoints" / "broken.png").write_bytes(b"not a png")  # not even counted
    write_image(cat / "more" / "3.png", 51, "PNG")  # a visible subfolder is read
    write_image(cat / "more" / ".deep" / "4.png", 52, "PNG")
    write_image(cat / "more" / "._3.png", 53, "PNG")  # macOS resource fork name
    for split in ("train", "val"):
        write_image(root / split / ".cache" / "5.png", 54, "PNG")  # hidden class folder
    b = build_datasets("imagefolder", root, img_size=16)
    assert b.classes == ("bird", "cat", "dog") and b.skipped_files == 0
    assert [Path(p).relative_to(cat.parent).as_posix() for p, _ in b.train.samples][3:7] == [
        "cat/0.png", "cat/1.jpg", "cat/2.png", "cat/more/3.png"]
    assert len(b.train) == 10 and len(b.val) == 9


def test_a_class_folder_linked_to_nothing_is_said(tmp_path):
    """A class folder that is a link to a disk not mounted is named, not left out of both splits without a
    word (before: a head of one class fewer, nothing said)."""
    root = make_tree(tmp_path / "data")
    for split in ("train", "val"):
        (root / split / "fish").symlink_to(tmp_path / "unmounted" / split / "fish")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_datasets("imagefolder", root, img_size=16)
    assert b.classes == ("bird", "cat", "dog")
    messages = [str(w.message) for w in caught]
    for split in ("train", "val"):
        assert f"skipping 1 link to nothing in '{root / split}', its class left out: fish -> " \
               f"'{tmp_path / 'unmounted' / split / 'fish'}'; fix or remove the link" in messages


@pytest.mark.parametrize("link", ["to another class", "before its target", "to the split"])
def test_a_class_folder_linked_to_another_class_or_the_split_lists_no_image_twice(tmp_path, link):
    """A class folder that is a link to another class's folder (train/eel -> dog) listed that class's images
    under both labels, and one to the split (train/all -> .) listed every class's folders as its own, without a
    word (before); it is skipped, as such a link inside a class is, and said."""
    root = make_tree(tmp_path)
    train = root / "train"
    name, target = {"to another class": ("eel", "dog"), "before its target": ("ant", "dog"),
                    "to the split": ("all", ".")}[link]
    for split in ("train", "val"):
        try:
            (root / split / name).symlink_to(target, target_is_directory=True)
        except OSError:
            pytest.skip("cannot create symlinks here")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_datasets("imagefolder", root, img_size=16)
    assert b.classes == tuple(sorted(("bird", "cat", "dog", name)))
    listed = [Path(p).relative_to(train).as_posix() for p, _ in b.train.samples]
    assert len(listed) == len(set(os.path.realpath(p) for p, _ in b.train.samples)) == 9  # each image once
    assert not any(p.startswith(name + "/") for p in listed)
    assert [p for p, label in b.train.samples if b.classes[label] == "dog"] == \
        [str(train / "dog" / n) for n in ("0.png", "1.jpg", "2.png")]  # the folder keeps its own name
    messages = [str(w.message) for w in caught]
    assert any(m.startswith(f"skipping class folder '{train / name}'") and m.endswith("; remove the link")
               for m in messages), messages
    assert f"1 class with no images in '{train}': {name}" in messages


def test_imagefolder_class_mismatch(tmp_path):
    root = make_tree(tmp_path)
    (root / "val" / "dog").rename(root / "val" / "wolf")
    with pytest.raises(DataError, match=r"only in train: \['dog'\], only in val: \['wolf'\]"):
        build_datasets("imagefolder", root)


def test_a_val_folder_of_images_not_sorted_by_class_is_said_in_a_short_line(tmp_path):
    """ImageNet's validation images come in one folder: the refusal says so, naming a few of train/'s
    classes (before: all of them, 13,000 characters for ImageNet, and "give both the same classes")."""
    root = make_tree(tmp_path, classes=[f"n{i:08d}" for i in range(40)], per_class=1)
    shutil.rmtree(root / "val")
    write_image(root / "val" / "ILSVRC2012_val_00000001.JPEG", 0, "JPEG")
    write_image(root / "val" / "ILSVRC2012_val_00000002.JPEG", 1, "JPEG")
    with pytest.raises(DataError) as e:
        build_datasets("imagefolder", root)
    assert str(e.value) == (
        f"train/ and val/ in '{root}' have different class folders (only in train: ['n00000000', 'n00000001', "
        f"'n00000002', 'n00000003', 'n00000004', ...] (40), only in val: []); val/ holds 2 images directly, not in "
        f"class folders: move each into {root / 'val'}/<class>/, as train/ holds them")


def test_class_folders_alike_but_in_other_code_points_are_named_as_such(tmp_path):
    """'café' in train/ (NFC) and in val/ as a copy from macOS writes it (NFD) look the same: the
    refusal says why they differ (before: only in train: ['café'], only in val: ['café'])."""
    root = make_tree(tmp_path)
    (root / "train" / "dog").rename(root / "train" / "caf\u00e9")
    (root / "val" / "dog").rename(root / "val" / "cafe\u0301")
    with pytest.raises(DataError, match="café: the same letters in other Unicode code points"):
        build_datasets("imagefolder", root)


def test_what_is_not_read_from_a_folder_is_said(tmp_path):
    """An image directly in train/ has no class: it is said, not left out without a word. An image
    over PIL's limit against decompression bombs is skipped saying so, not called corrupt."""
    root = make_tree(tmp_path)
    write_image(root / "train" / "loose.png", 1, "PNG")
    Image.new("1", (20000, 10000)).save(root / "val" / "cat" / "huge.png")  # 200M pixels, 25 kB
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = build_datasets("imagefolder", root, img_size=16)
    messages = [str(w.message) for w in caught]
    assert f"1 image directly in '{root / 'train'}' not read: an image's class is the folder it is in; move it " \
           f"into {root / 'train'}/<class>/" in messages
    assert any("huge.png': Image size (200000000 pixels) exceeds limit" in m and m.endswith("downscale it")
               for m in messages), messages
    assert b.skipped_files == 1 and len(b.train) == 9


def test_imagefolder_bad_directories(tmp_path):
    with pytest.raises(DataError, match="needs a data directory"):
        build_datasets("imagefolder")
    with pytest.raises(DataError, match="does not exist"):
        build_datasets("imagefolder", tmp_path / "nope")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no val/ folder \(nor validation/, valid/, eval/, evaluation/, as timm takes "
                                        r"it\); lay out images as .*/train/<class>/.* and .*/val/<class>/"):
        build_datasets("imagefolder", tmp_path)
    with pytest.raises(DataError, match=r"no val/ folder .*; lay out images as \S*/val/<class>/\*.jpg$"):  # evaluation
        build_datasets("imagefolder", tmp_path, train=False)
    (tmp_path / "val" / "a").mkdir(parents=True)
    # the split's folder given for the tree's: its parent named (before: "lay out images as .../val/val/<class>/")
    for split, train, first in (("val", False, "val"), ("train", True, "train")):
        with pytest.raises(DataError) as refused:
            build_datasets("imagefolder", tmp_path / split, train=train)
        assert str(refused.value) == (f"'{tmp_path / split}' has no {first}/ folder: it is the {split}/ folder of "
                                      f"'{tmp_path}', which holds {first}/; pass --data-dir '{tmp_path}'")
    (tmp_path / "train" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty data directory.*train.*put images in"):
        build_datasets("imagefolder", tmp_path)
    write_image(tmp_path / "train" / "a" / "x.png", 0, "PNG")
    with pytest.raises(DataError, match=r"empty data directory.*val"):
        build_datasets("imagefolder", tmp_path)


def test_imagefolder_takes_timms_names_of_the_splits(tmp_path, capsys):
    """training/ and validation/ (or valid/, eval/, evaluation/), as timm's folder data sets take them: read as
    train/ and val/ by training and evaluation, named as they are in messages, and a run's folder inside one is
    refused as inside val/ is (before: "has no val/ folder")."""
    from coatnet.cli import main

    root = make_tree(tmp_path / "data")
    (root / "train").rename(root / "training")
    (root / "val").rename(root / "validation")
    b = build_datasets("imagefolder", root, img_size=16)
    assert b.classes == ("bird", "cat", "dog") and (len(b.train), len(b.val)) == (9, 9)
    with pytest.raises(DataError, match=r"has no val/ folder: it is the validation/ folder of .*, which holds "
                                        r"validation/; pass --data-dir"):
        build_datasets("imagefolder", root / "validation", img_size=16, train=False)
    (root / "validation" / "fish").mkdir()
    write_image(root / "validation" / "fish" / "0.png", 99, "PNG")
    with pytest.raises(DataError, match=r"training/ and validation/ in .* have different class folders \(only in "
                                        r"train: \[\], only in val: \['fish'\]\)"):
        build_datasets("imagefolder", root, img_size=16)
    shutil.rmtree(root / "validation" / "fish")
    argv = ["train", "--data-dir", str(root), "--img-size", "16", "--batch-size", "3", "--epochs", "1"]  # no --data
    assert main([*argv, "--output-dir", str(root / "validation" / "run")]) == 2
    assert "is inside the data's validation/ folder" in capsys.readouterr().err
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    assert "on imagefolder: 9 train / 9 val images" in capsys.readouterr().out


def test_the_kind_of_data_set_a_folder_holds(tmp_path, capsys):
    """`coatnet train --data-dir DIR` without --data reads DIR as the kind of data set it holds, as timm does."""
    from coatnet.data import data_kind

    make_tree(tmp_path / "tree", per_class=1)
    (tmp_path / "timm" / "training").mkdir(parents=True)
    (tmp_path / "timm" / "valid").mkdir()
    for folder, file in (("c10/cifar-10-batches-py", "batches.meta"), ("c100", "meta"), ("c10tgz", "cifar-10-python.tar.gz"),
                         ("shards", "train-000000.tar"), ("hf", "dataset_dict.json"),
                         ("pq/data", "train-00000-of-00001.parquet"), ("other", "notes.txt")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / file).write_bytes(b"")
    kinds = {name: data_kind(tmp_path / name) for name in ("tree", "timm", "c10", "c100", "c10tgz", "shards", "hf", "pq",
                                                          "other", "nowhere")}
    assert kinds == dict(tree="imagefolder", timm="imagefolder", c10="cifar10", c100="cifar100", c10tgz="cifar10",
                         shards="webdataset", hf="hf", pq="hf", other=None, nowhere=None)
    assert data_kind(f"{tmp_path}/train-{{000000..000009}}.tar") == data_kind("/data/train-000000.tar") == "webdataset"
    from coatnet.cli import main

    for folder, said in (("other", "holds no data set of a kind this can tell (train/ and val/ of images, CIFAR's files, "
                                   "train-*.tar shards, a Hugging Face dataset); check the folder, or name its kind with "
                                   "--data imagefolder|cifar10|cifar100|webdataset|hf"),
                         ("nowhere", "does not exist; check the path")):
        assert main(["train", "--data-dir", str(tmp_path / folder), "--output-dir", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err == f"coatnet train: error: --data-dir {tmp_path / folder} {said}\n"
    assert not (tmp_path / "run").exists()


def test_errors_are_one_line_and_helpful(tmp_path):
    with pytest.raises(DataError) as e:
        build_datasets("imagenet21k")
    assert "\n" not in str(e.value)
    for known in DATASETS:
        assert known in str(e.value)
    with pytest.raises(DataError, match="img_size"):
        build_datasets("digits", img_size=4)
    with pytest.raises(DataError, match="randaugment"):
        build_datasets("digits", randaugment=(2, 31))


# ----------------------------------------------------------------------------- load_image / eval


def test_load_image_errors(tmp_path):
    txt = tmp_path / "a.jpg"
    txt.write_text("hello")
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg.*not an image file") as e:
        load_image(txt)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "missing.png")
    write_image(tmp_path / "g.png", 0, "PNG", mode="L")
    im = load_image(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (20, 24)


def test_load_image_16bit_png_keeps_intensities(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)  # full 16-bit range
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode in ("I;16", "I")  # really a 16-bit grayscale PNG
    rgb = np.asarray(load_image(tmp_path / "deep.png"))
    expected = np.rint(ramp / 257).astype(np.uint8)  # 0..65535 -> 0..255
    assert rgb.shape == (8, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_a_photo_stored_turned_is_read_as_it_is_shown(tmp_path, format):
    """A phone's photo: pixels stored landscape, EXIF orientation 6 (shown turned 90 degrees clockwise).
    Trained on and predicted as shown, as every viewer shows it, not as stored."""
    stored = np.zeros((32, 48, 3), dtype=np.uint8)
    stored[:, :24] = 255  # the stored left half white: shown, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "photo", format=format, exif=exif)
    shown = np.asarray(load_image(tmp_path / "photo"))
    assert shown.shape == (48, 32, 3)
    assert shown[:20].min() > 200 and shown[28:].max() < 50


@pytest.mark.parametrize("kind", ["P", "RGBA", "LA", "CMYK", "16-bit", "turned", "keyed"])
def test_data_transforms_prepare_an_opened_image_as_predict_reads_its_file(tmp_path, kind):
    """`coatnet.data_transforms(model)(Image.open(f))`, as the README shows it, gives what `predict` gives
    for the file: a palette's colours (before: its indices, as grey), transparency on white and CMYK converted
    (before: a traceback), 16 bits scaled, a phone's photo upright (before: as stored)."""
    import coatnet

    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / ("photo.jpg" if kind in ("CMYK", "turned") else "photo.png")
    if kind == "16-bit":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(path)
    elif kind == "turned":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb).save(path, exif=exif)
    elif kind == "keyed":  # an RGB PNG with one colour transparent (a tRNS chunk)
        Image.fromarray(rgb).save(path, transparency=tuple(int(c) for c in rgb[0, 0]))
    else:
        Image.fromarray(rgb).convert(kind).save(path)
    model = coatnet.create_model("coatnet_pico", num_classes=3)
    torch.testing.assert_close(coatnet.data_transforms(model)(Image.open(path)),
                               _eval_transform(32, model.pretrained_cfg)(load_image(path)), atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_read_on_white(tmp_path, mode):
    """As a page shows them, not as the colour they hide (black here): dropping the alpha would give a
    black logo on black, its background's colour."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # a transparent black background...
    rgba[2:6, 2:6] = (200, 0, 0, 255)  # ...behind an opaque red square
    rgba[0, 0] = (0, 0, 0, 128)  # and one half-transparent black pixel
    image = Image.fromarray(rgba)
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":  # a palette with one transparent entry, as GIFs and small PNGs hold it
        image = image.convert("RGB").quantize(4)
        image.info["transparency"] = image.getpixel((7, 7))
    image.save(tmp_path / "logo.png")
    shown = np.asarray(load_image(tmp_path / "logo.png")).astype(int)
    assert (shown[7, 7] == 255).all()  # transparent: white
    assert (abs(shown[3, 3] - ((60,) * 3 if mode == "LA" else (200, 0, 0))) <= 1).all()  # opaque: its colour
    if mode != "P":
        assert (abs(shown[0, 0] - 127) <= 1).all()  # half: between


@pytest.mark.parametrize("pixels,kind", [(np.linspace(0, 1, 64, dtype=np.float32), "float"),
                                          (np.linspace(0, 2**31 - 1, 64).astype(np.int32), "32-bit integer")])
def test_load_image_without_a_range_is_refused(tmp_path, pixels, kind):
    """A float TIFF (decoded black before) or one of 32-bit integers past 16 bits (clipped to white)
    has no range to scale from: a one-line DataError, not pixels silently wrong."""
    Image.fromarray(pixels.reshape(8, 8)).save(tmp_path / "deep.tif")
    with pytest.raises(DataError) as e:
        load_image(tmp_path / "deep.tif")
    assert str(e.value) == (f"cannot read image '{tmp_path / 'deep.tif'}': its {kind} pixels have no range to scale "
                            f"from; save it as an 8- or 16-bit image")


@pytest.mark.parametrize("source", ["32-bit TIFF", "convert('I')"])
def test_32_bit_integers_within_8_bits_are_refused(tmp_path, source):
    """A 32-bit image of 0..255 values may hold 8-bit pixels (100: mid grey) as well as a nearly black
    16-bit image: no range to tell, refused (before: divided by 257, black). A 16-bit PGM, which
    Pillow also opens as "I", is 16-bit still, however dark."""
    pixels = np.full((8, 8), 100, dtype=np.int32)
    path = tmp_path / "grey.tif"
    if source == "32-bit TIFF":
        Image.fromarray(pixels).save(path)
    with Image.open(path) if source == "32-bit TIFF" else Image.fromarray(pixels.astype(np.uint8)).convert("I") as im:
        assert im.mode == "I"
        with pytest.raises(PixelRangeError, match=r"^its 32-bit integer pixels are all within 0..255, which may be "
                                                  r"8-bit values or a nearly black 16-bit image; save it as an 8- or "
                                                  r"16-bit image$"):
            as_shown(im)
    pgm = tmp_path / "dark.pgm"
    pgm.write_bytes(b"P5 8 8 65535\n" + np.full((8, 8), 200, dtype=">u2").tobytes())
    with Image.open(pgm) as im:
        assert im.mode == "I"
    assert np.asarray(load_image(pgm)).max() == 1  # 200 / 257, rounded


@pytest.mark.parametrize("size", [32, 64])
def test_eval_transform_non_square(size):
    img = Image.fromarray(np.full((30, 50), 128, dtype=np.uint8))  # 50 wide x 30 high, grayscale
    out = eval_transform(size)(img)
    assert out.shape == (3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalized(np.full((3, size, size), 128, np.uint8)))


def test_eval_transform_crops_centre_at_large_sizes():
    # 64 -> resize to 73, centre-crop 64: a 2-pixel band at the left edge must vanish.
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :2] = 255
    out = eval_transform(64)(Image.fromarray(arr))
    assert torch.equal(out, eval_transform(64)(Image.fromarray(np.zeros_like(arr))))
    out32 = eval_transform(32)(Image.fromarray(arr))  # small size: whole image kept
    assert out32[:, :, 0].mean() > 1


@pytest.mark.parametrize("size", [224, (224, 160)])
def test_a_long_strip_is_cut_to_what_the_crop_keeps_before_it_is_resized(size):
    """A 1 x 2,000 px strip is not resized to 256 x 512,000 px first, nor 1 x 50,000,000 to 256 x
    12,800,000,000 (before: out of memory); an image 100 times longer than wide is prepared as before
    (and as timm's transform does), pixel for pixel."""
    from torchvision.transforms import v2

    from coatnet.models import preprocessing

    transform = _eval_transform(size, PretrainedCfg(crop_pct=0.875))
    for strip in (torch.full((3, 1, 2000), 7, dtype=torch.uint8), torch.full((3, 2000, 1), 7, dtype=torch.uint8)):
        x = strip
        for step in transform.transforms:
            x = step(x)
            assert x.shape[-2:].numel() <= 256 * 256 * 6, (step, x.shape)  # 6 pixels' worth, at most
        assert x.shape[1:] == ((size, size) if isinstance(size, int) else size) and x.flatten(1).std(1).max() == 0
    uncut = v2.Compose([t for t in transform.transforms if type(t) is not preprocessing.CutOverhang])
    long = torch.randint(0, 256, (3, 40, 4000), dtype=torch.uint8)
    assert torch.equal(transform(long), uncut(long)) and torch.equal(transform(long.mT), uncut(long.mT))


@pytest.mark.parametrize("size, shape", [(16, (1, 1025)), (16, (1025, 1)), (16, (1, 1101)), (16, (2, 2600)),
                                         ((64, 16), (1, 300)), ((16, 64), (300, 1)), ((16, 64), (2, 600))])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_cut_strip_is_prepared_as_the_whole_strip(size, shape, interpolation):
    """The cut keeps the strip's middle where it was and the pixels the filter reaches (before: 1,025 px
    cut to 2, the middle half a pixel off, which upsampled is half the crop), and an image 300 times
    longer than wide is not cut for a non-square model (before: cut to 1 px for a 64 x 16 model)."""
    from torchvision.transforms import v2

    from coatnet.models import preprocessing

    transform = _eval_transform(size, PretrainedCfg(crop_pct=1.0, interpolation=interpolation))
    uncut = v2.Compose([t for t in transform.transforms if type(t) is not preprocessing.CutOverhang])
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8))
    assert (transform(strip) - uncut(strip)).abs().max() < 0.05  # 2 of 255 levels at most


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_a_non_square_centre_crop_keeps_the_aspect_ratio(crop_pct):
    """A centred square in a square image stays square at a 32x64 input: the image is resized to
    cover the crop, aspect kept, as timm's ResizeKeepRatio does, never squashed into it. Pickled, as
    loader workers need it."""
    arr = np.zeros((100, 100), np.uint8)
    arr[35:65, 35:65] = 255
    transform = pickle.loads(pickle.dumps(_eval_transform((32, 64), PretrainedCfg(crop_pct=crop_pct))))
    out = transform(Image.fromarray(arr))
    assert out.shape == (3, 32, 64)
    rows, cols = (out[0] > 0).nonzero().unbind(1)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height - width) <= 1, (height, width)  # as high as wide, not twice as wide


# ----------------------------------------------------------------------------- mixup / cutmix


def test_mixup_cutmix():
    assert mixup_cutmix(10) is None
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 5
    torch.manual_seed(0)
    for kw in ({"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}):
        t = mixup_cutmix(5, **kw)
        out_images, soft = t(images, labels)
        assert out_images.shape == images.shape
        assert soft.shape == (8, 5) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert not torch.equal(soft, torch.nn.functional.one_hot(labels, 5).float())


# ----------------------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 'str' opcodes, like the official CIFAR files (cPickle, protocol 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def official_pickle(obj, path: Path) -> None:
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # The official files were written by numpy 1.x, which names its array rebuilder here.
    data = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy._core" not in data and b"_codecs" not in data
    if b"data" in obj:
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in data
    path.write_bytes(data)


def fake_batch(n: int, seed: int, label_key: bytes, num_classes: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, size=n)],
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def make_cifar(root: Path, name: str) -> dict:
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": 4 for i in range(1, 6)} | {"test_batch": 3}
        meta = ("batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
        key, k = b"labels", 10
    else:
        folder = root / "cifar-100-python"
        files = {"train": 6, "test": 3}
        meta = ("meta", {b"fine_label_names": [b"f%d" % i for i in range(100)],
                         b"coarse_label_names": [b"k%d" % i for i in range(20)]})
        key, k = b"fine_labels", 100
    folder.mkdir(parents=True)
    batches = {}
    for seed, (fname, n) in enumerate(files.items()):
        batches[fname] = fake_batch(n, seed, key, k)
        if name == "cifar100":
            batches[fname][b"coarse_labels"] = [0] * n
        official_pickle(batches[fname], folder / fname)
    official_pickle(meta[1], folder / meta[0])
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout", ["parent", "folder"])
def test_cifar(tmp_path, name, layout):
    batches = make_cifar(tmp_path, name)
    folder = next(tmp_path.iterdir())
    b = build_datasets(name, tmp_path if layout == "parent" else folder, img_size=32)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    test = batches["test_batch" if name == "cifar10" else "test"]
    assert len(b.train) == (20 if name == "cifar10" else 6) and len(b.val) == 3
    assert b.num_classes == (10 if name == "cifar10" else 100)
    assert b.classes[:2] == (("c0", "c1") if name == "cifar10" else ("f0", "f1"))
    for i in range(3):
        img, label = b.val[i]
        assert label == test[key][i]
        # row layout is R(1024) G(1024) B(1024), each row-major 32x32
        torch.testing.assert_close(img, normalized(test[b"data"][i].reshape(3, 32, 32)))
    img, _ = b.train[len(b.train) - 1]
    assert img.shape == (3, 32, 32)
    assert build_datasets(name, folder, img_size=48).train[0][0].shape == (3, 48, 48)


@pytest.mark.parametrize("name", ["imagefolder", "cifar10"])
def test_without_augmentation_training_images_are_prepared_as_for_evaluation(tmp_path, name):
    """`--no-aug` (and the layout study, Section 2.2: "without ... augmentation"): no random crop or flip,
    each training image the same at every read, as evaluation prepares it."""
    root = make_tree(tmp_path) if name == "imagefolder" else (make_cifar(tmp_path, name), tmp_path)[1]
    plain = build_datasets(name, root, img_size=24, augment=False)
    augmented = build_datasets(name, root, img_size=24)
    torch.manual_seed(0)
    for i in range(len(plain.train)):
        image, label = plain.train[i]
        source = plain.train.loader(plain.train.samples[i][0]) if name == "imagefolder" else \
            tv_tensors.Image(plain.train.images[i])
        assert torch.equal(image, plain.train[i][0]) and torch.equal(image, plain.val.transform(source))
    reads = [augmented.train[0][0] for _ in range(8)]
    assert any(not torch.equal(reads[0], r) for r in reads[1:])  # the default: random crops and flips
    with pytest.raises(DataError, match="randaugment augments the training images, which augment=False prepares"):
        build_datasets(name, root, img_size=24, augment=False, randaugment=(2, 9))


@pytest.mark.parametrize("weights", [None, PretrainedCfg(crop_pct=0.95, mean=(0.5, 0.5, 0.5))])
def test_cifar_is_evaluated_whole_as_it_is_trained(tmp_path, weights):
    """Training never zooms into a 32x32 photo (pad 4, crop 32, resize), so at 64 px and above the
    evaluation (and predict and export, which follow the run's preprocessing) takes it whole too,
    not 0.875 of it; from timm's weights too (their mean, not their crop)."""
    from coatnet.data import default_preprocessing

    batches = make_cifar(tmp_path, "cifar10")
    cfg = default_preprocessing("cifar10", 64, weights)
    assert cfg.crop_pct == 1.0 and cfg.mean == (weights or PretrainedCfg()).mean
    img, _ = build_datasets("cifar10", tmp_path, img_size=64, preprocessing=cfg).val[0]
    whole = torch.from_numpy(batches["test_batch"][b"data"][0].reshape(3, 32, 32))
    whole = v2.functional.resize(whole, [64, 64], antialias=True).float() / 255
    torch.testing.assert_close(img, v2.functional.normalize(whole, cfg.mean, cfg.std), atol=1e-4, rtol=0)


def test_cifar_labels_as_numpy_scalars(tmp_path):
    """Conversion scripts write labels as list(np.array): numpy scalars, which build nothing but a number."""
    batches = make_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    batch = batches["test_batch"] | {b"labels": list(np.array(batches["test_batch"][b"labels"]))}
    official_pickle(batch, folder / "test_batch")
    assert b"\nscalar\n" in (folder / "test_batch").read_bytes()
    assert build_datasets("cifar10", tmp_path).val.targets == batches["test_batch"][b"labels"]


def test_cifar_labels_in_a_column_are_one_label_per_image(tmp_path):
    """Labels of shape (N, 1), Keras' cifar10.load_data() layout pickled again, are N labels (before:
    an AttributeError traceback in training); other shapes are refused in one line."""
    batches = make_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    labels = batches["test_batch"][b"labels"]
    official_pickle(batches["test_batch"] | {b"labels": np.array(labels)[:, None]}, folder / "test_batch")
    val = build_datasets("cifar10", tmp_path).val
    assert val.targets == labels and all(type(t) is int for t in val.targets)
    official_pickle(batches["test_batch"] | {b"labels": np.array(labels)[:, None].repeat(2, axis=1)},
                    folder / "test_batch")
    with pytest.raises(DataError, match=r"test_batch' has b'labels' of shape \(3, 2\), not one label per image \(N or "
                                        r"N x 1\); re-download"):
        build_datasets("cifar10", tmp_path)


@pytest.mark.parametrize("protocol", [0, 1, 2])
def test_cifar_pickled_again_by_python3_at_an_old_protocol(tmp_path, protocol):
    """Python 3 pickles bytes at protocols 0-2 as _codecs.encode(text, 'latin1') (an array's data too), and
    empty bytes as bytes(): both are read (before: refused as unsafe); another codec is not."""
    batches = make_cifar(tmp_path, "cifar10")
    folder = tmp_path / "cifar-10-batches-py"
    for name in ("test_batch", "batches.meta"):
        obj = batches[name] | {b"filenames": [b""] * 3} if name == "test_batch" else pickle.loads(
            (folder / name).read_bytes(), encoding="bytes")
        (folder / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    assert b"_codecs" in (folder / "test_batch").read_bytes() and b"bytes" in (folder / "test_batch").read_bytes()
    b = build_datasets("cifar10", tmp_path)
    assert b.classes[:2] == ("c0", "c1") and b.val.targets == batches["test_batch"][b"labels"]
    assert torch.equal(b.val.images.reshape(3, -1), torch.from_numpy(batches["test_batch"][b"data"]))
    data = pickle.dumps({b"data": b"x"}, protocol=protocol).replace(b"latin1", b"zlib  ")
    (folder / "test_batch").write_bytes(data)
    with pytest.raises(DataError, match="refusing a CIFAR pickle that builds bytes with the codec 'zlib  '"):
        build_datasets("cifar10", tmp_path)
    # One text encoded again and again: each call a copy, 20x the file's size here (before: no bound)
    text = "x" * 1000
    again = b"h\x00h\x01h\x02\x86R"  # the function, the text, "latin1": call
    (folder / "test_batch").write_bytes(
        b"\x80\x02c_codecs\nencode\nq\x00X" + len(text).to_bytes(4, "little") + text.encode() + b"q\x01"
        + b"X\x06\x00\x00\x00latin1q\x02(" + again * 20 + b"l.")
    with pytest.raises(DataError, match="refusing a CIFAR pickle that builds bytes of more than its own size"):
        build_datasets("cifar10", tmp_path)


def test_cifar_class_names_of_another_type_are_named_so(tmp_path):
    make_cifar(tmp_path, "cifar10")
    official_pickle({b"label_names": np.array([b"c%d" % i for i in range(10)])},
                    tmp_path / "cifar-10-batches-py" / "batches.meta")
    with pytest.raises(DataError, match=r"^b'label_names' in CIFAR meta file '.*batches.meta' is of type ndarray, not a "
                                        r"list of names; re-download the data set$"):
        build_datasets("cifar10", tmp_path)


def test_cifar_missing_files(tmp_path):
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar10 files not found.*\(missing: data_batch_3\); download"):
        build_datasets("cifar10", tmp_path)  # before: all seven named as needed, the one missing not said
    with pytest.raises(DataError, match="cifar100 files not found"):
        build_datasets("cifar100", tmp_path)


def test_cifar_archive_not_extracted_or_the_other_cifar_is_said(tmp_path):
    """A folder holding the downloaded archive, or the other CIFAR's files, says so (before: "download the
    archive and extract it there", of an archive that is there; "need train, test, meta" of CIFAR-10's folder)."""
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not extracted")
    with pytest.raises(DataError, match=r"cifar10 files not found in .*, which holds cifar-10-python.tar.gz not "
                                        r"extracted: extract it there \(tar xzf "):
        build_datasets("cifar10", tmp_path)
    make_cifar(tmp_path, "cifar10")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        with pytest.raises(DataError, match=f"cifar100 files not found in '{data_dir}', which holds cifar10's; "
                                            f"pass --data cifar10"):
            build_datasets("cifar100", data_dir)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_cifar_refuses_malicious_pickle(tmp_path):
    make_cifar(tmp_path, "cifar10")
    marker = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}))
    # sanity: the payload really would run under plain pickle.loads (not executed here)
    assert b"system" in batch.read_bytes()
    with pytest.raises(DataError, match=r"refusing to load '(posix|nt)\.system'"):
        build_datasets("cifar10", tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("labels,kind", [([0.5, 1.0, 2.0], "float64"), (["a", "b", "c"], "<U1")])
def test_cifar_labels_that_are_not_integers(tmp_path, labels, kind):
    """0.5 would have been truncated to class 0 without a word, "a" a ValueError traceback."""
    batches = make_cifar(tmp_path, "cifar10")
    official_pickle(batches["test_batch"] | {b"labels": labels}, tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError, match=f"test_batch' has {kind} labels, not integers; re-download"):
        build_datasets("cifar10", tmp_path)


def test_cifar_classes_named_twice(tmp_path):
    make_cifar(tmp_path, "cifar10")
    official_pickle({b"label_names": [b"cat", b"dog", b"cat", *[b"c%d" % i for i in range(3, 10)]]},
                    tmp_path / "cifar-10-batches-py" / "batches.meta")
    with pytest.raises(DataError, match=r"batches.meta' names classes twice \(cat\); re-download"):
        build_datasets("cifar10", tmp_path)


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"cannot read CIFAR file .*test.*corrupt"):
        build_datasets("cifar100", tmp_path)


@pytest.mark.parametrize("change", ["renamed", "added", "removed", "added, names not recorded"])
def test_resume_on_other_classes_is_refused(tmp_path, capsys, change):
    """A class renamed (labels would silently mean other classes), added or removed (the head and
    AdamW's moments no longer fit: before, a crash or a segfault) since the run began: one line,
    exit 2, the run's checkpoint as it was."""
    from coatnet.cli import main

    root, out = make_tree(tmp_path / "data", per_class=4), tmp_path / "run"
    argv = ["train", "--data", "imagefolder", "--data-dir", str(root), "--model", "coatnet_pico", "--img-size", "16",
            "--batch-size", "4", "--epochs", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    last = os.readlink(out / "last")
    capsys.readouterr()
    if change == "added, names not recorded":  # config.json edited: the head's size is what is left to compare
        config = out / "last" / "config.json"
        meta = json.loads(config.read_text())
        meta["pretrained_cfg"]["label_names"] = None
        config.write_text(json.dumps(meta))
    for split in ("train", "val"):
        if change == "renamed":
            (root / split / "cat").rename(root / split / "zebra")
        elif change.startswith("added"):
            shutil.copytree(root / split / "cat", root / split / "ant")
        else:
            shutil.rmtree(root / split / "bird")
    assert main(["train", "--resume", "--epochs", "2", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {"renamed": "(gone: cat; new: zebra)", "added": "(new: ant)", "removed": "(gone: bird)",
                "added, names not recorded": "classes are not the 3 this run trained on (their names not recorded)"
                }[change]
    assert len(err.strip().splitlines()) == 1 and expected in err and "--pretrained" in err, err
    assert os.readlink(out / "last") == last and len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_loader_workers_error_is_its_own_one_line(tmp_path, capsys):
    """An error met in a DataLoader worker process (--workers 1) reads as the same one line as in the
    main process, not as the worker's traceback."""
    from coatnet.cli import main

    root = make_tree(tmp_path / "data", per_class=4)
    for image in (root / "train").rglob("*.*"):
        image.write_bytes(image.read_bytes()[:-200])  # every training image cut short: its header reads
    errors = []
    for workers in ("0", "1"):
        assert main(["train", "--data", "imagefolder", "--data-dir", str(root), "--model", "coatnet_pico",
                     "--img-size", "16", "--batch-size", "4", "--epochs", "1", "--workers", workers,
                     "--output-dir", str(tmp_path / f"run{workers}")]) == 2
        errors.append([line for line in capsys.readouterr().err.splitlines() if "error" in line])
    assert len(errors[1]) == 1 and errors[1] == [errors[0][0].replace("run0", "run1")], errors


def test_training_on_a_single_class_is_refused(tmp_path, capsys):
    """One class is a 100% top-1 from the first step, with nothing learnt (before: trained and reported)."""
    from coatnet.cli import main

    root = make_tree(tmp_path / "data", classes=("cat",), per_class=4)
    assert main(["train", "--data", "imagefolder", "--data-dir", str(root), "--model", "coatnet_pico", "--img-size",
                 "16", "--batch-size", "4", "--epochs", "1", "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ("coatnet train: error: the data has 1 class (cat): training a classifier needs "
                                       "at least 2; add the other classes' folders (or samples)\n")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_imagefolder_says_what_it_does_not_read(tmp_path, monkeypatch):
    """Files not named as images (a .gif, a README) and a class folder with no images are said in a
    warning, not dropped without a word; a folder that cannot be listed is an error, not an empty class."""
    root = make_tree(tmp_path, per_class=2)
    for split in ("train", "val"):
        write_image(root / split / "dog" / "x.gif", 1, "GIF", "RGB")
        (root / split / "cat" / "README").write_text("notes")
        (root / split / "cat" / ".DS_Store").write_text("")  # hidden: not worth a word
        (root / split / "empty").mkdir()
    with pytest.warns(UserWarning) as caught:
        b = build_datasets("imagefolder", root, img_size=16)
    messages = [str(w.message) for w in caught]
    assert b.classes == ("bird", "cat", "dog", "empty") and len(b.train) == len(b.val) == 6
    for split in ("train", "val"):
        assert f"1 class with no images in '{root / split}': empty" in messages
        assert any(m.startswith(f"2 files in '{root / split}' not read, not named as images (.gif x1, README x1)")
                   for m in messages), messages
    walk = os.walk

    def unlistable(top, onerror=None, **kwargs):
        if top.endswith("dog"):
            onerror(PermissionError(13, "Permission denied", top))
        return walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", unlistable)
    with pytest.raises(PermissionError, match="Permission denied"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_datasets("imagefolder", root, img_size=16)


def test_a_warning_of_the_cli_is_one_line(tmp_path, capsys, monkeypatch):
    """As the errors are: the command's name and what is wrong, not the library line that noticed it."""
    from coatnet.cli import main

    root = make_tree(tmp_path / "data", per_class=4)
    write_image(root / "train" / "dog" / "x.gif", 1, "GIF", "RGB")
    shown = lambda *args, **kwargs: sys.stderr.write(warnings.formatwarning(*args[:4]))  # noqa: E731
    monkeypatch.setattr(warnings, "showwarning", shown)  # the default's way, past pytest's recording
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["train", "--data", "imagefolder", "--data-dir", str(root), "--model", "coatnet_pico", "--img-size",
                     "16", "--batch-size", "4", "--epochs", "1", "--output-dir", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert f"coatnet train: warning: 1 file in '{root / 'train'}' not read, not named as images " \
           f"(.gif x1); images must end in one of .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp" in lines
    assert not any("folder.py" in line or "make_dataset" in line for line in lines)


def test_under_torchrun_only_the_first_process_warns_of_what_the_folder_holds(tmp_path, monkeypatch):
    """Every process lists the same image folder: its warnings come once for the job, from the first."""
    from coatnet.train import Dist, TrainConfig, start_run

    root = make_tree(tmp_path / "data", per_class=4)
    write_image(root / "train" / "dog" / "x.gif", 1, "GIF", "RGB")
    cfg = TrainConfig(data="imagefolder", data_dir=str(root), img_size=16, batch_size=4)

    class Listed(Exception):
        pass

    def listed(*args, **kwargs):  # the data is built: stop before the model
        raise Listed

    monkeypatch.setattr("coatnet.train.make_loader", listed)
    for rank in (1, 0):
        with warnings.catch_warnings(record=True) as caught, pytest.raises(Listed):
            warnings.simplefilter("always")
            start_run(cfg, Dist(rank, 2, torch.device("cpu")), tmp_path / "run")
        messages = [str(w.message) for w in caught]
        assert len(messages) == (rank == 0) and all("not read, not named as images" in m for m in messages), messages


def test_a_run_whose_data_moved_resumes_from_its_new_place(tmp_path, capsys):
    """The run's folder gone (renamed, mounted elsewhere): --data-dir at its new place resumes, its
    classes checked (before: refused both without --data-dir, "does not exist", and with it, "differs").
    Another folder while the run's is still there is still refused."""
    from coatnet.cli import main

    make_tree(tmp_path / "imgs", per_class=4)
    common = ["train", "--data", "imagefolder", "--model", "coatnet_pico", "--img-size", "16", "--batch-size", "4",
              "--output-dir", str(tmp_path / "run")]
    assert main([*common, "--data-dir", str(tmp_path / "imgs"), "--epochs", "1"]) == 0
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy")
    assert main([*common, "--resume", "--data-dir", str(tmp_path / "copy"), "--epochs", "2"]) == 2
    assert "differs from the resumed run's" in capsys.readouterr().err
    (tmp_path / "imgs").rename(tmp_path / "moved")
    assert main([*common, "--resume", "--epochs", "2"]) == 2
    assert f"the run's data directory {tmp_path / 'imgs'} does not exist; if it moved, give its new place with " \
           f"--data-dir" in capsys.readouterr().err
    assert main([*common, "--resume", "--data-dir", str(tmp_path / "moved"), "--epochs", "2"]) == 0
    recorded = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert recorded["data_dir"] == str(tmp_path / "moved") and recorded["epoch"] == 2


def test_a_data_dir_given_again_on_resume_is_recorded_absolute(tmp_path, monkeypatch):
    """`--data-dir imgs` on --resume (the same folder, relative): recorded as the absolute path, so the
    run resumes and evaluates from any folder (before: as typed, found only from that folder)."""
    from coatnet.cli import main

    make_tree(tmp_path / "imgs", per_class=4)
    monkeypatch.chdir(tmp_path)
    common = ["train", "--data", "imagefolder", "--data-dir", "imgs", "--model", "coatnet_pico", "--img-size", "16",
              "--batch-size", "4", "--output-dir", "run"]
    assert main([*common, "--epochs", "1"]) == 0
    assert main([*common, "--resume", "--epochs", "2"]) == 0
    recorded = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert recorded["data_dir"] == recorded["train_config"]["data_dir"] == str(tmp_path / "imgs")


def test_digits_validation_images_are_not_augmented():
    """randaugment and hflip are the training split's: the validation split is the same at every read, and
    the same as without them."""
    augmented = build_datasets("digits", img_size=16, randaugment=(2, 15), hflip=True)
    plain = build_datasets("digits", img_size=16)
    for seed in range(4):
        torch.manual_seed(seed)
        for i in range(6):
            assert torch.equal(augmented.val[i][0], plain.val[i][0])


def test_cifar_training_images_are_at_the_size_asked_below_32(tmp_path):
    make_cifar(tmp_path, "cifar10")
    b = build_datasets("cifar10", tmp_path, img_size=16)
    assert b.train[0][0].shape == (3, 16, 16) and b.val[0][0].shape == (3, 16, 16)


def test_mixup_and_cutmix_together_apply_each_of_them():
    """With both alphas, each batch gets one of the two: MixUp blends whole images (no pixel of a black and
    a white image stays 0 or 1), CutMix pastes a box (every pixel 0 or 1)."""
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    t = mixup_cutmix(2, mixup_alpha=1.0, cutmix_alpha=1.0)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(30):
        out, _ = t(images, torch.tensor([0, 1]))
        kinds.add("cutmix" if bool(((out == 0) | (out == 1)).all()) else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_imagenet_mean_and_std_are_the_usual_ones():
    timm_data = pytest.importorskip("timm.data")
    assert IMAGENET_MEAN == timm_data.IMAGENET_DEFAULT_MEAN and IMAGENET_STD == timm_data.IMAGENET_DEFAULT_STD
    assert (PretrainedCfg().mean, PretrainedCfg().std) == (IMAGENET_MEAN, IMAGENET_STD)
