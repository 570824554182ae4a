"""Official file formats, downloads and load_dataset, on tiny fixture files built byte by byte in tmp_path.

The fixtures do not use the code under test to write themselves: IDX headers are packed with struct, CIFAR
batches are pickled by a Python-2-style pickler (every string a BINSTRING, as cPickle wrote them; keys therefore
come back as bytes), and archives are built with tarfile. No test touches the network: downloads go through a
monkeypatched `_open_url`.
"""
import gzip
import hashlib
import importlib
import io
import os
import pickle
import re
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minivit.data import (DATASETS, ChecksumError, MissingDatasetError, encode_idx, load_cifar10, load_cifar100,
                          load_dataset, load_image_folder, load_mnist_folder, read_idx, read_idx_images,
                          read_idx_labels, restricted_loads, verify_file, write_idx)

dl = importlib.import_module("minivit.data.download")  # the module (minivit.data.download is the function)

# ------------------------------------------------------------------------------------------------ IDX fixtures


def idx_bytes(magic, sizes, payload):
    """An IDX file by hand: big-endian magic, big-endian int32 sizes, then the raw elements."""
    return struct.pack(">I", magic) + struct.pack(f">{len(sizes)}I", *sizes) + payload


def mnist_arrays(n, seed, h=28, w=28):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_mnist_folder(folder, n_train=6, n_test=4, compress=True, h=28, w=28):
    """The four official files (gzipped like the originals, or raw), with random content; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        x, y = mnist_arrays(n, seed, h, w)
        for kind, magic, arr in (("images-idx3", 0x803, x), ("labels-idx1", 0x801, y)):
            data = idx_bytes(magic, arr.shape, arr.tobytes())
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[prefix] = (x, y)
    return out


def test_idx_roundtrip_gzip_and_raw(tmp_path):
    for compress in (True, False):
        ref = write_mnist_folder(tmp_path / str(compress), compress=compress)
        ds = load_mnist_folder(tmp_path / str(compress))
        assert ds.train_images.shape == (6, 28, 28, 1) and ds.train_images.dtype == np.uint8
        assert ds.train_labels.dtype == np.int64 and ds.test_images.shape == (4, 28, 28, 1)
        np.testing.assert_array_equal(ds.train_images[..., 0], ref["train"][0])
        np.testing.assert_array_equal(ds.test_labels, ref["t10k"][1])
        assert ds.classes == [str(d) for d in range(10)]


def test_gzip_detected_by_magic_not_name(tmp_path):
    x, _ = mnist_arrays(3, 0)
    data = idx_bytes(0x803, x.shape, x.tobytes())
    (tmp_path / "raw.gz").write_bytes(data)                 # raw bytes under a .gz name
    (tmp_path / "packed").write_bytes(gzip.compress(data))  # gzip bytes under a plain name
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), x)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed"), x)


def test_write_idx_matches_hand_built_bytes(tmp_path):
    x, y = mnist_arrays(2, 3)
    assert encode_idx(x) == idx_bytes(0x803, x.shape, x.tobytes())
    assert encode_idx(y) == idx_bytes(0x801, y.shape, y.tobytes())
    write_idx(tmp_path / "a.gz", x)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == encode_idx(x)
    f = np.arange(6, dtype=np.float32).reshape(2, 3)  # other IDX types round-trip too (big-endian on disk)
    write_idx(tmp_path / "f", f)
    assert (tmp_path / "f").read_bytes()[:4] == b"\x00\x00\x0d\x02"
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), f)


def test_truncated_idx_names_file_and_sizes(tmp_path):
    x, _ = mnist_arrays(3, 0)
    data = idx_bytes(0x803, x.shape, x.tobytes())
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx_images(p)
    assert str(p) in str(e.value) and str(len(data)) in str(e.value) and str(len(data) - 100) in str(e.value)
    p.write_bytes(data + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx_images(p)
    p.write_bytes(data[:10])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx_images(p)


def test_bad_magic_says_expected_and_found(tmp_path):
    _, y = mnist_arrays(5, 0)
    p = tmp_path / "labels"
    p.write_bytes(idx_bytes(0x801, y.shape, y.tobytes()))
    with pytest.raises(ValueError, match=r"expected 0x00000803.*found 0x00000801") as e:
        read_idx_images(p)  # a labels file where images are expected
    assert str(p) in str(e.value)
    p.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx_labels(p)


def test_truncated_gzip(tmp_path):
    x, _ = mnist_arrays(3, 0)
    packed = gzip.compress(idx_bytes(0x803, x.shape, x.tobytes()))
    p = tmp_path / "t.gz"
    p.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_label_image_count_mismatch(tmp_path):
    write_mnist_folder(tmp_path)
    y = np.zeros(5, np.uint8)  # the train images file holds 6
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x801, y.shape, y.tobytes())))
    with pytest.raises(ValueError, match="5 labels, but .* holds 6 images"):
        load_mnist_folder(tmp_path)


def test_label_out_of_range(tmp_path):
    write_mnist_folder(tmp_path)
    y = np.full(4, 10, np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(0x801, y.shape, y.tobytes())))
    with pytest.raises(ValueError, match=r"label 10 found, expected labels in \[0, 10\)"):
        load_mnist_folder(tmp_path)


# ---------------------------------------------------------------------------------------------- CIFAR fixtures

class Py2Pickler(pickle._Pickler):
    """Pickles like Python 2's cPickle did for the CIFAR files: every str/bytes as a (SHORT_)BINSTRING."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_binstring(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        n = len(b)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + b if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + b)
        self.memoize(obj)

    dispatch[bytes] = save_binstring
    dispatch[str] = save_binstring


