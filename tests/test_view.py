"""`view` in a real browser: neuroglancer (its PyPI package) in Debian's headless Chromium draws the
served cache, and the screenshot's pixels are checked against the arrays the mirror was written from.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's chromium and chromium-driver; `.ci/run`
installs them). WebGL runs on SwiftShader, without a display or GPU.
"""

import threading

import numpy as np
import pytest

pytestmark = pytest.mark.viewer
from PIL import Image
import io

neuroglancer = pytest.importorskip("neuroglancer")  # the `viewer` extra, installed by `make test`
selenium_webdriver = pytest.importorskip("selenium.webdriver")

from wildenberg_intake.drivers import entry_source  # noqa: E402
from wildenberg_intake.store.engine import cache_for  # noqa: E402
from wildenberg_intake.mirror import LABEL_CHANNELS  # noqa: E402
from wildenberg_intake.viewer.view import View  # noqa: E402

EM, CHANNEL = "em_aligned", {label: channel for label, (channel, _) in LABEL_CHANNELS.items()}

SIZE = (480, 360)  # screenshot pixels (width, height)


@pytest.fixture(scope="module")
def browser():
    import os
    from selenium.webdriver.chrome.service import Service
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not os.access(p, os.X_OK)]
    if missing:
        message = (f"{' and '.join(missing)} missing: the browser test needs Debian's chromium and chromium-driver "
                   "(sudo apt-get install chromium chromium-driver; `make test` installs them when run as root)")
        if os.environ.get("WILDENBERG_INTAKE_REQUIRE_BROWSER") == "1":  # CI: never skipped
            pytest.fail(message)
        pytest.skip(message)
    opts = selenium_webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=800,600"):
        opts.add_argument(arg)
    driver = selenium_webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


def screenshot(view, driver, timeout=120) -> np.ndarray:
    """An RGB screenshot of the view's canvas of SIZE, taken once every visible chunk is drawn."""
    if driver.current_url != view.url:
        driver.get(view.url)
    with view.viewer.config_state.txn() as s:
        s.show_ui_controls, s.show_panel_borders, s.viewer_size = False, False, list(SIZE)
    done, out = threading.Event(), []
    view.viewer.async_screenshot(lambda reply: (out.append(reply), done.set()))
    assert done.wait(timeout), "neuroglancer took no screenshot in time"
    shot = out[0].screenshot
    assert (shot.width, shot.height) == SIZE
    return np.asarray(Image.open(io.BytesIO(shot.image)).convert("RGB")).astype(int)


def show(view, layers, position_nm, nm_per_pixel):
    """Only `layers` visible, plain rendering (no outlines, axes or scale bar), centred on `position_nm`
    (x, y, z) at `nm_per_pixel` across the screen."""
    with view.viewer.txn() as s:
        for layer in s.layers:
            layer.visible = layer.name in layers
        scales = [v * 1e9 for v in s.dimensions.scales]  # kept in metres
        s.position = [p / sc for p, sc in zip(position_nm, scales)]
        s.cross_section_scale = nm_per_pixel / scales[0]
        s.show_axis_lines = s.show_default_annotations = s.show_scale_bar = False


def pixel_points(position_nm, nm_per_pixel):
    """Physical (y, x) nm of each pixel's centre: neuroglancer puts `position` at the canvas centre."""
    w, h = SIZE
    xs = position_nm[0] + (np.arange(w) + 0.5 - w / 2) * nm_per_pixel
    ys = position_nm[1] + (np.arange(h) + 0.5 - h / 2) * nm_per_pixel
    return ys, xs


