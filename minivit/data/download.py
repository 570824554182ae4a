"""Fetch the official data set archives, verified against SHA-256 values pinned here.

    download("mnist")      ->  data_dir/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    download("cifar10")    ->  data_dir/cifar10/cifar-10-python.tar.gz   (read directly, never extracted)

Each file is streamed to a temporary file in the target folder while its SHA-256 is computed, then renamed to its
final name only if the hash matches the pinned value: an interrupted or corrupted download never sits under the
final name. Mirrors are tried in order (network error or hash mismatch -> next mirror).

Where the hashes come from. The publishers give no SHA-256 (LeCun's page gives none, Zalando and Toronto give
MD5), so the archive values are the ones well-known loaders pin for these exact files:
    MNIST          TensorFlow Datasets tensorflow_datasets/url_checksums/mnist.txt (cvdf-datasets mirror), and
                   torchvision's torchvision/prototype/datasets/_builtin/mnist.py, which pins the same four values
                   for both yann.lecun.com and the ossci-datasets S3 mirror (so the mirrors are byte-identical)
    Fashion-MNIST  TensorFlow Datasets tensorflow_datasets/url_checksums/fashion_mnist.txt, and the same values in
                   torchvision's prototype mnist.py (FashionMNIST._CHECKSUMS)
    CIFAR-10       TensorFlow Datasets tensorflow_datasets/url_checksums/cifar10.csv (the python archive),
                   torchvision's prototype _builtin/cifar.py, and tf.keras cifar10.load_data's file_hash
    CIFAR-100      torchvision's prototype _builtin/cifar.py, and tf.keras cifar100.load_data's file_hash
IDX files also pin the SHA-256 of their DECOMPRESSED content, so a copy with other gzip headers (Debian's
`dataset-fashion-mnist` re-compresses the files: the archives differ, the IDX bytes do not), or an already
gunzipped copy, is verified by content:
    Fashion-MNIST  computed here from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1 files (their
                   decompressed sizes are the official 47040016 / 60008 / 7840016 / 10008 bytes; every image and
                   label parses), and equal to the values several public projects publish for the gunzipped
                   official files
    MNIST          the values many independent public projects pin for the gunzipped official files (scripts that
                   fetch from the ossci-datasets / cvdf-datasets mirrors and check the decompressed bytes); NOT
                   recomputed here: the machine that wrote this had no network and no MNIST copy
"""
import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from .paths import default_data_dir

CHUNK = 1 << 20  # bytes per read while downloading and hashing


@dataclass(frozen=True)
class RemoteFile:
    """One file of a data set: its name, size in bytes, SHA-256 of the file, SHA-256 of its gunzipped content."""
    name: str
    size: int
    sha256: str
    content_sha256: str = None  # IDX files only: hash of the decompressed bytes


# Mirrors in the order tried. MNIST: LeCun's server often refuses downloads, so first the S3 mirror that
# torchvision uses, then the Google mirror TensorFlow uses, then the official page. The files are byte-identical
# on all three (the pinned hashes are checked whatever the source).
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/",
              "http://yann.lecun.com/exdb/mnist/"],
    # the official S3 bucket (http only), then the files committed to the official GitHub repository
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

