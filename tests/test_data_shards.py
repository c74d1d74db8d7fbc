"""WebDataset shards and Hugging Face datasets as map-style data sets (coatnet.data_shards).

Small shards / datasets are written from generated images: 3 classes, each image a solid colour
that is unique to it, so an item read back can be matched to the sample written.
"""

import gzip
import io
import json
import os
import pickle
import random
import signal
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import: nothing goes online

wds = pytest.importorskip("webdataset")
datasets = pytest.importorskip("datasets")

from coatnet import data_shards  # noqa: E402
from coatnet.data import DataError  # noqa: E402
from coatnet.data_shards import build_hf, build_webdataset  # noqa: E402

SIZE = 16
NAMES = ["red", "green", "blue"]


def to_tensor(image: Image.Image) -> torch.Tensor:
    """The test transform: the decoded RGB pixels as uint8 (3, H, W) (module level: picklable)."""
    assert image.mode == "RGB"
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def colour(split: str, n: int) -> tuple[int, int, int]:
    return (30 + 60 * (n % 3), 10 * n + 5, 100 if split == "train" else 200)


def encode(rgb, ext: str) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (SIZE, SIZE), rgb)
    img.save(buf, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], **({"lossless": True} if ext == "webp" else {}))
    return buf.getvalue()


def source(split: str, count: int) -> list[dict]:
    """Sample n: label n % 3, a unique colour, mostly PNG with a JPEG and a WebP among them."""
    exts = ["png", "png", "jpg", "png", "webp"]
    return [dict(key=f"{split}{n:04d}", label=n % 3, rgb=colour(split, n), ext=exts[n % len(exts)])
            for n in range(count)]


TRAIN, VAL = source("train", 18), source("val", 6)


def check_item(item, src) -> None:
    x, label = item
    assert x.shape == (3, SIZE, SIZE) and label == src["label"]
    # Solid colours survive JPEG nearly exactly; PNG and lossless WebP exactly.
    assert torch.allclose(x.float().mean((1, 2)), torch.tensor(src["rgb"], dtype=torch.float), atol=3)


def check_by_index(ds, expected: list[dict]) -> None:
    assert len(ds) == len(expected)
    assert ds.targets == [s["label"] for s in expected]
    order = list(range(len(ds)))
    random.Random(0).shuffle(order)
    for i in order:
        check_item(ds[i], expected[i])


def one_line_error(build, *args, names: str) -> str:
    with pytest.raises(DataError) as e:
        build(*args, to_tensor, to_tensor)
    msg = str(e.value)
    assert "\n" not in msg and names in msg, msg
    return msg


# --------------------------------------------------------------------------------------------
# WebDataset shards
# --------------------------------------------------------------------------------------------