def sample(layer, mip, z_nm, ys, xs):
    """The mirror's voxel under each pixel (voxel k spans [k, k + 1) x its size, as in BossDB), plus a
    mask of pixels within 1 px of a voxel face (where rounding may fall either way)."""
    rx, ry, rz = layer.resolution_xyz[mip]
    iz = int(np.floor(z_nm / rz))
    iy, ix = np.floor(ys / ry).astype(int), np.floor(xs / rx).astype(int)
    lo = np.array([iz, iy.min(), ix.min()])
    block = layer.expected(mip, lo, [iz + 1, iy.max() + 1, ix.max() + 1])[0]
    values = block[np.ix_(iy - lo[1], ix - lo[2])]
    step = ys[1] - ys[0]
    edge_y = np.abs(ys / ry - np.round(ys / ry)) * ry < step / 2
    edge_x = np.abs(xs / rx - np.round(xs / rx)) * rx < step / 2
    return values, edge_y[:, None] | edge_x[None, :]


def coloured(rgb):
    """Pixels a segmentation colour was blended into (EM alone is grey: R = G = B)."""
    return (rgb.max(axis=2) - rgb.min(axis=2)) > 12


@pytest.fixture(scope="module")
def p14_view(mirror, server, tmp_path_factory):
    src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path_factory.mktemp("view")))
    with View([src]) as view:
        yield view, src


def test_view_draws_the_mirrors_em_and_labels_where_they_are(p14_view, mirror, browser):
    view, src = p14_view
    x0, x1, y0, y1, z0, z1 = src.plan.bbox_nm
    cache = cache_for(src.plan)
    assert cache.done_shards("raw") == set()  # nothing fetched before the browser asks
    nm = 4.0  # 3 pixels per 12 nm voxel; pixel centres a quarter pixel off voxel faces:
    position = ((x0 + x1) / 2 + nm / 4, (y0 + y1) / 2 + nm / 4, z0 + 40 * 7.5)  # the middle of slice 7
    ys, xs = pixel_points(position, nm)
    em, em_edge = sample(mirror.layer("p14", EM), 1, position[2], ys, xs)
    show(view, ["raw", "psd", "vesicle_cloud"], position, nm)
    rgb = screenshot(view, browser)
    want, edge = np.zeros(em.shape, bool), em_edge.copy()
    for label in ("psd", "vesicle_cloud"):
        values, label_edge = sample(mirror.layer("p14", CHANNEL[label]), 0, position[2], ys, xs)
        want |= values != 0
        edge |= label_edge
    got, inside = coloured(rgb), ~edge
    assert want[inside].sum() > 300 and (~want[inside]).sum() > 300  # both kinds of pixel are on screen
    # Label colour exactly where the mirror has labels, and nowhere else.
    assert np.mean(got[inside] == want[inside]) > 0.995
    # Unlabelled pixels show the EM voxel under them, value for value.
    grey = inside & ~want
    assert np.mean(np.abs(rgb[..., 0][grey] - em[grey]) <= 1) > 0.99
    # The dense segmentation: every pixel coloured, and the colour changes exactly where the segment does.
    show(view, ["raw", "saturated"], position, nm)
    rgb = screenshot(view, browser)
    segments, seg_edge = sample(mirror.layer("p14", CHANNEL["saturated"]), 0, position[2], ys, xs)
    inside = ~(em_edge | seg_edge)
    assert coloured(rgb)[inside].mean() > 0.995 and len(np.unique(segments)) >= 4
    # Neighbouring segments get different colours (compared as means: the EM shows through).
    means = {s: rgb[(segments == s) & inside].mean(axis=0) for s in np.unique(segments[inside])}
    touching = {(a, b) for a, b in zip(segments[:, :-1].ravel(), segments[:, 1:].ravel())
                if a != b and a in means and b in means}
    assert touching and all(np.abs(means[a] - means[b]).max() > 6 for a, b in touching)
    # The browser's requests made the shards it drew, through the cache, with their done records.
    assert cache.done_shards("raw") and cache.done_shards("labels/psd")