def py2_pickle(obj):
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def cifar_rows(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root, n=3):
    """cifar-10-batches-py/ with 5 train batches, a test batch and batches.meta; returns {file: (rows, labels)}."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    ref = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        rows, labels = cifar_rows(n, i), [(i + j) % 10 for j in range(n)]
        (d / name).write_bytes(py2_pickle({b"batch_label": b"batch " + name.encode(), b"labels": labels,
                                           b"data": rows, b"filenames": [b"x.png"] * n}))
        ref[name] = (rows, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d / "batches.meta").write_bytes(py2_pickle({b"num_cases_per_batch": n, b"label_names": names,
                                                 b"num_vis": 3072}))
    return ref


def make_tar_gz(src_dir, archive):
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src_dir, arcname=src_dir.name)


def chw_reference(rows):
    """The format description, index by index: pixel (y, x) of channel c is byte c*1024 + y*32 + x."""
    n = len(rows)
    out = np.empty((n, 32, 32, 3), np.uint8)
    for c in range(3):
        for yy in range(32):
            out[:, yy, :, c] = rows[:, c * 1024 + yy * 32: c * 1024 + yy * 32 + 32]
    return out


def test_cifar10_folder_and_tar_gz(tmp_path):
    ref = write_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_tar_gz(tmp_path / "src" / "cifar-10-batches-py", archive)
    for source in (tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py", archive):
        ds = load_cifar10(source)
        assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
        assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
        np.testing.assert_array_equal(ds.train_images[3:6], chw_reference(ref["data_batch_2"][0]))
        np.testing.assert_array_equal(ds.test_images, chw_reference(ref["test_batch"][0]))
        np.testing.assert_array_equal(ds.train_labels[:3], ref["data_batch_1"][1])
        assert ds.classes[0] == "airplane" and len(ds.classes) == 10


def test_cifar100_fine_and_coarse_from_tar(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n, seed in (("train", 4, 0), ("test", 2, 1)):
        (d / name).write_bytes(py2_pickle({b"data": cifar_rows(n, seed), b"fine_labels": list(range(n)),
                                           b"coarse_labels": [1] * n, b"filenames": [b"f"] * n}))
    (d / "meta").write_bytes(py2_pickle({b"fine_label_names": [f"fine{i}" for i in range(100)],
                                         b"coarse_label_names": [f"coarse{i}" for i in range(20)]}))
    archive = tmp_path / "cifar-100-python.tar.gz"
    make_tar_gz(d, archive)
    fine = load_cifar100(archive)
    assert fine.num_classes == 100 and fine.train_labels.tolist() == [0, 1, 2, 3]
    coarse = load_cifar100(archive, label_mode="coarse")
    assert coarse.num_classes == 20 and coarse.train_labels.tolist() == [1, 1, 1, 1]
    assert coarse.classes[1] == "coarse1"
    np.testing.assert_array_equal(fine.test_images, chw_reference(cifar_rows(2, 1)))
    with pytest.raises(ValueError, match="label_mode"):
        load_cifar100(archive, label_mode="medium")


@pytest.mark.parametrize("module", [b"numpy.core.multiarray", b"numpy._core.multiarray"])
def test_restricted_unpickler_accepts_both_numpy_module_names(module):
    data = py2_pickle({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)})
    for m in (b"numpy.core.multiarray", b"numpy._core.multiarray"):  # GLOBAL is newline-terminated text
        data = data.replace(b"c" + m + b"\n_reconstruct\n", b"c" + module + b"\n_reconstruct\n")
    assert b"c" + module + b"\n_reconstruct\n" in data
    np.testing.assert_array_equal(restricted_loads(data)[b"data"], np.arange(6).reshape(2, 3))


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    ref = write_cifar10(tmp_path / "src")
    batch = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(py2_pickle({b"data": Evil(marker), b"labels": ref["data_batch_3"][1]}))
    with pytest.raises(ValueError, match=r"unsafe pickle refused: .*global '(posix|os)\.system'") as e:
        load_cifar10(tmp_path / "src")
    assert str(batch) in str(e.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"refusing to load global '(builtins|__builtin__)\.eval'"):
        restricted_loads(pickle.dumps(type("E", (), {"__reduce__": lambda s: (eval, ("1",))})(), protocol=2))


def test_truncated_and_corrupt_cifar(tmp_path):
    write_cifar10(tmp_path / "src")
    d = tmp_path / "src" / "cifar-10-batches-py"
    archive = tmp_path / "c.tar.gz"
    make_tar_gz(d, archive)
    (tmp_path / "cut.tar.gz").write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(ValueError, match="corrupt or truncated archive"):
        load_cifar10(tmp_path / "cut.tar.gz")
    whole = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt pickle") as e:
        load_cifar10(d)
    assert "test_batch" in str(e.value)
    (d / "test_batch").write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"'data' must be a uint8 array \(N, 3072\), found uint8 \(2, 100\)"):
        load_cifar10(d)
    (d / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_cifar10(d)


# ------------------------------------------------------------------------------------------------ image folders

def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_seeded_split(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        for i in range(5):
            save_png(tmp_path / c / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    ds = load_image_folder(tmp_path, test_fraction=0.4, seed=1)
    assert ds.classes == ["cat", "dog"] and ds.train_images.shape == (6, 8, 8, 3)
    assert np.bincount(ds.test_labels).tolist() == [2, 2]
    again = load_image_folder(tmp_path, test_fraction=0.4, seed=1)
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    others = [load_image_folder(tmp_path, test_fraction=0.4, seed=s).test_images for s in range(2, 6)]
    assert any(not np.array_equal(o, ds.test_images) for o in others)
    train_and_test = np.concatenate([ds.train_images, ds.test_images]).reshape(10, -1)
    assert len({r.tobytes() for r in train_and_test}) == 10  # a partition: every image exactly once


def test_image_folder_explicit_split_gray_and_resize(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                save_png(tmp_path / split / c / f"{i}.png", np.full((10, 12), 40 * i, np.uint8))  # mode L
    ds = load_image_folder(tmp_path, image_size=6)
    assert ds.meta["split"] == "explicit"
    assert ds.train_images.shape == (6, 6, 6, 1) and ds.test_images.shape == (4, 6, 6, 1)
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (ds.train_images[1] == 40).all()  # a constant image stays constant through the resize
    save_png(tmp_path / "train" / "a" / "rgb.png", np.zeros((10, 12, 3), np.uint8))
    assert load_image_folder(tmp_path, image_size=(5, 7)).train_images.shape == (7, 5, 7, 3)  # gray -> RGB


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        load_image_folder(tmp_path)
    save_png(tmp_path / "a" / "ok.png", np.zeros((4, 4, 3), np.uint8))
    save_png(tmp_path / "a" / "big.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        load_image_folder(tmp_path, test_fraction=0.0)
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="cannot read image") as e:
        load_image_folder(tmp_path, image_size=4)
    assert str(bad) in str(e.value)


# ---------------------------------------------------------------------------------------- downloads and hashes

def fake_dataset(monkeypatch, served, entries, mirrors=("https://a.example/", "https://b.example/")):
    """Pin a fake data set 'mnist' to `entries` and serve `served[url]` (bytes or an exception) instead of HTTP."""
    monkeypatch.setitem(dl.FILES, "mnist", entries)
    monkeypatch.setitem(dl.MIRRORS, "mnist", list(mirrors))
    calls = []

    def fake_open(url, timeout=60):
        calls.append(url)
        what = served.get(url, urllib.error.URLError("no route"))
        if isinstance(what, Exception):
            raise what
        return io.BytesIO(what)

    monkeypatch.setattr(dl, "_open_url", fake_open)
    return calls


def sha(b):
    return hashlib.sha256(b).hexdigest()


def test_download_verifies_and_refuses_mismatch(tmp_path, monkeypatch):
    good, bad = b"official bytes", b"tampered bytes"
    entry = dl.RemoteFile("f.bin", len(good), sha(good))
    fake_dataset(monkeypatch, {"https://a.example/f.bin": bad, "https://b.example/f.bin": bad}, [entry])
    with pytest.raises(ChecksumError) as e:
        dl.download("mnist", data_dir=tmp_path, progress=False)
    msg = str(e.value)
    assert "f.bin" in msg and sha(good) in msg and sha(bad) in msg
    assert not (tmp_path / "mnist" / "f.bin").exists()
    assert os.listdir(tmp_path / "mnist") == []  # no temporary file left behind either


def test_download_falls_back_to_next_mirror_and_skips_verified(tmp_path, monkeypatch):
    good = b"official bytes"
    entry = dl.RemoteFile("f.bin", len(good), sha(good))
    calls = fake_dataset(monkeypatch, {"https://b.example/f.bin": good}, [entry])
    folder = dl.download("mnist", data_dir=tmp_path, progress=False)
    assert (folder / "f.bin").read_bytes() == good
    assert calls == ["https://a.example/f.bin", "https://b.example/f.bin"]
    dl.download("mnist", data_dir=tmp_path, progress=False)  # present and verified: nothing fetched
    assert len(calls) == 2
    assert dl.verify("mnist", data_dir=tmp_path) == {"f.bin": "archive"}


def test_download_accepts_mirror_with_other_gzip_headers(tmp_path, monkeypatch):
    content = encode_idx(np.arange(5, dtype=np.uint8))
    official, repacked = gzip.compress(content, mtime=0), gzip.compress(content, mtime=99)
    entry = dl.RemoteFile("t10k-labels-idx1-ubyte.gz", len(official), sha(official), sha(content))
    fake_dataset(monkeypatch, {"https://a.example/t10k-labels-idx1-ubyte.gz": repacked}, [entry])
    folder = dl.download("mnist", data_dir=tmp_path, progress=False)
    assert (folder / entry.name).read_bytes() == repacked
    assert dl.verify("mnist", data_dir=tmp_path) == {entry.name: "content"}


def test_verify_accepts_recompressed_gzip_by_content(tmp_path, monkeypatch):
    content = encode_idx(np.arange(12, dtype=np.uint8).reshape(3, 4))
    official = gzip.compress(content, mtime=0)
    entry = dl.RemoteFile("t10k-labels-idx1-ubyte.gz", len(official), sha(official), sha(content))
    repacked = tmp_path / "t10k-labels-idx1-ubyte.gz"
    repacked.write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))  # other header, same content
    assert repacked.read_bytes() != official
    assert verify_file(repacked, entry) == "content"
    (tmp_path / "official.gz").write_bytes(official)
    assert verify_file(tmp_path / "official.gz", entry) == "archive"
    (tmp_path / "gunzipped").write_bytes(content)
    assert verify_file(tmp_path / "gunzipped", entry) == "content"
    repacked.write_bytes(gzip.compress(content + b"x"))
    with pytest.raises(ChecksumError, match="SHA-256 mismatch") as e:
        verify_file(repacked, entry)
    assert sha(official) in str(e.value) and sha(content) in str(e.value) and sha(content + b"x") in str(e.value)


def test_pinned_table_is_well_formed():
    for name in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
        assert dl.FILES[name] and dl.MIRRORS[name]
        for e in dl.FILES[name]:
            for h in (e.sha256, e.content_sha256):
                assert h is None or re.fullmatch("[0-9a-f]{64}", h), h   # a SHA-256 in lower-case hex
            assert e.size > 0
    assert all(e.content_sha256 for e in dl.FILES["mnist"] + dl.FILES["fashion-mnist"])


def test_missing_dataset_error_shows_command(tmp_path):
    for name in ("mnist", "cifar10"):
        with pytest.raises(MissingDatasetError) as e:
            load_dataset(name, data_dir=tmp_path)
        msg = str(e.value)
        assert f"minivit download {name}" in msg and "--data-dir" in msg and str(tmp_path / name) in msg
        assert isinstance(e.value, FileNotFoundError)


# ------------------------------------------------------------------------------------------------ load_dataset

def test_load_dataset_dispatch(tmp_path):
    write_mnist_folder(tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=tmp_path, verify=False)
    assert ds.name == "mnist" and ds.image_shape == (28, 28, 1)
    with pytest.raises(ChecksumError):  # fixture files are not the official ones
        load_dataset("mnist", data_dir=tmp_path)
    big = load_dataset("MNIST", data_dir=tmp_path, image_size=32, verify=False)
    assert big.train_images.shape == (6, 32, 32, 1) and big.meta["resize_filter"] == "bilinear"
    fashion = load_dataset("fashion-mnist", path=tmp_path / "mnist", verify=False)
    assert fashion.classes[0] == "T-shirt/top"
    write_cifar10(tmp_path / "cifar10")
    assert load_dataset("cifar10", data_dir=tmp_path).train_images.shape == (15, 32, 32, 3)  # extracted copy
    save_png(tmp_path / "imgs" / "x" / "0.png", np.zeros((4, 4, 3), np.uint8))
    save_png(tmp_path / "imgs" / "y" / "0.png", np.zeros((4, 4, 3), np.uint8))
    assert load_dataset(f"folder:{tmp_path / 'imgs'}", test_fraction=0.0).classes == ["x", "y"]
    assert load_dataset(str(tmp_path / "imgs"), image_size=8).image_shape == (8, 8, 3)
    with pytest.raises(ValueError, match="valid names are shapes, mnist, fashion-mnist, cifar10, cifar100"):
        load_dataset("imagenet21k")
    with pytest.raises(TypeError, match="unexpected options"):
        load_dataset("mnist", data_dir=tmp_path, n_train=5)
    assert DATASETS == ("shapes", "mnist", "fashion-mnist", "cifar10", "cifar100")


def test_load_dataset_shapes(tmp_path):
    pytest.importorskip("minivit.data.shapes")
    ds = load_dataset("shapes", data_dir=tmp_path, image_size=16, n_train=10, n_test=10, seed=0, progress=False)
    assert ds.name == "shapes" and ds.train_images.shape == (10, 16, 16, 3) and ds.num_classes == 10


DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_verified_by_content():
    """Debian re-compresses the official files: the archive hashes differ, the content hashes match."""
    assert set(dl.verify("fashion-mnist", folder=DEBIAN_FASHION).values()) == {"content"}
    ds = load_dataset("fashion-mnist", path=DEBIAN_FASHION)
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