def write_shard(path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write({"__key__": s["key"], s["ext"]: encode(s["rgb"], s["ext"]), "cls": str(s["label"]).encode()})


def write_shards(root, train=TRAIN, val=VAL) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "train-000000.tar", train[:10])
    write_shard(root / "train-000001.tar", train[10:])
    write_shard(root / "val-000000.tar", val[:3])
    write_shard(root / "val-000001.tar", val[3:])


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    write_shards(root)
    return root


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    """Each test its own shard index cache (never the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("xdg-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root / "coatnet" / "webdataset-index"


def test_webdataset_folder(shard_dir):
    data = build_webdataset(str(shard_dir), to_tensor, to_tensor)
    assert data.classes == ("0", "1", "2") and data.skipped_files == 0
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)


def test_webdataset_brace_pattern_and_classes_txt(tmp_path):
    write_shards(tmp_path)
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    data = build_webdataset(f"{tmp_path}/train-{{000000..000001}}.tar", to_tensor, to_tensor)
    assert data.classes == tuple(NAMES)
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)


def test_webdataset_classes_span_both_splits(tmp_path):
    val = [dict(s, label=3) if i == 0 else s for i, s in enumerate(VAL)]  # class 3 only in val
    write_shards(tmp_path, val=val)
    data = build_webdataset(str(tmp_path), to_tensor, to_tensor)
    assert data.classes == ("0", "1", "2", "3")
    assert data.val[0][1] == 3


def test_webdataset_bad_image_is_skipped_at_load(tmp_path):
    write_shards(tmp_path)
    with wds.TarWriter(str(tmp_path / "train-000002.tar")) as w:
        w.write({"__key__": "broken", "png": b"not a png", "cls": b"1"})
    train = build_webdataset(str(tmp_path), to_tensor, to_tensor).train
    with pytest.warns(UserWarning, match="broken") as caught:
        x, label = train[18]  # the last sample: replaced by the next decodable one, sample 0
    assert "not an image file or corrupt (no image format PIL knows)" in str(caught[0].message)  # not a repr
    check_item((x, label), TRAIN[0])
    assert train.skipped_at_load == 1
    _tar(tmp_path / "val-000001.tar", [("broken.png", b"not a png"), ("broken.cls", b"1")])
    val = build_webdataset(str(tmp_path), to_tensor, to_tensor).val
    val.undecodable[:-1] = True  # the others found undecodable already
    with pytest.warns(UserWarning, match="broken"), pytest.raises(DataError) as e:
        val[len(val) - 1]  # the shards left without a decodable image are named (before: "the data set")
    assert str(e.value) == f"no decodable image left in the shards '{tmp_path / 'val-000000.tar'}' ... (2); check the " \
                           "data"


def _truncate(path, at_member_boundary: bool) -> None:
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut = members[2].offset if at_member_boundary else members[1].offset_data + 10
    data = path.read_bytes()[:cut]
    path.write_bytes(data)


def _without(ext):
    def make(root):
        with wds.TarWriter(str(root / "train-000000.tar")) as w:
            s = {"__key__": "lonely", "png": encode((1, 2, 3), "png"), "cls": b"0"}
            del s[ext]
            w.write(s)
    return make


def _tar(path, members: list[tuple[str, bytes]], encoding: str = "utf-8") -> None:
    """A shard written member by member as given (names, order), not as webdataset's writer would."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding=encoding) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_names_not_in_utf8_and_a_classes_txt_with_a_byte_order_mark(tmp_path):
    """Member names in Latin-1 (an old tar) are read, as tar reads them; a byte-order mark (Notepad
    writes one) is not part of the first class's name."""
    write_shards(tmp_path)
    _tar(tmp_path / "train-000001.tar", [("caf\xe9.png", encode((1, 2, 3), "png")), ("caf\xe9.cls", b"1")],
         encoding="latin-1")
    (tmp_path / "classes.txt").write_text("\ufeff" + "\n".join(NAMES) + "\n", encoding="utf-8")
    data = build_webdataset(str(tmp_path), to_tensor, to_tensor)
    assert data.classes == tuple(NAMES) and len(data.train) == 11
    assert data.train[10][1] == 1 and data.train._read(10)[1].startswith("'caf\udce9' in shard")  # as os.fsdecode


def test_the_index_is_cached_and_redone_for_a_changed_shard(tmp_path, index_cache, monkeypatch):
    write_shards(tmp_path)
    build_webdataset(str(tmp_path), to_tensor, to_tensor)
    assert len(list(index_cache.glob("*.json"))) == 4  # one per shard
    with monkeypatch.context() as m:  # unchanged shards are not read again: their index comes from the cache
        m.setattr(data_shards, "_index_shard", lambda path: pytest.fail(f"{path} indexed again"))
        data = build_webdataset(str(tmp_path), to_tensor, to_tensor)
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)
    new = TRAIN[10:][::-1] + [dict(TRAIN[0], key="extra")]  # the second train shard written again, changed
    write_shard(tmp_path / "train-000001.tar", new)
    data = build_webdataset(str(tmp_path), to_tensor, to_tensor)
    check_by_index(data.train, TRAIN[:10] + new)
    assert len(list(index_cache.glob("*.json"))) == 5 and not list(index_cache.glob(".*"))


@pytest.mark.parametrize("damage", ["cache is a file", "cache files are garbage", "no home folder",
                                    "cache of a label beyond int64"])
def test_a_cache_that_cannot_be_used_only_costs_time(tmp_path, index_cache, damage, monkeypatch):
    write_shards(tmp_path / "data")
    if damage == "no home folder":  # a container's user without one, and no XDG_CACHE_HOME

        def home():
            raise RuntimeError("Could not determine home directory.")
        monkeypatch.delenv("XDG_CACHE_HOME")
        monkeypatch.setattr(data_shards.Path, "home", home)
    elif damage == "cache is a file":  # nothing can be written under it
        index_cache.parent.parent.rmdir()
        index_cache.parent.parent.write_text("not a folder")
    else:
        build_webdataset(str(tmp_path / "data"), to_tensor, to_tensor)
        for i, f in enumerate(sorted(index_cache.glob("*.json"))):
            garbage = ["{not json", '[[1, 512, 3000, 1]]', '[["k", "x", 1, 2]]', '[["k", 0, 1, 2, 3]]'][i]
            # an older version cached any label, which numpy's int64 labels cannot hold (before: OverflowError)
            f.write_text('[["k", 512, 3000, 100000000000000000000]]' if damage.endswith("int64") else garbage)
    data = build_webdataset(str(tmp_path / "data"), to_tensor, to_tensor)
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)