FILES = {
    "mnist": [  # archive: TFDS url_checksums/mnist.txt, torchvision prototype mnist.py; content: see docstring
        RemoteFile("train-images-idx3-ubyte.gz", 9912422,
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                   "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        RemoteFile("train-labels-idx1-ubyte.gz", 28881,
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                   "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        RemoteFile("t10k-images-idx3-ubyte.gz", 1648877,
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                   "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", 4542,
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                   "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ],
    "fashion-mnist": [  # archive: TFDS url_checksums/fashion_mnist.txt; content: from Debian's files, see docstring
        RemoteFile("train-images-idx3-ubyte.gz", 26421880,
                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                   "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        RemoteFile("train-labels-idx1-ubyte.gz", 29515,
                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                   "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        RemoteFile("t10k-images-idx3-ubyte.gz", 4422102,
                   "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                   "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", 5148,
                   "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                   "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ],
    # TFDS url_checksums/cifar10.csv, torchvision prototype cifar.py; official MD5 c58f30108f718f92721af3b95e74349a
    "cifar10": [
        RemoteFile("cifar-10-python.tar.gz", 170498071,
                   "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
    ],
    # torchvision prototype cifar.py, tf.keras cifar100 file_hash; official MD5 eb9058c3a382ffc7106e4002c42a8d85
    "cifar100": [
        RemoteFile("cifar-100-python.tar.gz", 169001437,
                   "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
    ],
}

DOWNLOADABLE = tuple(FILES)


class ChecksumError(ValueError):
    """A file's SHA-256 is not the pinned value."""


class MissingDatasetError(FileNotFoundError):
    """A data set is not on disk; the message shows the command that fetches it."""


def missing_message(name, folder, missing):
    """The error text for a data set that is not (fully) on disk: what is missing and the command to fetch it."""
    folder = Path(folder)
    where = "" if folder.parent.resolve() == Path(default_data_dir()).resolve() else f" --data-dir {folder.parent}"
    return (f"{name} is not available: {folder} lacks {', '.join(missing)}.\n"
            f"Fetch it with:\n    minivit download {name}{where}\n"
            f"(add --data-dir DIR to keep data sets elsewhere, and pass the same --data-dir when you train; "
            f"the default folder is {default_data_dir()}, or $MINIVIT_DATA)")


def _check_name(name):
    if name not in FILES:
        raise ValueError(f"cannot download {name!r}: downloadable data sets are {', '.join(DOWNLOADABLE)}")


def dataset_dir(name, data_dir=None):
    """data_dir/<name>, data_dir defaulting to minivit.data.paths.default_data_dir()."""
    return Path(data_dir if data_dir is not None else default_data_dir()) / name


def sha256_file(path, decompress=False):
    """Hex SHA-256 of a file's bytes, or of its gunzipped bytes when `decompress` and the file is gzip."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        gz = decompress and f.read(2) == b"\x1f\x8b"
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if gz else f
        try:
            for chunk in iter(lambda: stream.read(CHUNK), b""):
                h.update(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise ChecksumError(f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})") from None
    return h.hexdigest()


def verify_file(path, entry):
    """Check `path` against a pinned RemoteFile; returns 'archive' or 'content' (which hash matched).

    Accepted when the file's SHA-256 equals entry.sha256 or, for entries with a content hash, the SHA-256 of its
    (gunzipped if gzip) bytes equals entry.content_sha256. Otherwise ChecksumError naming the file and the hashes.
    """
    got = sha256_file(path)
    if got == entry.sha256:
        return "archive"
    if entry.content_sha256 is None:
        raise ChecksumError(f"{path}: SHA-256 mismatch: expected {entry.sha256}, got {got}")
    content = sha256_file(path, decompress=True)
    if content == entry.content_sha256:
        return "content"
    raise ChecksumError(f"{path}: SHA-256 mismatch: expected archive {entry.sha256} or decompressed content "
                        f"{entry.content_sha256}, got archive {got} and content {content}")


def local_file(folder, entry):
    """Path of a pinned file in `folder`: the archive name, or for IDX files the gunzipped name too; else None."""
    names = [entry.name]
    if entry.content_sha256 is not None and entry.name.endswith(".gz"):
        names.append(entry.name[:-3])
    for n in names:
        if (Path(folder) / n).is_file():
            return Path(folder) / n
    return None


def verify(name, data_dir=None, folder=None):
    """Verify every file of data set `name` in `folder` (default data_dir/<name>) -> {file name: 'archive'|'content'}.

    MissingDatasetError (with the download command) if a file is absent; ChecksumError if one does not match.
    """
    _check_name(name)
    folder = Path(folder) if folder is not None else dataset_dir(name, data_dir)
    found = {e.name: local_file(folder, e) for e in FILES[name]}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise MissingDatasetError(missing_message(name, folder, missing))
    return {e.name: verify_file(found[e.name], e) for e in FILES[name]}


def _open_url(url, timeout=60):
    """Open `url` for reading (the one place that touches the network; tests replace it)."""
    req = urllib.request.Request(url, headers={"User-Agent": "minivit"})
    return urllib.request.urlopen(req, timeout=timeout)


def _content_hash_or_none(path):
    """SHA-256 of a file's gunzipped bytes, or None if it is not valid gzip."""
    try:
        return sha256_file(path, decompress=True)
    except ChecksumError:
        return None


def fetch(url, dest, entry, progress=True):
    """Download `url` to `dest` atomically, keeping it only if it verifies like `verify_file` (archive hash, or
    for IDX files the hash of the gunzipped content: a mirror may gzip the same bytes differently).

    Streams to a temporary file in dest's folder while hashing; on a match, fsync and rename over dest; on a
    mismatch or an error the temporary file is deleted and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + dest.name + ".", suffix=".part", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _open_url(url) as resp, \
                tqdm(total=entry.size, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                     disable=not progress) as bar:
            for chunk in iter(lambda: resp.read(CHUNK), b""):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != entry.sha256:
            content = _content_hash_or_none(tmp) if entry.content_sha256 else None
            if content is None or content != entry.content_sha256:
                also = f" (decompressed content {content}, expected {entry.content_sha256})" if content else ""
                raise ChecksumError(f"{dest.name} from {url}: SHA-256 mismatch: expected {entry.sha256}, got {got}"
                                    f"{also}; the file was not kept")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def download(name, data_dir=None, progress=True):
    """Fetch data set `name` ('mnist', 'fashion-mnist', 'cifar10', 'cifar100') into data_dir/<name>/ -> that folder.

    Files already present and verified (archive or content hash) are kept. For each missing or bad file the
    mirrors are tried in order; if none gives a verified file, a RuntimeError lists what each mirror did (a
    ChecksumError when every mirror served bytes with the wrong hash).
    """
    _check_name(name)
    folder = dataset_dir(name, data_dir)
    for entry in FILES[name]:
        present = local_file(folder, entry)
        if present is not None:
            try:
                verify_file(present, entry)
                continue
            except ChecksumError:
                pass  # a damaged or foreign copy: fetch a good one over it
        failures = []
        for base in MIRRORS[name]:
            try:
                fetch(base + entry.name, folder / entry.name, entry, progress=progress)
                break
            except ChecksumError as e:
                failures.append(e)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # HTTPError: URLError
                failures.append(RuntimeError(f"{base + entry.name}: {type(e).__name__}: {e}"))
        else:
            text = "\n  ".join(str(e) for e in failures)
            cls = ChecksumError if all(isinstance(e, ChecksumError) for e in failures) else RuntimeError
            raise cls(f"could not download {entry.name} for {name}:\n  {text}\n"
                      f"You can also copy the official file into {folder} by hand: it is checked against the "
                      f"pinned SHA-256 the same way.")
    return folder