def test_em_at_6nm_is_placed_on_its_12nm_labels(mirror, server, tmp_path, browser):
    """em_mip=0: 6 nm EM under 12 nm labels. A half-voxel convention slip moves the EM 3 nm: at
    1.5 nm a pixel that is 2 pixels, and half the EM pixels would show the neighbouring voxel."""
    src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path), em_mip=0)
    with View([src]) as view:
        x0, x1, y0, y1, z0, z1 = src.plan.bbox_nm
        nm = 1.5
        position = ((x0 + x1) / 2 + nm / 4, (y0 + y1) / 2 + nm / 4, z0 + 40 * 5.5)
        ys, xs = pixel_points(position, nm)
        show(view, ["raw", "vesicle_cloud"], position, nm)
        rgb = screenshot(view, browser)
        em, em_edge = sample(mirror.layer("p14", EM), 0, position[2], ys, xs)
        labels, label_edge = sample(mirror.layer("p14", CHANNEL["vesicle_cloud"]), 0, position[2], ys, xs)
        inside = ~(em_edge | label_edge)
        assert np.mean(coloured(rgb)[inside] == (labels != 0)[inside]) > 0.995
        grey = inside & (labels == 0)
        assert grey.sum() > 1000
        assert np.mean(np.abs(rgb[..., 0][grey] - em[grey]) <= 1) > 0.99
        # The check tells: the EM placed 3 nm off (voxel corners taken for centres) would fail it.
        slipped, _ = sample(mirror.layer("p14", EM), 0, position[2], ys - 3.0, xs - 3.0)
        assert np.mean(np.abs(rgb[..., 0][grey] - slipped[grey]) <= 1) < 0.8


def test_view_command_prints_the_page_and_serves_shards_made_on_request(mirror, server, tmp_path):
    """`wildenberg-intake view` as a user runs it: the printed page answers, a shard asked for is made
    (recorded, equal to the mirror's voxels) and served; Ctrl-C stops it cleanly."""
    import signal
    import subprocess
    import sys
    import urllib.request
    import zarr
    from wildenberg_intake.store.format import SHARDS
    exe = [sys.executable, "-m", "wildenberg_intake.cli.main"]
    proc = subprocess.Popen(exe + ["view", "p14_psd", "--base-url", server.base_url, "--cache-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL) and None)
    try:
        lines = []
        while not lines or not lines[-1].startswith("open "):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line.strip())
        page = lines[-1].split()[1]
        with urllib.request.urlopen(page) as resp:
            assert resp.status == 200 and b"neuroglancer" in resp.read().lower()
        image = next(line.split()[-1] for line in lines if line.startswith("image layer raw:"))
        assert image.startswith("zarr3://http://127.0.0.1:") and image.endswith("/overview/em.zarr/")
        with urllib.request.urlopen(image[len("zarr3://"):] + "0/c/0/0/0") as resp:  # level 0: the store's EM
            body = resp.read()
        src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path))
        store = cache_for(src.plan).zarr_path
        assert body == (store / "raw" / "c" / "0" / "0" / "0").read_bytes()
        assert cache_for(src.plan).done_shards("raw") == {(0, 0, 0)}
        raw = zarr.open_array(store / "raw", mode="r")
        z, y, x = (min(n, s) for n, s in zip(raw.shape, SHARDS))
        start = np.asarray(src.plan.arrays["raw"].start_zyx)
        np.testing.assert_array_equal(raw[:z, :y, :x], mirror.layer("p14", EM).expected(1, start, start + [z, y, x]))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_a_shard_that_cannot_be_fetched_is_a_server_error_and_not_recorded(mirror, tmp_path):
    import urllib.error
    import urllib.request
    from wildenberg_intake.mirror import Faults, MirrorServer
    with MirrorServer(mirror.root, faults=Faults(fail_paths=("em_aligned/12_12_40/",))) as failing:
        src = entry_source("p14_psd", base_url=failing.base_url, cache_dir=str(tmp_path),
                           retry={"attempts": 2, "backoff": 0.01})
        with View([src]) as view:
            url = view.layers()[0][2][len("zarr3://"):] + "0/c/0/0/0"  # level 0: the store's EM
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(url)
            assert info.value.code == 503
            assert cache_for(src.plan).done_shards("raw") == set()