def _write_then(edit):
    def make(root):
        write_shards(root)
        edit(root)
    return make


WDS_ERRORS = {
    "empty folder": (lambda root: None, "", "train-*.tar"),
    "no val shards": (_write_then(lambda r: [p.unlink() for p in r.glob("val-*")]), "", "val-*.tar"),
    "compressed shards": (_write_then(lambda r: [(p.with_name(p.name + ".gz").write_bytes(gzip.compress(
        p.read_bytes())), p.unlink()) for p in r.glob("train-*.tar")]), "",
        "found compressed ones (train-000000.tar.gz, ...), which cannot be read by index: decompress them"),
    "shards named otherwise": (_write_then(lambda r: [p.rename(p.with_name("imagenet-" + p.name))
                                                      for p in r.glob("*.tar")]), "",  # before: "put the shards there"
                               "found other names (imagenet-train-000000.tar, imagenet-train-000001.tar, ...): rename "
                               "or link the shards as train-*.tar and val-*.tar"),
    "not a tar": (_write_then(lambda r: (r / "train-000002.tar").write_bytes(b"garbage" * 200)), "",
                  "train-000002.tar"),
    "truncated in a member": (_write_then(lambda r: _truncate(r / "val-000001.tar", False)), "", "val-000001.tar"),
    "truncated at a member": (_write_then(lambda r: _truncate(r / "val-000001.tar", True)), "", "val-000001.tar"),
    "no image": (_write_then(_without("png")), "", "'lonely' in shard"),
    "no label": (_write_then(_without("cls")), "", "'lonely' in shard"),
    "label not an int": (_write_then(lambda r: write_shard(r / "val-000001.tar", [dict(VAL[0], label="cat")])), "",
                         "val-000001.tar"),
    "a label far beyond the samples": (_write_then(lambda r: write_shard(r / "val-000001.tar",
                                                                         [dict(VAL[0], label=10**9)])), "",
                                       "the largest label, 1000000000, would make a 1000000001-class head"),
    "a label beyond int64": (_write_then(lambda r: write_shard(r / "val-000001.tar", [dict(VAL[0], label=10**20)])),
                             "", "has label 10000000000000000000..., beyond any class index"),  # before: OverflowError
    "keys with dots": (_write_then(lambda r: _tar(r / "val-000001.tar", [
        ("img.001.png", encode((1, 2, 3), "png")), ("img.001.cls", b"0")])), "",
        "its file 'img.001.png' has a dot in its key, and a key ends at the first dot"),  # before: "has no image"
    "label outside classes.txt": (_write_then(lambda r: (r / "classes.txt").write_text("a\nb\n")), "",
                                  "classes.txt"),
    "a class twice in classes.txt": (_write_then(lambda r: (r / "classes.txt").write_text("a\nb\na\n")), "",
                                     "classes.txt' must list one distinct, non-empty class name per line"),
    "classes.txt not UTF-8": (_write_then(lambda r: (r / "classes.txt").write_bytes(b"caf\xe9\nb\nc\n")), "",
                              "classes.txt' is not UTF-8 text (invalid continuation byte at byte 3); save it as UTF-8"),
    "a sample's files apart": (_write_then(lambda r: _tar(r / "val-000001.tar", [
        ("a.png", encode((1, 2, 3), "png")), ("b.png", encode((1, 2, 3), "png")), ("a.cls", b"0"), ("b.cls", b"0")])),
        "", "has files apart from each other"),
    "missing pattern shard": (_write_then(lambda r: None), "/train-{000000..000002}.tar", "train-000002.tar"),
    "missing val pattern shard": (_write_then(lambda r: (r / "val-000001.tar").unlink()), "/train-{000000..000001}.tar",
                                  "val-000001.tar"),
    "pattern without train": (_write_then(lambda r: None), "/val-{000000..000001}.tar", "'train'"),
    "pattern with unbalanced braces": (_write_then(lambda r: None), "/train-{000000..000001.tar",  # before: its
                                       "train-{000000..000001.tar' has unbalanced braces; close each range"),  # words
}


