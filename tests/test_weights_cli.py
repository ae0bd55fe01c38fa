"""``napari-clip-ad weights list|fetch`` and released-weight names: cache state, atomic download, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from napari_clip_ad.cli import main
from napari_clip_ad.errors import WeightsError
from napari_clip_ad.methods import released
from napari_clip_ad.methods.checkpoints import resolve_weights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("NAPARI_CLIP_AD_CACHE", str(root))
    return root


def rows(text: str) -> dict[str, str]:
    """``weights list`` rows by name -> state (the last column)."""
    return {line.split()[0]: line.split()[-1] for line in text.splitlines()[2:]}


def test_list_shows_every_release_and_its_cache_state(cache, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"cache: {cache}"
    states = rows(out)
    assert set(states) == set(released.RELEASED)
    assert states["vand-mvtec"] == "fetchable" and states["adaclip-all"] == "download"  # "manual download"
    cache.mkdir()
    (cache / released.RELEASED["vand-mvtec"].filename).write_bytes(b"x")
    assert main(["weights", "list"]) == 0
    assert rows(capsys.readouterr().out)["vand-mvtec"] == "cached"


def test_fetch_without_direct_download_says_where_to_put_it(cache, capsys):
    assert main(["weights", "fetch", "adaclip-all"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no direct download" in err and str(cache / "adaclip_pretrained_all.pth") in err and "Google Drive" in err


def test_fetch_unknown_name_exits_2(cache, capsys):
    assert main(["weights", "fetch", "vand-mvtex"]) == 2
    assert "unknown released weights 'vand-mvtex'" in capsys.readouterr().err


def test_fetch_downloads_atomically_then_reuses_the_cache(cache, tmp_path, capsys, monkeypatch):
    source = tmp_path / "published.pth"
    source.write_bytes(bytes(range(256)) * 5000)
    entry = dataclasses.replace(released.RELEASED["vand-mvtec"], url=source.as_uri())
    monkeypatch.setitem(released.RELEASED, "vand-mvtec", entry)
    assert main(["weights", "fetch", "vand-mvtec"]) == 0
    target = cache / entry.filename
    assert capsys.readouterr().out.strip() == str(target)
    assert target.read_bytes() == source.read_bytes() and sorted(p.name for p in cache.iterdir()) == [entry.filename]
    assert resolve_weights("vand-mvtec") == target
    source.unlink()  # a second fetch must not download again
    assert main(["weights", "fetch", "vand-mvtec"]) == 0
    assert capsys.readouterr().out.strip() == str(target)


def test_failed_download_leaves_nothing_and_says_what_to_do(cache, capsys, monkeypatch):
    entry = dataclasses.replace(released.RELEASED["vand-visa"], url="http://127.0.0.1:9/visa_pretrained.pth")
    monkeypatch.setitem(released.RELEASED, "vand-visa", entry)
    assert main(["weights", "fetch", "vand-visa"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not download" in err and "by hand" in err and str(cache / entry.filename) in err
    assert not cache.exists() or not any(cache.iterdir())


def test_uncached_release_name_in_build_weights_names_the_fix(cache):
    with pytest.raises(WeightsError, match="weights fetch vand-mvtec"):
        resolve_weights("vand-mvtec")
    with pytest.raises(WeightsError, match="download it from https://github.com/caoyunkang/AdaCLIP"):
        resolve_weights("adaclip-visa-clinicdb")