def test_only_the_viewers_own_requests_are_served(mirror, server, tmp_path):
    """No other web page can drive the view server: a request without the token, with a foreign
    Host (DNS rebinding) or from another origin (a simple GET or a CORS preflight) gets 403 before
    any work: nothing is fetched from the source and nothing is recorded."""
    import http.client
    from urllib.parse import urlparse
    src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path))
    with View([src]) as view:
        shard = urlparse(view.layers()[0][2][len("zarr3://"):] + "0/c/0/0/0")
        token, rest = shard.path.split("/", 2)[1:]
        assert len(token) >= 24
        page = urlparse(view.url)
        own_origin = f"{page.scheme}://{page.netloc}"
        before = sum(server.requests.values())

        def ask(method, path, **headers):
            conn = http.client.HTTPConnection(shard.hostname, shard.port, timeout=30)
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                return resp.status, dict(resp.getheaders())
            finally:
                conn.close()
        assert ask("GET", "/" + rest)[0] == 403  # no token
        assert ask("GET", "/" + "x" * len(token) + "/" + rest)[0] == 403  # a wrong one
        assert ask("GET", shard.path, Host="attacker.example")[0] == 403
        assert ask("GET", shard.path, Origin="http://evil.example")[0] == 403
        assert ask("OPTIONS", shard.path, Origin="http://evil.example", **{"Access-Control-Request-Method": "GET"})[0] == 403
        assert view.server.refused == 5
        assert sum(server.requests.values()) == before, "a refused request fetched from the source"
        assert cache_for(src.plan).done_shards("raw") == set()
        status, headers = ask("OPTIONS", shard.path, Origin=own_origin, **{"Access-Control-Request-Method": "GET"})
        assert status == 204 and headers["Access-Control-Allow-Origin"] == own_origin
        status, headers = ask("GET", shard.path, Origin=own_origin)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == own_origin
        assert cache_for(src.plan).done_shards("raw") == {(0, 0, 0)}


def test_a_byte_range_reads_only_its_range(tmp_path):
    import urllib.request
    from wildenberg_intake.mirror import MirrorServer
    data = np.random.default_rng(0).integers(0, 256, 2**20, dtype=np.uint8).tobytes()
    (tmp_path / "wildenberg2023").mkdir()
    (tmp_path / "wildenberg2023" / "blob").write_bytes(data)
    with MirrorServer(tmp_path) as server:
        for header, want in (("bytes=1000-1099", data[1000:1100]), ("bytes=-516", data[-516:]),
                             ("bytes=1048000-", data[1048000:])):
            before = server.bytes_read
            req = urllib.request.Request(server.base_url + "/blob", headers={"Range": header})
            with urllib.request.urlopen(req) as resp:
                assert resp.status == 206 and resp.read() == want
            assert server.bytes_read - before == len(want)