@pytest.mark.parametrize("case", list(WDS_ERRORS))
def test_webdataset_errors(tmp_path, case):
    make, suffix, names = WDS_ERRORS[case]
    make(tmp_path)
    one_line_error(build_webdataset, f"{tmp_path}{suffix}", names=names)


# --------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------


def hf_split(samples: list[dict], image="image", label="label", class_label=True) -> "datasets.Dataset":
    features = datasets.Features({
        image: datasets.Image(),
        label: datasets.ClassLabel(names=NAMES) if class_label else datasets.Value("int64"),
    })
    return datasets.Dataset.from_dict(
        {image: [{"bytes": encode(s["rgb"], s["ext"]), "path": None} for s in samples],
         label: [s["label"] for s in samples]},
        features=features,
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(train=hf_split(TRAIN), validation=hf_split(VAL)).save_to_disk(str(root))
    return root


def write_hf(root: Path, layout: str, **splits) -> Path:
    """The splits as a save_to_disk folder, or as one parquet file each."""
    if layout == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(root))
    else:
        root.mkdir()
        for name, split in splits.items():
            split.to_parquet(str(root / f"{name}-00000-of-00001.parquet"))
    return root


def test_webdataset_reads_a_samples_image_by_preference_and_skips_metadata(tmp_path):
    """A sample's image is its .jpg before its .png (IMAGE_EXTS' order: the .png may be a mask); webdataset's
    __meta__/ folder is no sample; classes.txt may end in blank lines."""
    write_shards(tmp_path)
    _tar(tmp_path / "val-000001.tar", [("__meta__/info.json", b"{}"), ("a.cls", b"2"),
                                       ("a.jpg", encode((200, 0, 0), "jpg")), ("a.png", encode((0, 200, 0), "png")),
                                       ("b.cls", b"1"), ("b.png", encode((0, 0, 200), "png"))])
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n\n \n")
    data = build_webdataset(str(tmp_path), to_tensor, to_tensor)
    assert data.classes == tuple(NAMES)
    check_by_index(data.val, VAL[:3] + [dict(label=2, rgb=(200, 0, 0)), dict(label=1, rgb=(0, 0, 200))])


def test_webdataset_a_shard_cut_short_after_indexing_is_an_error(tmp_path):
    """A shard shortened since its index was read (re-copied, cut short) is said, not read as a shorter image."""
    write_shards(tmp_path)
    val = build_webdataset(str(tmp_path), to_tensor, to_tensor).val
    shard = tmp_path / "val-000001.tar"
    end = int(val.offset[-1]) + int(val.size[-1])
    shard.write_bytes(shard.read_bytes()[:end - 1])
    with pytest.raises(DataError, match="val-000001.tar' is shorter than when it was indexed; re-create it"):
        val._read(len(val) - 1)


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_evaluates_on_validation_before_test(tmp_path, layout):
    """A data set with validation and test splits is evaluated on validation, the first of HF_EVAL_SPLITS
    (test splits often hold no labels, or are kept for the end)."""
    root = write_hf(tmp_path / "d", layout, train=hf_split(TRAIN), test=hf_split(TRAIN[:4]), validation=hf_split(VAL))
    data = build_hf(str(root), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache"))
    assert "'validation'" in data.val.name
    check_by_index(data.val, VAL)


def test_hf_save_to_disk(hf_dir):
    data = build_hf(str(hf_dir), to_tensor, to_tensor)
    assert data.classes == tuple(NAMES)
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)


