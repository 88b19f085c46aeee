"""Tests for fingerprints.data on real files: Fashion-MNIST, .npz, ImageFolder trees, archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepcore_auditor.adapters.errors import InputError
from deepcore_auditor.fingerprints.data import Dataset, DataSplits, channel_stats, default_cache_dir, images, load_data

CIFAR = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10-jpeg.tar.gz"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Keep every test off ~/.cache and on the system Fashion-MNIST unless it says otherwise."""
    monkeypatch.setenv("DEEPCORE_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.delenv("DEEPCORE_FASHION_MNIST_DIR", raising=False)


# --------------------------------------------------------------------------- helpers


def _nchw(x: np.ndarray) -> np.ndarray:
    return x[:, None] if x.ndim == 3 else x


def _write_tree(root: Path, *, split: bool, fmt: str = "png", classes=("cat", "dog", "emu"),
                per_class: int = 4, size=(6, 5), mode: str = "RGB", seed: int = 0) -> dict:
    """Write real image files; return {relpath: pixels as decoded by Pillow, HWC or HW}."""
    rng = np.random.default_rng(seed)
    written = {}
    groups = [("train", per_class), ("test", 2)] if split else [("", per_class)]
    h, w = size
    for group, count in groups:
        for cls in classes:
            folder = root / group / cls if group else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (h, w) if mode == "L" else (h, w, 3)
                arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
                path = folder / f"{i:03d}.{fmt}"
                Image.fromarray(arr, mode).save(path)
                with Image.open(path) as im:  # what a decoder gives back (JPEG is lossy)
                    written[path.relative_to(root).as_posix()] = np.asarray(im)
    return written


def _expected(written: dict, group: str, classes) -> tuple[np.ndarray, np.ndarray]:
    """Expected x (NCHW) and y for one group, in class-then-filename order."""
    xs, ys = [], []
    for label, cls in enumerate(classes):
        prefix = f"{group}/{cls}/" if group else f"{cls}/"
        for rel in sorted(k for k in written if k.startswith(prefix)):
            a = written[rel]
            xs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
            ys.append(label)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def _tar(src: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return dest


def _assert_same(a: DataSplits, b: DataSplits) -> None:
    for part in ("train", "test"):
        da, db = getattr(a, part), getattr(b, part)
        assert da.classes == db.classes
        np.testing.assert_array_equal(da.x, db.x)
        np.testing.assert_array_equal(da.y, db.y)


def _idx_gz(path: Path, magic: int, arr: np.ndarray, extra: bytes = b"") -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes() + extra))