def test_the_first_view_of_a_small_box_fills_the_canvas_with_the_em_visible_under_the_labels(mirror, server,
                                                                                             tmp_path, browser):
    """As a newcomer sees it: `view` of a small box opens zoomed to fill a 1000 x 800 canvas, the
    synapse labels drawn in one clear colour each with the EM showing through them, and the dense
    segmentation hidden until asked for."""
    from wildenberg_intake.viewer.view import LABEL_ALPHA, LABEL_COLOURS, SCREEN_PIXELS
    src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path))
    with View([src]) as view:
        browser.get(view.url)
        with view.viewer.config_state.txn() as s:
            s.show_ui_controls, s.show_panel_borders, s.viewer_size = False, False, list(SCREEN_PIXELS)
        with view.viewer.txn() as s:
            s.show_axis_lines = s.show_default_annotations = s.show_scale_bar = False
            shown = {layer.name: layer.visible is not False for layer in s.layers}
            assert shown == {"raw": True, "psd": True, "vesicle_cloud": True, "saturated": False}
            position = [p * sc * 1e9 for p, sc in zip(s.position, s.dimensions.scales)]
            nm = s.cross_section_scale * s.dimensions.scales[0] * 1e9
        done, out = threading.Event(), []
        view.viewer.async_screenshot(lambda reply: (out.append(reply), done.set()))
        assert done.wait(120)
        rgb = np.asarray(Image.open(io.BytesIO(out[0].screenshot.image)).convert("RGB")).astype(int)
    assert rgb.shape[:2] == SCREEN_PIXELS[::-1]
    x0, x1, y0, y1, z0, z1 = src.plan.bbox_nm
    assert (x1 - x0) / nm > 0.8 * SCREEN_PIXELS[0] or (y1 - y0) / nm > 0.8 * SCREEN_PIXELS[1]  # zoomed to fill
    drawn = rgb.sum(axis=2) > 0  # outside the box the canvas is black
    assert drawn.mean() > 0.8
    # Under the PSD colour the EM is visible: the green channel is the EM voxel under the pixel, blended.
    w, h = SCREEN_PIXELS
    xs = position[0] + (np.arange(w) + 0.5 - w / 2) * nm
    ys = position[1] + (np.arange(h) + 0.5 - h / 2) * nm
    em, em_edge = sample(mirror.layer("p14", EM), 1, position[2], ys, xs)
    psd, psd_edge = sample(mirror.layer("p14", CHANNEL["psd"]), 0, position[2], ys, xs)
    cloud, cloud_edge = sample(mirror.layer("p14", CHANNEL["vesicle_cloud"]), 0, position[2], ys, xs)
    inside = drawn & ~(em_edge | psd_edge | cloud_edge)
    on_psd = inside & (psd != 0) & (cloud == 0)
    assert on_psd.sum() > 200
    g = int(LABEL_COLOURS["psd"][3:5], 16)
    want_green = (1 - LABEL_ALPHA) * em[on_psd] + LABEL_ALPHA * g
    assert np.mean(np.abs(rgb[..., 1][on_psd] - want_green) <= 3) > 0.95
    # Under the vesicle-cloud colour likewise, in the red channel.
    on_cloud = inside & (cloud != 0) & (psd == 0)
    r = int(LABEL_COLOURS["vesicle_cloud"][1:3], 16)
    want_red = (1 - LABEL_ALPHA) * em[on_cloud] + LABEL_ALPHA * r
    assert on_cloud.sum() > 200 and np.mean(np.abs(rgb[..., 0][on_cloud] - want_red) <= 3) > 0.95
    assert np.ptp(em[on_psd | on_cloud]) > 20  # EM with contrast under the labels, shown value for value
    # Nowhere else coloured: no segmentation drawn where the mirror has no synapse label.
    plain = inside & (psd == 0) & (cloud == 0)
    assert np.mean(coloured(rgb)[plain]) < 0.005


def _mode_level_1(block: np.ndarray) -> np.ndarray:
    """The pyramid's 2 x 2 mode of one slice (ties to the lower value, edge blocks clipped): independent."""
    from tests_helpers import mode_2x2
    return mode_2x2(block[None])[0]