def test_hf_parquet_written_without_datasets_metadata(tmp_path):
    """Parquet written by pyarrow or pandas holds an image as a struct of bytes and path, the storage of
    datasets' Image, without the metadata that says so: read as images (before: refused, with advice to
    cast the column, for someone who only has the files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "pq"
    root.mkdir()
    for name, samples in (("train", TRAIN), ("validation", VAL)):
        table = pa.table({"image": [{"bytes": encode(s["rgb"], s["ext"]), "path": f"{i}.{s['ext']}"}
                                    for i, s in enumerate(samples)],
                          "label": [s["label"] for s in samples]})
        assert table.schema.metadata is None  # none of datasets' features
        pq.write_table(table, str(root / f"{name}-00000-of-00001.parquet"))
    data = build_hf(str(root), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache"))
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)


@pytest.mark.parametrize("layout", ["flat", "hub", "in a Hub cache"])
def test_hf_parquet(tmp_path, layout, monkeypatch):
    """Parquet (flat or the Hub's data/ layout), columns img/labels with plain ints, eval split 'test'.

    The Arrow conversion lands beside the data folder, and nothing in datasets' own cache; for a
    snapshot in a Hub cache, under the temp dir, where the Hub's tools see no second revision."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    root = tmp_path / "datasets--me--tiny" / "snapshots" / "abc123" if layout == "in a Hub cache" else tmp_path / "pq"
    folder = root / "data" if layout != "flat" else root
    folder.mkdir(parents=True)
    for name, samples in (("train", TRAIN[:10]), ("train", TRAIN[10:]), ("test", VAL)):
        n = len(list(folder.glob(f"{name}-*")))
        path = folder / f"{name}-{n:05d}-of-00002.parquet"
        hf_split(samples, "img", "labels", class_label=False).to_parquet(str(path))
    hf_cache = datasets.config.HF_DATASETS_CACHE
    before = sorted(os.listdir(hf_cache)) if os.path.isdir(hf_cache) else None
    data = build_hf(str(root), to_tensor, to_tensor)
    assert data.classes == ("0", "1", "2")
    check_by_index(data.train, TRAIN)
    check_by_index(data.val, VAL)
    assert (tmp_path / ".pq-arrow-cache").is_dir() == (layout != "in a Hub cache")
    assert (tmp_path / "tmp" / "coatnet-arrow-cache" / "abc123").is_dir() == (layout == "in a Hub cache")
    if layout == "in a Hub cache":
        assert os.listdir(root.parent) == [root.name]  # snapshots/ holds the one revision
    assert (sorted(os.listdir(hf_cache)) if os.path.isdir(hf_cache) else None) == before


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_hf_evaluation_alone_names_the_classes_as_training_did(tmp_path, layout):
    """Train split with a ClassLabel, validation split with plain integers: training names the classes by the
    ClassLabel; so does an evaluation, which reads the validation split alone (before: "0", "1", "2", which
    `coatnet eval` then refused as other classes than the checkpoint's)."""
    root = write_hf(tmp_path / "ds", layout, train=hf_split(TRAIN), validation=hf_split(VAL, class_label=False))
    assert build_hf(str(root), to_tensor, to_tensor).classes == tuple(NAMES)
    data = build_hf(str(root), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache"), train=False)
    assert data.train is None and data.classes == tuple(NAMES)
    check_by_index(data.val, VAL)


def test_hf_null_image_is_skipped_at_load(tmp_path):
    """A row whose image is null is an undecodable sample: warned about, counted, the next one in
    its place (before: an AttributeError traceback in the middle of an epoch)."""
    split = datasets.Dataset.from_dict(
        {"image": [None, *({"bytes": encode(s["rgb"], s["ext"]), "path": None} for s in TRAIN[1:])],
         "label": [s["label"] for s in TRAIN]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)}))
    datasets.DatasetDict(train=split, validation=hf_split(VAL)).save_to_disk(str(tmp_path / "ds"))
    train = build_hf(str(tmp_path / "ds"), to_tensor, to_tensor).train
    with pytest.warns(UserWarning, match="no image in row 0"):
        item = train[0]
    check_item(item, TRAIN[1])
    assert train.skipped_at_load == 1
    train.undecodable[1:] = True  # the others found undecodable already: the split is named (before: "the data set")
    with pytest.raises(DataError, match=rf"^no decodable image left in split 'train' of '{tmp_path / 'ds'}'; check"):
        train[0]