def _fake_fashion(root: Path, n_train: int = 12, n_test: int = 6) -> dict:
    rng = np.random.default_rng(1)
    arrays = {
        "train-images-idx3": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        _idx_gz(root / f"{name}-ubyte.gz", 0x803 if "images" in name else 0x801, arr)
    return arrays


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_package():
    splits = load_data("fashion-mnist")
    train, test = splits.train, splits.test
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == test.shape == (1, 28, 28)
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert train.classes == FASHION_CLASSES and train.num_classes == 10
    # the official sets are balanced: 6000 / 1000 per class
    assert np.bincount(train.y, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.y, minlength=10).tolist() == [1000] * 10
    # the first training and test images are ankle boots (documented by Zalando's samples)
    assert train.y[0] == 9 and test.y[0] == 9
    # the well-known normalisation constants of Fashion-MNIST
    (mean,), (std,) = channel_stats(train)
    assert mean == pytest.approx(0.2860, abs=1e-4) and std == pytest.approx(0.3530, abs=1e-4)
    assert splits.source["kind"] == "fashion-mnist" and len(splits.source["sha256"]) == 64


def test_fashion_mnist_dir_from_env_is_read_at_call_time(tmp_path, monkeypatch):
    arrays = _fake_fashion(tmp_path / "fm")
    monkeypatch.setenv("DEEPCORE_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    splits = load_data("fashion-mnist")
    np.testing.assert_array_equal(splits.train.x[:, 0], arrays["train-images-idx3"])
    np.testing.assert_array_equal(splits.train.y, arrays["train-labels-idx1"])
    np.testing.assert_array_equal(splits.test.x[:, 0], arrays["t10k-images-idx3"])
    np.testing.assert_array_equal(splits.test.y, arrays["t10k-labels-idx1"])
    assert splits.source["path"] == str(tmp_path / "fm")


def test_fashion_mnist_missing_dir(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DEEPCORE_FASHION_MNIST_DIR", str(empty))
    with pytest.raises(InputError) as err:
        load_data("fashion-mnist")
    msg = str(err.value)
    assert f"fashion-mnist not found in {empty}" in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "\n" not in msg


@pytest.mark.parametrize("damage, words", [
    ("magic", "magic"),
    ("truncated", "header says"),
    ("trailing", "header says"),
    ("not-gzip", "not valid gzip"),
    ("count-mismatch", "images but"),
    ("label-range", "out of range"),
])
def test_fashion_mnist_bad_idx(tmp_path, monkeypatch, damage, words):
    root = tmp_path / "fm"
    arrays = _fake_fashion(root)
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if damage == "magic":
        _idx_gz(images, 0x801, arrays["train-images-idx3"])
    elif damage == "truncated":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(raw[:-5]))
    elif damage == "trailing":
        _idx_gz(images, 0x803, arrays["train-images-idx3"], extra=b"\0")
    elif damage == "not-gzip":
        labels.write_bytes(b"this is not gzip at all")
    elif damage == "count-mismatch":
        _idx_gz(labels, 0x801, arrays["train-labels-idx1"][:-1])
    elif damage == "label-range":
        bad = arrays["train-labels-idx1"].copy()
        bad[3] = 10
        _idx_gz(labels, 0x801, bad)
    monkeypatch.setenv("DEEPCORE_FASHION_MNIST_DIR", str(root))
    with pytest.raises(InputError, match=words):
        load_data("fashion-mnist")


# --------------------------------------------------------------------------- .npz


LAYOUTS = {
    "grey-NHW": (lambda x: x[:, 0], 1),
    "grey-NCHW": (lambda x: x, 1),
    "grey-NHWC": (lambda x: x.transpose(0, 2, 3, 1), 1),
    "rgb-NCHW": (lambda x: x, 3),
    "rgb-NHWC": (lambda x: x.transpose(0, 2, 3, 1), 3),
    "rgb-NHWC-float32": (lambda x: (x.transpose(0, 2, 3, 1) / 255).astype(np.float32), 3),
    "grey-NHW-float64": (lambda x: x[:, 0] / 255.0, 1),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_npz_round_trip_each_layout(tmp_path, layout):
    to_layout, c = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (10, c, 7, 5), dtype=np.uint8)
    xt = rng.integers(0, 256, (4, c, 7, 5), dtype=np.uint8)
    y, yt = rng.integers(0, 4, 10), rng.integers(0, 4, 4)
    path = tmp_path / "d.npz"
    np.savez(path, x=to_layout(x), y=y, x_test=to_layout(xt), y_test=yt)
    splits = load_data(str(path))
    assert splits.train.shape == (c, 7, 5)
    np.testing.assert_array_equal(splits.train.x, x)
    np.testing.assert_array_equal(splits.test.x, xt)
    np.testing.assert_array_equal(splits.train.y, y)
    np.testing.assert_array_equal(splits.test.y, yt)
    assert splits.train.x.dtype == np.uint8 and splits.train.y.dtype == np.int64
    assert splits.train.num_classes == max(y.max(), yt.max()) + 1
    assert splits.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert splits.source["split"] == "given"


def test_npz_holdout_is_deterministic_and_disjoint(tmp_path):
    n = 60
    x = np.zeros((n, 3, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # sample id in a pixel
    y = np.arange(n) % 3
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=x, y=y, classes=np.array(["a", "b", "c"]))
    first, second = load_data(str(path)), load_data(path)
    _assert_same(first, second)
    assert (len(first.train), len(first.test)) == (50, 10)
    ids_train, ids_test = first.train.x[:, 0, 0, 0], first.test.x[:, 0, 0, 0]
    assert set(ids_train.tolist()).isdisjoint(ids_test.tolist())
    assert sorted(ids_train.tolist() + ids_test.tolist()) == list(range(n))
    np.testing.assert_array_equal(first.train.y, ids_train % 3)  # labels follow their images
    np.testing.assert_array_equal(first.test.y, ids_test % 3)
    assert first.train.classes == ("a", "b", "c")


class _Detonator:
    """Unpickling this creates a directory: proof that a loader unpickled user data."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("key", ["x", "y", "classes"])
def test_npz_object_array_is_refused_not_unpickled(tmp_path, key):
    marker = tmp_path / "unpickled"
    arrays = {"x": np.zeros((6, 4, 4), np.uint8), "y": np.zeros(6, np.int64)}
    arrays[key] = np.array([_Detonator(marker)] * (6 if key != "classes" else 1), dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match="object arrays"):
        load_data(str(path))
    assert not marker.exists()


def _central_entries(raw: bytearray) -> list[int]:
    at, found = raw.find(b"PK\x01\x02"), []
    while at >= 0:
        found.append(at)
        at = raw.find(b"PK\x01\x02", at + 4)
    assert found
    return found


def _npz_patched(path, patch) -> None:
    np.savez(path, x=np.zeros((6, 4, 4), np.uint8), y=np.zeros(6, np.int64))
    raw = bytearray(path.read_bytes())
    patch(raw)
    path.write_bytes(bytes(raw))


def _newer_version(raw: bytearray) -> None:  # "version needed to extract" 21.7
    for at in _central_entries(raw):
        raw[at + 6:at + 8] = (217).to_bytes(2, "little")


def _encrypted(raw: bytearray) -> None:  # general-purpose flag bit 0: encrypted
    for at in _central_entries(raw):
        raw[at + 8] |= 1


def _unclosed_header(raw: bytearray) -> None:  # x.npy's header with its shape tuple left open (CRC kept right)
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        members = {name: z.read(name) for name in z.namelist()}
    members["x.npy"] = members["x.npy"].replace(b"'shape': (6, 4, 4), }", b"'shape': (6, 4, 4,  }")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    raw[:] = out.getvalue()


def _not_npy(raw: bytearray) -> None:  # y.npy's bytes are not an .npy file (numpy returns them as bytes)
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z, zipfile.ZipFile(out, "w") as w:
        for name in z.namelist():
            w.writestr(name, z.read(name) if name != "y.npy" else b"not an array")
    raw[:] = out.getvalue()


# Found by the soak fuzzer (benchmarks/soak.py): each escaped as an internal error, from zipfile
# (NotImplementedError, RuntimeError) or from numpy's header parser (tokenize.TokenError).
@pytest.mark.parametrize("patch, words", [(_newer_version, "zip file version 21.7"), (_encrypted, "encrypted"),
                                          (_unclosed_header, "EOF in multi-line statement"),
                                          (_not_npy, "y is not an .npy array")])
def test_npz_broken_below_the_arrays_is_an_input_error(tmp_path, patch, words):
    path = tmp_path / "odd.npz"
    _npz_patched(path, patch)
    with pytest.raises(InputError, match=rf"odd\.npz.*: .*{words}"):
        load_data(str(path))


@pytest.mark.parametrize("arrays, words", [
    ({"x": np.zeros((5, 4, 4), np.uint8), "y": np.zeros(4, np.int64)}, "4 labels for 5 images"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.array([0, 1, 2, 0, 1, 3]),
      "classes": np.array(["a", "b", "c"])}, r"bad\.npz: y:? labels out of range"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.array([0, 1, -1, 0, 1, 1])},
     r"bad\.npz: y:? labels out of range"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.zeros(6, np.int64),
      "x_test": np.zeros((2, 4, 4), np.uint8)}, "given together"),
    ({"x": np.full((6, 4, 4), 1.5, np.float32), "y": np.zeros(6, np.int64)}, r"\[0, 1\]"),
    ({"x": np.zeros((6, 5, 5, 5), np.uint8), "y": np.zeros(6, np.int64)}, "channel axis"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.full(6, 0.5)}, "integer labels"),
    ({"x": np.zeros((6, 4, 4), np.uint8)}, "no 'y' array"),
    ({"x": np.zeros((0, 4, 4), np.uint8), "y": np.zeros(0, np.int64)}, "empty"),
    ({"x": np.zeros((6, 4, 4), np.uint8), "y": np.zeros(6, np.int64),
      "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.zeros(2, np.int64)}, "x_test images"),
])
def test_npz_malformed(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=words) as err:
        load_data(str(path))
    assert "\n" not in str(err.value)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip file" * 3)
    with pytest.raises(InputError, match="junk.npz"):
        load_data(str(path))


# --------------------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_imagefolder_split_tree_dir_and_archive_agree(tmp_path, fmt):
    root = tmp_path / "tree"
    written = _write_tree(root, split=True, fmt=fmt)
    from_dir = load_data(str(root), cache_dir=tmp_path / "c1")
    archive = _tar(root, tmp_path / "tree.tar.gz", arcname="mydata")  # one top-level folder
    from_tar = load_data(str(archive), cache_dir=tmp_path / "c2")
    _assert_same(from_dir, from_tar)

    classes = ("cat", "dog", "emu")
    assert from_dir.train.classes == classes
    for part in ("train", "test"):
        x, y = _expected(written, part, classes)
        np.testing.assert_array_equal(getattr(from_dir, part).x, x)
        np.testing.assert_array_equal(getattr(from_dir, part).y, y)
    assert (len(from_dir.train), len(from_dir.test)) == (12, 6)
    assert from_dir.train.shape == (3, 6, 5)
    assert from_tar.source["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert from_dir.source["kind"] == "imagefolder" and from_tar.source["kind"] == "archive"


def test_imagefolder_flat_tree_dir_and_archive_agree(tmp_path):
    root = tmp_path / "flat"
    written = _write_tree(root, split=False, fmt="png", per_class=6)
    (root / "README.txt").write_text("not an image")  # ignored
    from_dir = load_data(str(root), cache_dir=tmp_path / "c1")
    archive = tmp_path / "flat.tgz"
    with tarfile.open(archive, "w:gz") as tf:  # no top-level folder this time
        for child in sorted(root.iterdir()):
            tf.add(child, arcname=child.name)
    from_tar = load_data(str(archive), cache_dir=tmp_path / "c2")
    _assert_same(from_dir, from_tar)

    assert (len(from_dir.train), len(from_dir.test)) == (15, 3)  # 1/6 held out
    x, y = _expected(written, "", ("cat", "dog", "emu"))
    got = np.concatenate([from_dir.train.x, from_dir.test.x])
    got_y = np.concatenate([from_dir.train.y, from_dir.test.y])
    # every image lands in exactly one split, with its own label
    key = lambda a: a.reshape(len(a), -1).tobytes()  # noqa: E731
    order_exp = np.lexsort(x.reshape(len(x), -1).T[::-1])
    order_got = np.lexsort(got.reshape(len(got), -1).T[::-1])
    assert key(x[order_exp]) == key(got[order_got])
    np.testing.assert_array_equal(y[order_exp], got_y[order_got])
    assert from_dir.source["split"].startswith("holdout")


def test_grey_palette_rgba_and_mixed_channels(tmp_path):
    grey_root = tmp_path / "grey"
    written = _write_tree(grey_root, split=False, mode="L", classes=("a", "b"), per_class=3)
    grey = load_data(str(grey_root), cache_dir=tmp_path / "c")
    assert grey.train.shape == (1, 6, 5)
    x, _ = _expected(written, "", ("a", "b"))
    assert sorted(map(bytes, np.concatenate([grey.train.x, grey.test.x]))) == sorted(map(bytes, x))

    mixed = tmp_path / "mixed"
    (mixed / "a").mkdir(parents=True)
    (mixed / "b").mkdir()
    rng = np.random.default_rng(5)
    g = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(g, "L").save(mixed / "a" / "0.png")
    rgba = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(mixed / "a" / "1.png")
    pal = Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8), "RGB").quantize(7)
    pal.save(mixed / "b" / "0.png")
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(mixed / "b" / "1.png")
    splits = load_data(str(mixed), cache_dir=tmp_path / "c")
    assert splits.train.shape == (3, 6, 5)
    allx = {bytes(a) for a in np.concatenate([splits.train.x, splits.test.x])}
    assert bytes(np.stack([g, g, g])) in allx  # grey replicated into 3 channels
    assert bytes(rgba[..., :3].transpose(2, 0, 1)) in allx  # alpha dropped
    assert bytes(np.asarray(pal.convert("RGB")).transpose(2, 0, 1)) in allx  # palette -> RGB
    assert bytes(rgb.transpose(2, 0, 1)) in allx and len(allx) == 4


def test_mixed_image_sizes_name_the_file(tmp_path):
    root = tmp_path / "sizes"
    _write_tree(root, split=False, classes=("a", "b"), per_class=3)
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "b" / "odd.png")
    with pytest.raises(InputError, match=r"image sizes differ: .*odd\.png is 9x9") as err:
        load_data(str(root), cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)


def test_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "bad"
    _write_tree(root, split=False, classes=("a", "b"), per_class=3)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(InputError, match=r"cannot decode image .*broken\.jpg"):
        load_data(str(root), cache_dir=tmp_path / "c")
    archive = _tar(root, tmp_path / "bad.tar.gz", arcname="bad")
    with pytest.raises(InputError, match=r"cannot decode image .*broken\.jpg"):
        load_data(str(archive), cache_dir=tmp_path / "c")


def test_truncated_png_is_refused(tmp_path):
    root = tmp_path / "trunc"
    _write_tree(root, split=False, classes=("a", "b"), per_class=2, size=(40, 40))
    victim = root / "a" / "000.png"
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(InputError, match=r"000\.png"):
        load_data(str(root), cache_dir=tmp_path / "c")


def test_empty_and_imageless_trees(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        load_data(str(empty), cache_dir=tmp_path / "c")
    (empty / "cls").mkdir()
    (empty / "cls" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no images"):
        load_data(str(empty), cache_dir=tmp_path / "c")
    archive = _tar(empty, tmp_path / "empty.tar.gz", arcname="top")
    with pytest.raises(InputError, match="no images"):
        load_data(str(archive), cache_dir=tmp_path / "c")


def test_test_class_without_train_folder(tmp_path):
    root = tmp_path / "t"
    _write_tree(root, split=True, classes=("a", "b"))
    (root / "test" / "zebra").mkdir()
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(root / "test" / "zebra" / "0.png")
    with pytest.raises(InputError, match="zebra"):
        load_data(str(root), cache_dir=tmp_path / "c")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive(tmp_path, damage):
    root = tmp_path / "tree"
    _write_tree(root, split=True, size=(20, 20))
    archive = _tar(root, tmp_path / "tree.tar.gz", arcname="tree")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x1f\x8b" + raw[10:])
    with pytest.raises(InputError, match="tree.tar.gz") as err:
        load_data(str(archive), cache_dir=tmp_path / "c")
    assert "\n" not in str(err.value)


def test_archive_path_tricks_and_links_are_skipped(tmp_path, caplog):
    root = tmp_path / "tree"
    _write_tree(root, split=False, classes=("a", "b"), per_class=3)
    good = load_data(str(root), cache_dir=tmp_path / "c1")
    png = io.BytesIO()
    Image.fromarray(np.full((6, 5, 3), 7, np.uint8)).save(png, format="PNG")
    archive = tmp_path / "tricky.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for child in sorted(root.iterdir()):  # flat: a/000.png, b/000.png...
            tf.add(child, arcname=child.name)
        # each of these would become an image of class a/b/evil if taken in after normalising
        for name in ("../a/up.png", "/b/abs.png", "a/../evil/0.png", "./../b/up2.png"):
            info = tarfile.TarInfo(name)
            info.size = len(png.getvalue())
            tf.addfile(info, io.BytesIO(png.getvalue()))
        link = tarfile.TarInfo("a/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        hard = tarfile.TarInfo("b/hard.png")
        hard.type, hard.linkname = tarfile.LNKTYPE, "a/000.png"
        tf.addfile(hard)
        fifo = tarfile.TarInfo("a/fifo.png")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    tricky = load_data(str(archive), cache_dir=tmp_path / "c2")
    _assert_same(good, tricky)  # same classes, same images: nothing extra was taken in
    assert "skipped 4 member(s)" in caplog.text  # refused as unsafe, not merely misplaced
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


# --------------------------------------------------------------------------- cache


def _count_decodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = images._decode_all

    def counting(keys, read, where):
        calls.append(len(keys))
        return real(keys, read, where)

    monkeypatch.setattr(images, "_decode_all", counting)
    return calls


def test_archive_cache_is_used_and_corruption_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _write_tree(root, split=True, fmt="jpg")
    archive = _tar(root, tmp_path / "tree.tar.gz", arcname="tree")
    cache = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)

    first = load_data(str(archive), cache_dir=cache)
    assert calls == [18]
    entry = cache / "data" / hashlib.sha256(archive.read_bytes()).hexdigest()
    assert {p.name for p in entry.iterdir()} == {
        "x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy", "meta.json"}  # no temp files
    assert np.load(entry / "x_train.npy", allow_pickle=False).dtype == np.uint8

    second = load_data(str(archive), cache_dir=cache)
    assert calls == [18]  # nothing decoded: served from the cache
    _assert_same(first, second)

    for victim, damage in (("x_train.npy", b"garbage"), ("meta.json", b"{not json"),
                           ("y_test.npy", None)):
        path = entry / victim
        path.write_bytes(damage if damage is not None else path.read_bytes()[:-3])
        before = len(calls)
        rebuilt = load_data(str(archive), cache_dir=cache)
        assert len(calls) == before + 1, f"corrupt {victim} was not rebuilt"
        _assert_same(first, rebuilt)
        load_data(str(archive), cache_dir=cache)
        assert len(calls) == before + 1, f"rebuilt {victim} was not cached again"


def test_default_cache_dir_is_used(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _write_tree(root, split=False, classes=("a", "b"), per_class=3)
    monkeypatch.setenv("DEEPCORE_CACHE", str(tmp_path / "envcache"))
    load_data(str(root))
    assert list((tmp_path / "envcache" / "data").glob("*/x_train.npy"))


def test_directory_cache_follows_file_changes(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _write_tree(root, split=True, classes=("a", "b"))
    victim = root / "train" / "a" / "000.png"
    Image.fromarray(np.full((6, 5, 3), 10, np.uint8)).save(victim)
    cache = tmp_path / "cache"
    calls = _count_decodes(monkeypatch)
    first = load_data(str(root), cache_dir=cache)
    again = load_data(str(root), cache_dir=cache)
    assert len(calls) == 1
    _assert_same(first, again)

    size = victim.stat().st_size
    new = np.full((6, 5, 3), 200, np.uint8)
    Image.fromarray(new).save(victim)
    assert victim.stat().st_size == size  # same size: only the mtime tells the change
    os.utime(victim, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    changed = load_data(str(root), cache_dir=cache)
    assert len(calls) == 2
    np.testing.assert_array_equal(changed.train.x[0], new.transpose(2, 0, 1))
    assert len(list((cache / "data").iterdir())) == 2


def test_unwritable_cache_only_warns(tmp_path, caplog):
    root = tmp_path / "tree"
    _write_tree(root, split=False, classes=("a", "b"), per_class=3)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    splits = load_data(str(root), cache_dir=blocker)
    assert len(splits.train) + len(splits.test) == 6
    assert "could not write data cache" in caplog.text


# --------------------------------------------------------------------------- specs, helpers


@pytest.mark.parametrize("spec", ["mnist-but-not-really", "no/such/dir", "missing.npz", ""])
def test_unknown_spec(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="unknown data") as err:
        load_data(spec)
    msg = str(err.value)
    assert "fashion-mnist" in msg and ".npz" in msg and "ImageFolder" in msg and ".tar.gz" in msg


def test_unsupported_file(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3")
    with pytest.raises(InputError, match="unsupported data file"):
        load_data(str(path))


def test_dataset_methods_and_stats():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (9, 3, 4, 5), dtype=np.uint8)
    y = np.arange(9) % 4
    ds = Dataset("t", x, y, ("a", "b", "c", "d"))
    assert len(ds) == 9 and ds.shape == (3, 4, 5) and ds.num_classes == 4
    p = ds.points()
    assert p.dtype == np.float32 and p.shape == (9, 3, 4, 5)
    np.testing.assert_array_equal(p, x.astype(np.float32) / np.float32(255))
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert ds.points(2).shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(ds.points([4, 1])[1], p[1])
    assert ds.points(slice(2, 5)).shape == (3, 3, 4, 5)
    sub = ds.subset(y == 1)
    assert len(sub) == 2 and sub.y.tolist() == [1, 1] and sub.classes == ds.classes
    np.testing.assert_array_equal(sub.x, x[[1, 5]])
    assert len(ds.subset([])) == 0

    means, stds = channel_stats(ds)
    flat = (x / 255.0).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(means, flat.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stds, flat.std(axis=1), rtol=1e-12)
    with pytest.raises(InputError, match="empty"):
        channel_stats(ds.subset([]))


@pytest.mark.parametrize("x, y, words", [
    (np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 2]), "out of range"),
    (np.zeros((3, 1, 2, 2), np.float32), np.array([0, 1, 0]), "uint8"),
    (np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 0]), "uint8"),
    (np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1]), "3 images but 2 labels"),
])
def test_dataset_validation(x, y, words):
    with pytest.raises(InputError, match=words):
        Dataset("t", x, y, ("a", "b"))


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPCORE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DEEPCORE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "deepcore"


# --------------------------------------------------------------------------- real CIFAR-10


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"{CIFAR} is absent")
def test_cifar10_archive(tmp_path):
    splits = load_data(str(CIFAR), cache_dir=tmp_path / "cache")
    train, test = splits.train, splits.test
    assert (len(train), len(test)) == (50000, 10000)
    assert train.shape == test.shape == (3, 32, 32)
    assert train.classes == test.classes == CIFAR_CLASSES
    assert np.bincount(train.y, minlength=10).tolist() == [5000] * 10
    assert np.bincount(test.y, minlength=10).tolist() == [1000] * 10
    assert splits.source["sha256"] == (
        "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965")
    # close to the published CIFAR-10 channel means (JPEG re-encoding moves them a little)
    means, _ = channel_stats(train)
    np.testing.assert_allclose(means, (0.4914, 0.4822, 0.4465), atol=0.005)
    assert (tmp_path / "cache" / "data" / splits.source["sha256"] / "x_train.npy").is_file()