def test_a_zoomed_out_view_draws_the_sources_em_mip_and_label_tiles_and_makes_no_level_0(mirror, server, tmp_path,
                                                                                          browser):
    """At 24 nm a pixel neuroglancer draws the overview groups' level 1: tiles of the EM of the
    source's mip 2 (24 nm) and of the labels by the pyramid's mode, made from the source chunks of
    the slice's z-row. Nothing of level 0 is made."""
    src = entry_source("p14_psd", base_url=server.base_url, cache_dir=str(tmp_path))
    plan = src.plan
    label_src = plan.arrays["labels/psd"]
    before = dict(server.requests)
    with View([src]) as view:
        x0, x1, y0, y1, z0, z1 = plan.bbox_nm
        nm, z = 24.0, 7
        origin = np.asarray(label_src.origin_nm_zyx, float)
        # Pixel centres (position + 12 nm + 24 nm k) 6 nm past a face of the EM's 24 nm grid (faces at
        # multiples of 24 nm) and so 6 nm from the label tiles' (faces at the box's start, a multiple of 12 nm).
        position = (np.floor((x0 + x1) / 48) * 24 + 18, np.floor((y0 + y1) / 48) * 24 + 18, origin[0] + 40 * (z + 0.5))
        show(view, ["raw", "psd", "vesicle_cloud"], position, nm)
        rgb = screenshot(view, browser)
        ys, xs = pixel_points(position, nm)
        em, _ = sample(mirror.layer("p14", EM), 2, position[2], ys, xs)

        def near_face(nm_values, origin_nm, size):  # pixel centres within 3 nm of a voxel face
            offset = (nm_values - origin_nm) / size
            return np.abs(offset - np.round(offset)) * size < 3.0
        # Pixels as large as the voxels: centres a quarter pixel (6 nm) from faces, off by 3 nm is an edge.
        edge = near_face(ys, 0.0, 24.0)[:, None] | near_face(xs, 0.0, 24.0)[None, :]
        # The labels' level 1 of the store's box at slice z, computed here from the mirror's 12 nm labels.
        want = np.zeros(em.shape, bool)
        rows = np.floor((ys - origin[1]) / 24.0).astype(int)
        cols = np.floor((xs - origin[2]) / 24.0).astype(int)
        inside_box = (rows >= 0)[:, None] & (cols >= 0)[None, :] & (rows < -(-label_src.shape[1] // 2))[:, None] \
            & (cols < -(-label_src.shape[2] // 2))[None, :]
        for label in ("psd", "vesicle_cloud"):
            start = np.asarray(label_src.start_zyx)
            level0 = mirror.layer("p14", CHANNEL[label]).expected(0, start + [z, 0, 0], start + [z + 1, *label_src.shape[1:]])[0]
            level1 = _mode_level_1(level0)
            values = level1[np.ix_(np.clip(rows, 0, level1.shape[0] - 1), np.clip(cols, 0, level1.shape[1] - 1))]
            want |= (values != 0) & inside_box
        edge |= near_face(ys, origin[1], 24.0)[:, None] | near_face(xs, origin[2], 24.0)[None, :]
        inside = ~edge & inside_box
        got = coloured(rgb)
        assert want[inside].sum() > 100 and (~want[inside]).sum() > 1000
        assert np.mean(got[inside] == want[inside]) > 0.99
        grey = inside & ~want
        assert np.mean(np.abs(rgb[..., 0][grey] - em[grey]) <= 1) > 0.99
        # Nothing of level 0 was made: no store shard of EM or labels, no 12 nm EM chunk requested.
        cache = cache_for(plan)
        assert cache.done_shards("raw") == set() and cache.done_shards("labels/psd") == set()
        new = {p: n - before.get(p, 0) for p, n in server.requests.items() if n > before.get(p, 0)
               and not p.endswith(("/info", "/provenance"))}
        key = "_".join(f"{r:g}" for r in mirror.layer("p14", EM).resolution_xyz[2])  # "24_24_40"
        em_requests = [p for p in new if f"/{EM}/" in p]
        assert em_requests and all(f"/{EM}/{key}/" in p for p in em_requests), em_requests
        # EM and labels: only source chunks whose z range holds slice z (one z-row, never the layer).
        label_requests = [p for p in new if f"/{CHANNEL['psd']}/" in p]
        zg = label_src.start_zyx[0] + z
        for p in label_requests + em_requests:
            lo, hi = (int(v) for v in p.rsplit("/", 1)[1].removesuffix(".gz").split("_")[2].split("-"))
            assert lo <= zg < hi, p
        assert label_requests
        # Tiles of every level of the slice share its source chunks: each was fetched once.
        assert all(n == 1 for p, n in new.items() if p in label_requests + em_requests), new