def test_hf_images_stored_as_paths_open_no_fifo(tmp_path):
    """Parquet whose image column holds file paths (datasets' to_parquet keeps them), one of them a
    FIFO: skipped and counted at load, as an unreadable file is (before: the epoch waited forever)."""
    (tmp_path / "ds").mkdir()
    paths = [tmp_path / f"{i}.{s['ext']}" for i, s in enumerate(TRAIN)]
    for path, s in zip(paths, TRAIN):
        path.write_bytes(encode(s["rgb"], s["ext"]))
    datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": [s["label"] for s in TRAIN]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.ClassLabel(names=NAMES)})
                               ).to_parquet(str(tmp_path / "ds" / "train-0.parquet"))
    hf_split(VAL).to_parquet(str(tmp_path / "ds" / "validation-0.parquet"))
    paths[0].unlink()
    os.mkfifo(paths[0])
    train = build_hf(str(tmp_path / "ds"), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache")).train

    def blocked(*_):  # the old code waits in open() for a writer: fail, do not hang the suite
        pytest.fail("blocked for 5 s: a FIFO was opened")
    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(5)
    try:
        with pytest.warns(UserWarning, match="not an image file but a FIFO"):
            item = train[0]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    check_item(item, TRAIN[1])
    assert train.skipped_at_load == 1


def _save(dd_or_ds):
    return lambda root: dd_or_ds().save_to_disk(str(root))


HF_ERRORS = {
    "empty folder": (lambda root: root.mkdir(), "dataset_dict.json"),
    "not a folder": (lambda root: None, "does not exist"),
    "single split": (_save(lambda: hf_split(TRAIN)), "single split"),
    "no eval split": (_save(lambda: datasets.DatasetDict(train=hf_split(TRAIN), extra=hf_split(VAL))),
                      "found: train, extra"),
    "no image column": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN, image="picture"), validation=hf_split(VAL, image="picture"))),
        "columns: picture, label; rename yours and save the data set again (dd.rename_column('picture', 'image')"),
    "no label column": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN, label="y"), validation=hf_split(VAL, label="y"))),
        "columns: image, y; rename yours and save the data set again (dd.rename_column('y', 'label').save_to_disk(DIR))"),
    "unlabelled eval split": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN, class_label=False), test=hf_split([dict(s, label=-1) for s in VAL], class_label=False))),
        "split 'test'"),
    "string labels": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN).cast_column("label", datasets.Value("string")), validation=hf_split(VAL))),
        "label column 'label' is Value('string'), not a ClassLabel or an integer; save the data set with it encoded "
        "(ds.class_encode_column('label'))"),
    "images as bytes": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN).cast_column("image", datasets.Image(decode=False)).map(
            lambda row: {"raw": row["image"]["bytes"]}, remove_columns="image").rename_column("raw", "image"),
        validation=hf_split(VAL))),
        "column 'image' is Value('binary'), not an Image; save the data set with the column cast to one"),
    # a struct of fields named as an Image's storage, of other types: no image (before: pyarrow's traceback)
    "a struct of bytes and path of other types": (_save(lambda: datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"image": [{"bytes": 1, "path": "x"}] * 2, "label": [0, 1]}) for split in ("train", "validation")})),
        "column 'image' is {'bytes': Value('int64'), 'path': Value('string')}, not an Image"),
    "a label far beyond the samples": (_save(lambda: datasets.DatasetDict(
        train=hf_split(TRAIN, class_label=False), validation=hf_split([dict(VAL[0], label=10**9)], class_label=False))),
        "would make a 1000000001-class head for 19 samples; check the labels, or give the label column a ClassLabel"),
    "corrupt parquet": (lambda root: (root.mkdir(), hf_split(TRAIN).to_parquet(str(root / "train-0.parquet")),
                                      (root / "validation-0.parquet").write_bytes(b"PAR1 garbage")),
                        "validation-0.parquet"),
}


@pytest.mark.parametrize("case", list(HF_ERRORS))
def test_hf_errors(tmp_path, case):
    make, names = HF_ERRORS[case]
    make(tmp_path / "ds")
    one_line_error(build_hf, str(tmp_path / "ds"), names=names)


@pytest.mark.parametrize("cache", ["new", "the user's"])
def test_hf_parquet_files_of_a_split_that_cannot_load_together(tmp_path, cache, monkeypatch):
    """A split's files whose label columns differ in type: one line naming the file and both types (before:
    datasets' "An error occurred while generating the dataset"), and the Arrow cache the load began is
    removed from beside the data; a cache folder that was there is left."""
    root = tmp_path / "pq"
    root.mkdir()
    hf_split(TRAIN[:10], class_label=False).to_parquet(str(root / "train-00000-of-00002.parquet"))
    hf_split(TRAIN[10:], class_label=False).map(lambda row: {"label": NAMES[row["label"]]}).to_parquet(
        str(root / "train-00001-of-00002.parquet"))  # the class names: no number for datasets to cast
    hf_split(VAL, class_label=False).to_parquet(str(root / "validation-00000-of-00001.parquet"))
    cache_dir = tmp_path / ".pq-arrow-cache"
    if cache == "the user's":
        cache_dir.mkdir()
        (cache_dir / "theirs.txt").write_text("kept")
    one_line_error(build_hf, str(root), names="train-00001-of-00002.parquet' differs: 'label' string there, int64 in")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["pq"] if cache == "new" else [".pq-arrow-cache", "pq"])
    if cache == "the user's":
        assert (cache_dir / "theirs.txt").read_text() == "kept"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_hf_a_split_of_a_dataset_dict_given_names_its_folder(hf_dir, split):
    """The folder of one split of a saved DatasetDict given for the DatasetDict's (eval --data-dir DIR/validation),
    as an image folder's val/ is: the line says to pass the DatasetDict's folder (before: "holds a single split
    (Dataset.save_to_disk); save a DatasetDict ...", which it is)."""
    one_line_error(build_hf, str(hf_dir / split),
                   names=f"'{hf_dir / split}' is the '{split}' split of the DatasetDict saved in '{hf_dir}'; pass "
                         f"--data-dir '{hf_dir}'")


