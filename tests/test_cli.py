"""The command line, discovery through intake, lock files and mirrors of a box."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

import intake
from wildenberg_intake import cli
from wildenberg_intake.store.cache import StoreCache
from wildenberg_intake.store.integrity import recompute_content_checksum
from wildenberg_intake.mirror import MirrorServer, build_mirror

BOX = ["101", "2990", "95", "2777", "99", "501"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_catalog_is_discovered_through_intake_and_the_driver_by_short_name():
    assert "wildenberg2023" in list(intake.cat)
    cat = intake.cat.wildenberg2023
    assert sorted(cat) == sorted(f"{e}_{l}" for e in ("p105", "p14")
                                 for l in ("psd", "vesicle_cloud", "saturated", "synapses"))
    from wildenberg_intake.drivers import SynapseTableSource, WildenbergSource
    assert intake.registry["wildenberg"] is WildenbergSource
    assert intake.registry["wildenberg_synapses"] is SynapseTableSource


def test_importing_the_package_is_cheap():
    code = ("import sys, wildenberg_intake; "
            "print(sorted(m for m in ('intake', 'zarr', 'cloudvolume', 'torch', 'dask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_list_and_help(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0 and "p105_saturated" in out and "uint32" in out and "(904, 11328, 10000)" in out
    for command in ("list", "describe", "fetch", "verify", "lock", "preview", "view", "synapses", "mirror", "serve",
                    "demo"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        assert "usage: wildenberg-intake " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv,pattern", [
    (["fetch", "p99_psd"], r"entry 'p99_psd' is unknown; allowed: \['p105_psd'"),
    (["preview", "p14_psd", "--z", "0", "-o", "/missing/dir/x.png"],
     r"-o /missing/dir/x.png: the folder /missing/dir does not exist"),
    (["fetch", "p14_psd", "--bbox-nm", "5", "1", "0", "1", "0", "1"],
     r"bbox_nm=\[5, 1, 0, 1, 0, 1\] is empty or inverted along x"),  # numbers as numbers
    (["fetch", "p14_psd", "--bbox-nm", "a", "b", "c", "d", "e", "f"],
     r"bbox_nm=\['a', 'b', 'c', 'd', 'e', 'f'\] is not valid: 'a', 'b', 'c', 'd', 'e', 'f' are not finite numbers"),
    (["fetch", "p14_psd", "--em-mip", "x"], r"em_mip='x' is not valid"),
    (["fetch", "p14_psd", "--base-url", "ftp://x"], r"unsupported scheme 'ftp'"),
    (["verify", "/nonexistent/store"], r"'/nonexistent/store' is neither a store folder \(no such path\) nor a "
                                       r"catalog entry; allowed: .*p105_psd"),
    (["verify", "--lock", "/nonexistent.lock"], r"lock='/nonexistent.lock' does not exist"),
    (["serve", "/nonexistent"], r"holds no wildenberg2023/ folder"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, pattern, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    import re
    assert re.search(pattern, err), err


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).parent / "wildenberg-intake"
    if not exe.exists():
        pytest.skip("package not installed with its console script")
    done = subprocess.run([str(exe), "describe", "p14_psd", "--em-mip", "-3"], capture_output=True, text=True)
    assert done.returncode == 2 and "em_mip=-3" in done.stderr and "Traceback" not in done.stderr


def test_describe_fetch_verify_preview(server, tmp_path, capsys):
    common = ["--base-url", server.base_url, "--cache-dir", str(tmp_path), "--bbox-nm", *BOX]
    code, out, err = run(capsys, "describe", "p14_saturated", *common)
    assert code == 0, err
    desc = json.loads(out)
    assert desc["layers"]["raw"]["encoding"] == "raw" and desc["resolved"]["cached"] is False
    assert desc["catalog"]["bossdb_experiment"] == "mouse_v1_l4_p14"
    code, out, _ = run(capsys, "fetch", "p14_saturated", "--quiet", *common)
    assert code == 0 and "data.zarr" in out
    store = out.split(": ", 1)[1].split(" (")[0]
    code, out, _ = run(capsys, "verify", store)
    assert code == 0 and "raw: complete; every recorded shard is intact" in out
    png = tmp_path / "slice.png"
    code, out, _ = run(capsys, "preview", "p14_saturated", *common, "--z", "3", "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    image = np.asarray(Image.open(png))
    assert image.shape[:2] == zarr.open_group(store, mode="r")["raw"].shape[1:]
    assert len({tuple(p) for p in image.reshape(-1, 3)[::7]}) > 50  # grey EM plus coloured instances
    code, _, err = run(capsys, "preview", "p14_saturated", *common, "--z", "999", "-o", str(png))
    assert code == 2 and "z=999 is not valid; allowed: a slice index from 0 to" in err
    StoreCache.at(store).shard_file("raw", (0, 0, 0)).write_bytes(b"broken")
    code, out, _ = run(capsys, "verify", store)
    assert code == 1 and "raw: complete; corrupt [(0, 0, 0)]" in out


def test_lock_pins_bytes_across_caches_and_refuses_a_changed_info(mirror, tmp_path, capsys):
    root = tmp_path / "mirror"
    shutil.copytree(mirror.root, root)
    lock = tmp_path / "wildenberg.lock"
    with MirrorServer(root) as server:
        base = ["--base-url", server.base_url]
        code, out, err = run(capsys, "lock", "p14_psd", "p105_saturated", "--bbox-nm", *BOX, "-o", str(lock),
                             "--quiet", "--cache-dir", str(tmp_path / "a"), *base)
        assert code == 0, err
        pinned = json.loads(lock.read_text())
        assert pinned["catalog_version"] == "2023.2.0"
        assert set(pinned["entries"]) == {"p14_psd", "p105_saturated"}
        entry = pinned["entries"]["p14_psd"]
        assert entry["urls"] == {"raw": "mouse_v1_l4_p14/em_aligned", "labels": "mouse_v1_l4_p14/psd_autoseg"}
        # The same locked entries materialised into another cache hold the same bytes.
        code, out, err = run(capsys, "fetch", "--lock", str(lock), "--quiet", "--cache-dir", str(tmp_path / "b"), *base)
        assert code == 0, err
        code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path / "b"), *base)
        assert code == 0 and out.count("matches the lock") == 2, err
        from wildenberg_intake.drivers import entry_source
        srcs = [entry_source("p14_psd", lock=str(lock), base_url=server.base_url, cache_dir=str(d), progress=False,
                             bbox_nm=entry["parameters"]["bbox_nm"]) for d in (tmp_path / "a", tmp_path / "b")]
        stores = [Path(s.materialise()) for s in srcs]
        assert stores[0] != stores[1]
        assert all(recompute_content_checksum(StoreCache.at(s), "raw") == entry["content_xxh3"]["raw"] for s in stores)
        # Upstream changes its info file: the lock refuses it.
        info_path = root / "wildenberg2023/mouse_v1_l4_p14/em_aligned/info"
        info = json.loads(info_path.read_text())
        info["scales"][1]["encoding"] = "jpeg"
        info_path.write_text(json.dumps(info))
        code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path / "b"), *base)
        assert code == 1 and "info file of precomputed://" in err and "changed since the lock was made" in err
        # A different box is refused too.
        with pytest.raises(ValueError, match=r"p14_psd: parameters .* differ from the lock"):
            entry_source("p14_psd", lock=str(lock), base_url=server.base_url, cache_dir=str(tmp_path / "a"),
                         bbox_nm=[0, 2000, 0, 2000, 0, 400]).discover()


def test_locked_source_refuses_bytes_that_differ(server, tmp_path, capsys):
    lock = tmp_path / "w.lock"
    code, _, err = run(capsys, "lock", "p14_psd", "--bbox-nm", *BOX, "-o", str(lock), "--quiet",
                       "--cache-dir", str(tmp_path), "--base-url", server.base_url)
    assert code == 0, err
    pinned = json.loads(lock.read_text())
    pinned["entries"]["p14_psd"]["content_xxh3"]["labels"] = "0" * 32
    lock.write_text(json.dumps(pinned))
    from wildenberg_intake.drivers import entry_source
    src = entry_source("p14_psd", lock=str(lock), base_url=server.base_url, cache_dir=str(tmp_path),
                       bbox_nm=[float(v) for v in BOX], progress=False)
    with pytest.raises(ValueError, match=r"p14_psd: labels in .* does not hold the locked bytes \(content_xxh3"):
        src.read()


def test_a_lock_made_before_layout_5_pins_sha256_and_still_verifies(server, tmp_path, capsys):
    """Locks written by older versions pin each array as the sha256 of its shards' voxel sha256s
    (grid order, one per line): computed here from zarr-python's reading of the store, they verify
    (from the voxels, which the store no longer digests with sha256), and a different one fails."""
    import hashlib
    import zarr
    from wildenberg_intake.store.format import SHARDS
    lock = tmp_path / "w.lock"
    code, _, err = run(capsys, "lock", "p14_psd", "--bbox-nm", *BOX, "-o", str(lock), "--quiet",
                       "--cache-dir", str(tmp_path), "--base-url", server.base_url)
    assert code == 0, err
    pinned = json.loads(lock.read_text())
    entry = pinned["entries"]["p14_psd"]
    (store,) = (tmp_path / "wildenberg2023").iterdir()
    group = zarr.open_group(str(store / "data.zarr"), mode="r")
    old = {}
    for key, path in (("raw", "raw"), ("labels", "labels/psd/0")):
        data = group[path][:]
        lines = [hashlib.sha256(np.ascontiguousarray(data[i:i + SHARDS[0], j:j + SHARDS[1], k:k + SHARDS[2]])).hexdigest()
                 for i in range(0, data.shape[0], SHARDS[0]) for j in range(0, data.shape[1], SHARDS[1])
                 for k in range(0, data.shape[2], SHARDS[2])]
        old[key] = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    entry["content_sha256"] = old
    del entry["content_xxh3"]
    lock.write_text(json.dumps(pinned))
    code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path), "--base-url",
                         server.base_url)
    assert code == 0 and out.count("matches the lock") == 1, err
    entry["content_sha256"]["raw"] = "0" * 64
    lock.write_text(json.dumps(pinned))
    code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path), "--base-url",
                         server.base_url)
    assert code == 1 and "raw in" in err and "(content_sha256 " in err, err


def test_mirror_commands_synthetic_and_a_copied_box(server, mirror, tmp_path, capsys):
    code, out, _ = run(capsys, "mirror", "-o", str(tmp_path / "synthetic"), "--shape", "100", "90", "8")
    assert code == 0 and (tmp_path / "synthetic/wildenberg2023/mouse_v1_l4_p105/em/info").exists()
    copy = tmp_path / "copy"
    code, out, err = run(capsys, "mirror", "-o", str(copy), "--source", server.base_url, "--entry", "p14_psd",
                         "--bbox-nm", *BOX)
    assert code == 0, err
    # The copy serves the box with the same voxels, over file:// as over HTTP.
    from wildenberg_intake.drivers import entry_source
    bbox = [float(v) for v in BOX]
    original = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path / "o"), bbox_nm=bbox,
                            progress=False).read()
    copied = entry_source("p14_psd", base_url=f"file://{copy}/wildenberg2023", cache_dir=str(tmp_path / "c"),
                          bbox_nm=bbox, progress=False).read()
    np.testing.assert_array_equal(original["raw"].values, copied["raw"].values)
    np.testing.assert_array_equal(original["labels"].values, copied["labels"].values)
    # The copy says what it holds: another mip, or a box beyond it, is an error naming the copy.
    base = f"file://{copy}/wildenberg2023"
    with pytest.raises(ValueError, match=r"em_mip=2: layer .*em_aligned is a box copy of .* that holds mip \[1\] only"):
        entry_source("p14_psd", base_url=base, cache_dir=str(tmp_path / "c"), bbox_nm=bbox, em_mip=2).plan
    wider = list(bbox)
    wider[1] += 20000
    with pytest.raises(ValueError, match=r"reaches beyond the box copy at precomputed://file://.*mouse_v1_l4_p14, which holds"):
        entry_source("p14_psd", base_url=base, cache_dir=str(tmp_path / "c"), bbox_nm=wider).plan
    # Without a box, the copy's own box is read (what it holds, no more).
    whole = entry_source("p14_psd", base_url=base, cache_dir=str(tmp_path / "c"), progress=False)
    assert whole.plan.arrays["raw"].shape[1:] >= copied["raw"].shape[1:]
    # Other readers see exactly the copy: its info lists only the copied scale (the source's kept beside).
    from cloudvolume import CloudVolume
    em = copy / "wildenberg2023" / "mouse_v1_l4_p14" / "em_aligned"
    source_info = json.loads((em / "source_info.json").read_text())
    assert len(source_info["scales"]) > 1 and len(json.loads((em / "info").read_text())["scales"]) == 1
    held = CloudVolume(f"precomputed://file://{em}", mip=0, fill_missing=False, progress=False)
    assert list(held.resolution) == source_info["scales"][1]["resolution"]
    for mip in (1, 2):  # the source's other mips: an error, not zeros
        with pytest.raises(Exception, match=r"(?i)mip|scale"):
            CloudVolume(f"precomputed://file://{em}", mip=mip, fill_missing=False, progress=False)[:, :, :]
    raw = entry_source("p14_psd", base_url=base, cache_dir=str(tmp_path / "c"), bbox_nm=bbox).plan.arrays["raw"]
    (z0, y0, x0), (nz, ny, nx) = raw.start_zyx, raw.shape
    block = np.asarray(held[x0:x0 + nx, y0:y0 + ny, z0:z0 + nz])[..., 0].transpose(2, 1, 0)
    np.testing.assert_array_equal(block, original["raw"].values)  # cloud-volume reads the copy's voxels
    # preview of the copy uses what it holds
    png = tmp_path / "copy.png"
    code, out, err = run(capsys, "preview", "p14_psd", "--base-url", base, "--cache-dir", str(tmp_path / "c"),
                         "--z", "1", "-o", str(png), "--max-size", "64")
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err


def test_a_killed_box_copy_resumes_to_the_files_of_an_uninterrupted_one(mirror, tmp_path):
    import signal
    import time
    from wildenberg_intake.mirror import MirrorServer
    from wildenberg_intake.store.files import file_sha256

    def tree(root):
        return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    code = ("import sys; from wildenberg_intake.mirror import copy_box; "
            "copy_box(sys.argv[1], sys.argv[2], 'p14_psd', workers=2)")
    with MirrorServer(mirror.root, latency=0.3) as server:
        clean = subprocess.run([sys.executable, "-c", code, server.base_url, str(tmp_path / "clean")],
                               capture_output=True, text=True)
        assert clean.returncode == 0, clean.stderr
        proc = subprocess.Popen([sys.executable, "-c", code, server.base_url, str(tmp_path / "killed")])
        deadline = time.monotonic() + 60
        while not any(p.is_file() for p in (tmp_path / "killed").rglob("*-*_*-*_*-*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # killed once the first chunk is written, mid-copy
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = tree(tmp_path / "killed")
        assert partial and not any(name.endswith("/info") for name in partial), "info files come last"
        assert len(partial) < len(tree(tmp_path / "clean"))
        rerun = subprocess.run([sys.executable, "-c", code, server.base_url, str(tmp_path / "killed")],
                               capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
    assert tree(tmp_path / "killed") == tree(tmp_path / "clean")


def test_an_installed_wheel_carries_its_catalog_and_entry_points(tmp_path):
    root = Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "wheel"), str(root)], capture_output=True, text=True)
    if built.returncode:
        pytest.skip(f"cannot build a wheel here: {built.stderr[-300:]}")
    import zipfile
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import intake, wildenberg_intake as w; "
            "print(w.__file__); print(w.catalog_path()); print(sorted(intake.cat.wildenberg2023))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    module, catalog, entries = out.stdout.strip().splitlines()
    assert module.startswith(str(tmp_path / "site")) and catalog.startswith(str(tmp_path / "site"))
    assert catalog.endswith("wildenberg_intake/catalog_files/wildenberg.yaml")
    assert "p105_psd" in entries


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """p14 two output shards deep (150 label slices)."""
    m = build_mirror(tmp_path_factory.mktemp("deep"), shape_xyz=(300, 260, 150), experiments=("p14",))
    with MirrorServer(m.root) as s:
        yield m, s


def test_preview_fetches_only_its_slice_and_verify_entry_never_fetches(deep, tmp_path, capsys):
    mirror, server = deep
    common = ["--base-url", server.base_url, "--cache-dir", str(tmp_path)]
    code, out, _ = run(capsys, "verify", "p14_psd", *common)
    assert code == 0 and "p14_psd: nothing cached for these parameters" in out
    assert all(p.endswith(("/info", "/provenance")) for p in server.requests), "verify must not fetch voxels"
    png = tmp_path / "slice.png"
    code, out, err = run(capsys, "preview", "p14_psd", *common, "--z", "3", "-o", str(png))
    assert code == 0, err
    (root,) = (tmp_path / "wildenberg2023").iterdir()
    cache = StoreCache(tmp_path, root.name)
    assert cache.done_shards("raw") == {(0, 0, 0)} and cache.done_shards("labels/psd") == {(0, 0, 0)}
    # The slice's pixels are the mirror's (EM grey where no label is drawn).
    from PIL import Image
    from conftest import all_layers, expected_window
    raw, _ = expected_window(mirror, "p14", "em_aligned", 1, [-1e9, 1e9] * 3, all_layers("p14"))
    labels, _ = expected_window(mirror, "p14", "psd_autoseg", 0, [-1e9, 1e9] * 3, all_layers("p14"))
    image = np.asarray(Image.open(png))
    plain = (labels[3] == 0)
    plain[-30:, :] = plain[:20, :] = False  # the scale bar and the title
    np.testing.assert_array_equal(image[plain][:, 0], raw[3][plain])
    chunk_requests = sum(n for p, n in server.requests.items() if not p.endswith(("/info", "/provenance")))
    code, out, _ = run(capsys, "verify", "p14_psd", *common)
    assert code == 0 and "raw: incomplete (1 shards not fetched yet); every recorded shard is intact" in out
    code, out, _ = run(capsys, "describe", "p14_psd", *common)
    state = json.loads(out)["resolved"]["cache_state"]
    assert state["raw"]["shards_cached"] == 1 and state["raw"]["shards_total"] == 2
    assert state["labels/psd"]["bytes_on_disk"] == cache.shard_bytes("labels/psd", (0, 0, 0)) > 0
    assert sum(n for p, n in server.requests.items() if not p.endswith(("/info", "/provenance"))) == chunk_requests


def test_the_served_cache_answers_as_neuroglancer_asks(server, tmp_path):
    """CORS (with a preflight), HEAD and suffix ranges, as neuroglancer reads shard indexes."""
    import wildenberg_intake
    import urllib.request
    src = intake.open_catalog(wildenberg_intake.catalog_path()).p14_psd(
        base_url=server.base_url, cache_dir=str(tmp_path), bbox_nm=BOX, progress=False)
    store = Path(src.materialise())
    shard = next(p for p in (store / "raw" / "c").rglob("*") if p.is_file())
    data = shard.read_bytes()
    rel = shard.relative_to(tmp_path).as_posix()
    with MirrorServer(tmp_path) as cache_server:
        url = f"{cache_server.url}/{rel}"

        def ask(method, headers):
            req = urllib.request.Request(url, method=method, headers=headers)
            with urllib.request.urlopen(req) as resp:
                return resp.status, dict(resp.headers), resp.read()
        status, headers, body = ask("GET", {"Range": "bytes=-516", "Origin": "http://neuroglancer.example"})
        assert status == 206 and body == data[-516:]
        assert headers["Content-Range"] == f"bytes {len(data) - 516}-{len(data) - 1}/{len(data)}"
        assert headers["Access-Control-Allow-Origin"] == "*" and "Content-Range" in headers["Access-Control-Expose-Headers"]
        status, headers, body = ask("GET", {"Range": "bytes=10-19"})
        assert status == 206 and body == data[10:20]
        status, headers, body = ask("HEAD", {})
        assert status == 200 and int(headers["Content-Length"]) == len(data) and body == b""
        status, headers, _ = ask("OPTIONS", {"Origin": "http://x", "Access-Control-Request-Headers": "range"})
        assert status == 204 and "Range" in headers["Access-Control-Allow-Headers"]
        import urllib.error
        with pytest.raises(urllib.error.HTTPError) as info:
            ask("GET", {"Range": f"bytes={len(data) + 5}-"})
        assert info.value.code == 416


def test_the_preview_font_draws_the_micro_sign():
    from PIL import Image, ImageDraw
    from wildenberg_intake.viewer.preview import _font
    font, micro = _font()
    assert micro == "\u00b5"

    def pixels(text):
        image = Image.new("L", (40, 20))
        ImageDraw.Draw(image).text((2, 2), text, fill=255, font=font)
        return np.asarray(image)
    # A glyph of its own: not blank, and not the box drawn for a character the font lacks.
    assert pixels("\u00b5").any() and not np.array_equal(pixels("\u00b5"), pixels("\uffff"))


def test_verify_lock_names_damaged_shards_and_an_empty_cache_gets_the_fetch_command(server, tmp_path, capsys):
    lock = tmp_path / "w.lock"
    base = ["--base-url", server.base_url]
    code, out, err = run(capsys, "lock", "p14_psd", "--bbox-nm", *BOX, "-o", str(lock), "--quiet",
                         "--cache-dir", str(tmp_path / "a"), *base)
    assert code == 0, err
    code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path / "empty"), *base)
    assert code == 2 and f"fetch it first with `wildenberg-intake fetch --lock {lock} --cache-dir " in err
    # A flipped byte in a shard: exit 1, the array and shard named, the remedy given.
    cache = next(StoreCache.at(p) for p in (tmp_path / "a" / "wildenberg2023").iterdir())
    shard = cache.shard_file("labels/psd", (0, 0, 0))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path / "a"), *base)
    assert code == 1, err
    assert "p14_psd: labels/psd: shards [(0, 0, 0)] damaged" in out and "--repair`" in out
    code, out, err = run(capsys, "fetch", "--lock", str(lock), "--repair", "--quiet", "--cache-dir",
                         str(tmp_path / "a"), *base)
    assert code == 0 and "fetched again 1 damaged shards (labels/psd)" in out, err
    code, out, err = run(capsys, "verify", "--lock", str(lock), "--cache-dir", str(tmp_path / "a"), *base)
    assert code == 0 and "p14_psd: matches the lock" in out, err


def test_du_shows_each_arrays_shards_and_bytes_as_on_disk_and_verify_takes_every_path_form(server, tmp_path, capsys,
                                                                                         monkeypatch):
    cache_dir = tmp_path / "cache"
    code, out, err = run(capsys, "fetch", "p14_psd", "--base-url", server.base_url, "--cache-dir", str(cache_dir),
                         "--quiet")
    assert code == 0, err
    store = StoreCache.at(next((cache_dir / "wildenberg2023").iterdir()))
    code, out, _ = run(capsys, "du", str(cache_dir))
    assert code == 0
    for name in store.arrays():
        files = [store.shard_file(name, i) for i in store.done_shards(name)]
        on_disk = sum(p.stat().st_size for p in files if p.exists())
        line = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert line.split()[1] == str(len(files)), line
        assert f"{on_disk / 1e6:.1f} MB" in line or f"{on_disk / 1e3:.1f} kB" in line or f"{on_disk} B" in line, line
    code, _, err = run(capsys, "du", str(tmp_path / "nothing"))
    assert code == 2 and "is neither a cache folder" in err
    # verify by every path form: a damaged shard is found from each
    victim = max((store.shard_file("raw", i) for i in store.done_shards("raw")), key=lambda p: p.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[100:104] = bytes(b ^ 0xFF for b in blob[100:104])
    victim.write_bytes(bytes(blob))
    index = next(i for i in store.done_shards("raw") if store.shard_file("raw", i) == victim)
    n_arrays = len(store.arrays())
    n_shards = sum(len(store.done_shards(n)) for n in store.arrays())
    for cwd, target in ((store.root, "."), (store.root, "data.zarr"), (store.zarr_path, ".."),
                        (store.root.parent, store.root.name), (tmp_path, str(store.root)),
                        (store.zarr_path, "raw/zarr.json"), (store.root, "progress")):
        monkeypatch.chdir(cwd)
        code, out, _ = run(capsys, "verify", target)
        assert code == 1 and f"raw: complete; corrupt [{index}]" in out, (cwd, target, out)
        assert f"checked {n_shards} recorded shards of {n_arrays} arrays; 1 arrays damaged" in out, out
    # nothing checked is no pass: a folder that holds no store, a store with no arrays yet
    (tmp_path / "plain").mkdir()
    code, _, err = run(capsys, "verify", str(tmp_path / "plain"))
    assert code == 2 and f"path={str(tmp_path / 'plain')!r} is not in a wildenberg-intake store" in err, err
    bare = cache_dir / "wildenberg2023" / "bare"
    (bare / "data.zarr").mkdir(parents=True)
    (bare / "data.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    code, _, err = run(capsys, "verify", str(bare))
    assert code == 2 and f"store {bare} holds no arrays yet; nothing to verify" in err, err


@pytest.mark.parametrize("max_size", [64, 256])
def test_a_small_preview_keeps_its_whole_title_inside_the_image(wide, tmp_path, capsys, max_size):
    """The title shrinks, then wraps, to fit: every fully covered pixel of its text as drawn on an
    unbounded canvas is in the preview, and none touches the right edge."""
    from PIL import Image, ImageDraw
    from wildenberg_intake.mirror import MirrorServer
    from wildenberg_intake.viewer.preview import TITLE_COLOUR, TITLE_MARGIN, _fit
    png = tmp_path / "small.png"
    with MirrorServer(wide.root) as server:
        code, out, err = run(capsys, "preview", "p14_psd", "--base-url", server.base_url, "--cache-dir",
                             str(tmp_path), "--z", "1", "-o", str(png), "--max-size", str(max_size))
    assert code == 0, err
    image = np.asarray(Image.open(png).convert("RGB"))
    h, w, _ = image.shape
    yellow = np.all(image == TITLE_COLOUR, axis=2)
    assert yellow.any() and not yellow[:, w - TITLE_MARGIN + 2:].any()
    title = Image.open(png).text["Title"]
    assert title.startswith("p14 psd z=1")
    # The same lines on a canvas wide enough: as many fully covered pixels as the preview shows.
    canvas = Image.new("RGB", (2000, h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font, lines = _fit(draw, title, w - 2 * TITLE_MARGIN)
    step = sum(font.getmetrics()) + 1
    for i, line in enumerate(lines):
        draw.text((TITLE_MARGIN, 6 + i * step), line, fill=TITLE_COLOUR, font=font)
    assert yellow.sum() == np.all(np.asarray(canvas) == TITLE_COLOUR, axis=2).sum()


@pytest.mark.parametrize("argv, hint", [
    (["fetc", "p14_psd"], "invalid choice: 'fetc' (choose from "),
    (["fetch", "p14_psd", "--bbox-nmm", "0", "1", "0", "1", "0", "1"], "unrecognized arguments: --bbox-nmm 0 1 0 1 0 1"),
    (["fetch", "p14_psd", "--quite"], "unrecognized arguments: --quite"),
    (["preview", "p14_psd", "--z", "0", "-o", "x.png", "--max-sise", "9"], "unrecognized arguments: --max-sise 9"),
])
def test_the_command_line_suggests_the_closest_subcommand_or_option(argv, hint, capsys, tmp_path):
    want = {"fetc": "fetch", "--bbox-nmm": "--bbox-nm", "--quite": "--quiet", "--max-sise": "--max-size"}
    typo = next(t for t in argv if t in want)
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--cache-dir", str(tmp_path)] if argv[0] != "fetc" else argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    assert hint in err and err.endswith(f"; did you mean {want[typo]!r}?"), err
    assert not (tmp_path / "wildenberg2023").exists()
    with pytest.raises(SystemExit):  # nothing close: the arguments named, no guess
        cli.main(["list", "--zzzz"])
    assert capsys.readouterr().err.strip().endswith("unrecognized arguments: --zzzz")


def test_demo_serve_keeps_its_mirror_for_the_catalog_until_interrupted(tmp_path):
    """`demo --serve` prints the environment lines; with them intake's own catalog finds the demo's
    store through the served mirror (cached: nothing fetched again) and reads what it holds."""
    import signal
    demo = subprocess.Popen([sys.executable, "-m", "wildenberg_intake.cli.demo", "--folder", str(tmp_path / "d"),
                             "--shape", "160", "150", "8", "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        lines, env = [], {}
        for line in demo.stdout:
            lines.append(line)
            if line.strip().startswith("export "):
                key, value = line.strip().removeprefix("export ").split("=", 1)
                env[key] = value
            if "every entry, example and command" in line:
                break
        assert any("voxel-for-voxel equal to the mirror: True" in line for line in lines), "".join(lines)
        assert set(env) == {"WILDENBERG_BOSSDB_URL", "WILDENBERG_INTAKE_CACHE"}
        store = next(line.split("store: ", 1)[1].strip() for line in lines if line.startswith("store: "))
        child = subprocess.run([sys.executable, "-c",
                                "import intake, json; s = intake.cat.wildenberg2023.p105_psd; "
                                "cached = s.discover()['metadata']['cached']; ds = s.read(); "
                                "print(json.dumps({'cached': cached, 'store': ds.attrs['store'], "
                                "'sum': int(ds['labels'].values.astype('int64').sum())}))"],
                               capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        assert child.returncode == 0, child.stderr
        got = json.loads(child.stdout.strip().splitlines()[-1])
        assert got["cached"] is True and got["store"] == store
        assert got["sum"] == int(zarr.open_group(store, mode="r")["labels/psd/0"][:].astype("int64").sum())
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0