# --------------------------------------------------------------------------------------------
# Both formats: workers, pickling, ranks
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["webdataset", "hf"])
def train_set(request, shard_dir, hf_dir):
    if request.param == "webdataset":
        return build_webdataset(str(shard_dir), to_tensor, to_tensor).train
    return build_hf(str(hf_dir), to_tensor, to_tensor).train


def test_pickle_and_workers(train_set):
    # The round trip is what a spawned worker does (a DataLoader under spawn costs ~15 s here).
    copy = pickle.loads(pickle.dumps(train_set))
    for i in (0, 7, 17):
        check_item(copy[i], TRAIN[i])
    loader = DataLoader(train_set, batch_size=4, num_workers=2)
    images, labels = zip(*loader)
    assert torch.cat(labels).tolist() == [s["label"] for s in TRAIN]
    assert torch.equal(torch.cat(images), torch.stack([train_set[i][0] for i in range(len(TRAIN))]))


def test_two_ranks_split_every_sample_once(train_set):
    """DistributedSampler over indices: two ranks together read each sample once per epoch (18 is
    even, so no padding); an odd count is padded by repeating one sample, with no gap."""
    for epoch in (0, 1):
        parts = []
        for rank in (0, 1):
            sampler = DistributedSampler(train_set, num_replicas=2, rank=rank, shuffle=True, seed=3)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
        assert len(parts[0]) == len(parts[1]) == 9
        assert sorted(parts[0] + parts[1]) == list(range(len(TRAIN)))
        seen = [tuple(train_set[i][0][:, 0, 0].tolist()) for i in parts[0] + parts[1]]
        assert len(set(seen)) == len(TRAIN)  # distinct indices are distinct samples
    odd = torch.utils.data.Subset(train_set, range(17))
    both = [i for r in (0, 1) for i in DistributedSampler(odd, num_replicas=2, rank=r, seed=3)]
    assert len(both) == 18 and set(both) == set(range(17))


def test_16_bit_and_grayscale_images_become_rgb(tmp_path):
    """As coatnet.data.load_image: 16-bit grayscale is scaled to 0..255, not clipped to white."""
    wide = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), 257 * 100, dtype=np.uint16)).save(wide, "PNG")
    gray = io.BytesIO()
    Image.new("L", (SIZE, SIZE), 50).save(gray, "PNG")
    write_shards(tmp_path)
    with wds.TarWriter(str(tmp_path / "train-000002.tar")) as w:
        w.write({"__key__": "wide", "png": wide.getvalue(), "cls": b"0"})
        w.write({"__key__": "gray", "png": gray.getvalue(), "cls": b"1"})
    train = build_webdataset(str(tmp_path), to_tensor, to_tensor).train
    assert torch.all(train[18][0] == 100) and torch.all(train[19][0] == 50)


# --------------------------------------------------------------------------------------------
# coatnet train on them
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["webdataset", "hf"])
def test_train_and_eval_read_them(kind, shard_dir, hf_dir, tmp_path, capsys):
    from coatnet.cli import main

    data_dir = shard_dir if kind == "webdataset" else hf_dir
    out = tmp_path / "run"
    assert main(["train", "--data", kind, "--data-dir", str(data_dir), "--img-size", "16", "--batch-size", "6",
                 "--epochs", "1", "--warmup-steps", "1", "--output-dir", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["val_images"] == len(VAL)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--json"]) == 0  # the data set recorded in the checkpoint
    report = json.loads(capsys.readouterr().out)
    names = list(NAMES) if kind == "hf" else ["0", "1", "2"]  # the shards have no classes.txt
    assert report["dataset"] == kind and report["count"] == len(VAL) and report["classes"] == names
    # A held-out set without a train split is evaluated (before: "no train shards found"), reading
    # nothing but its own split; its labels without names need not reach the model's last class.
    held_out, unseen = tmp_path / "held-out", [s for s in VAL if s["label"] < 2]
    if kind == "webdataset":
        held_out.mkdir()
        write_shard(held_out / "val-000000.tar", unseen)
    else:
        datasets.DatasetDict(validation=hf_split(unseen)).save_to_disk(str(held_out))
    assert main(["eval", "--checkpoint", str(out), "--data-dir", str(held_out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == len(unseen) and report["classes"] == names


def test_a_class_without_training_samples_is_said(tmp_path):
    """Labels without names number the classes up to the largest of both splits: a class that only
    the evaluation has is warned of, as an image folder's class without images is."""
    write_shards(tmp_path, val=[*VAL, dict(VAL[0], key="val9999", label=3)])
    with pytest.warns(UserWarning, match=r"1 class with no samples in the train shards of .*: 3 \(1 of them in the "
                                         r"evaluation, which the model cannot learn\)"):
        assert build_webdataset(str(tmp_path), to_tensor, to_tensor).classes == ("0", "1", "2", "3")


@pytest.mark.parametrize("kind", ["webdataset", "webdataset pattern", "hf"])
def test_eval_of_a_run_whose_shards_or_dataset_moved_asks_for_data_dir(kind, shard_dir, hf_dir, tmp_path, capsys):
    """As for an image folder: the folder the run recorded is gone, and the line names it and asks for
    --data-dir (before: "Hugging Face data directory ... does not exist", "... check --data-dir", of a path the
    user never gave)."""
    import shutil

    from coatnet.cli import main

    data = tmp_path / "data"
    shutil.copytree(shard_dir if kind.startswith("webdataset") else hf_dir, data)
    given = f"{data}/train-{{000000..000001}}.tar" if kind == "webdataset pattern" else str(data)
    out = tmp_path / "run"
    assert main(["train", "--data", kind.split()[0], "--data-dir", given, "--img-size", "16", "--batch-size", "6",
                 "--epochs", "1", "--warmup-steps", "1", "--output-dir", str(out)]) == 0
    data.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"was trained on the {kind.split()[0]} data at '{given}', which is not there " \
                                   f"now; pass --data-dir with its new place" in err, err
    moved = given.replace(str(data), str(tmp_path / "moved"))
    assert main(["eval", "--checkpoint", str(out), "--data-dir", moved, "--output-dir", str(tmp_path / "e")]) == 0


def test_a_shard_rewritten_in_place_with_its_old_size_and_mtime_is_indexed_again(tmp_path, index_cache):
    """The change time is part of the index's cache key: a shard written again with the same size,
    its modification time put back (as a copy that keeps times would), is not read from a stale index."""
    path = tmp_path / "train-000000.tar"
    image = encode((1, 2, 3), "png")
    _tar(path, [("a.png", image), ("a.cls", b"1")])
    assert [row[3] for row in data_shards._cached_index_shard(str(path))] == [1]
    before = os.stat(path)
    time.sleep(0.05)  # past a tick of the coarse clock the kernel stamps inodes with
    _tar(path, [("a.png", image), ("a.cls", b"2")])
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert [row[3] for row in data_shards._cached_index_shard(str(path))] == [2]


@pytest.mark.parametrize("fields,taken", [((("bytes", "large_binary"), ("path", "large_string")), True),
                                          ((("bytes", "binary"),), False),
                                          ((("bytes", "int64"), ("path", "string")), False)])
def test_hf_parquet_struct_read_as_images_only_in_images_own_storage(tmp_path, fields, taken):
    """A struct of bytes and path (binary or large_binary, string or large_string) is an Image's storage: read
    as images; another struct is refused in one line, not left to a cast's traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = dict(binary=pa.binary(), large_binary=pa.large_binary(), string=pa.string(),
                 large_string=pa.large_string(), int64=pa.int64())
    kind = pa.struct([(name, types[t]) for name, t in fields])
    root = tmp_path / "pq"
    root.mkdir()
    for name, samples in (("train", TRAIN), ("validation", VAL)):
        rows = [{"bytes": encode(s["rgb"], s["ext"]) if fields[0][1] != "int64" else i, "path": f"{i}.{s['ext']}"}
                for i, s in enumerate(samples)]
        table = pa.table({"image": pa.array([{k: r[k] for k, _ in fields} for r in rows], type=kind),
                          "label": [s["label"] for s in samples]})
        pq.write_table(table, str(root / f"{name}-00000-of-00001.parquet"))
    if taken:
        check_by_index(build_hf(str(root), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache")).train, TRAIN)
    else:
        with pytest.raises(DataError, match="column 'image' is .*, not an Image; save the data set with the column"):
            build_hf(str(root), to_tensor, to_tensor, cache_dir=str(tmp_path / "cache"))
