"""Previews: an EM slice with its labels overlaid (instances in distinct colours) and a scale bar."""

from __future__ import annotations

import colorsys

import numpy as np

from ..catalog import checked_keywords


def _colours(ids: np.ndarray) -> np.ndarray:
    """A distinct, stable RGB colour per instance id (golden-ratio hues)."""
    hue = (ids.astype(np.float64) * 0.6180339887) % 1.0
    rgb = np.array([colorsys.hsv_to_rgb(h, 0.9, 1.0) for h in hue]) if ids.size else np.zeros((0, 3))
    return (rgb * 255).astype(np.uint8)


def _scale_bar_um(width_nm: float) -> float:
    """A round length (1, 2 or 5 x 10^k micrometres) near a fifth of the image width."""
    target = width_nm / 5000.0
    k = np.floor(np.log10(target))
    for m in (5, 2, 1):
        if m * 10**k <= target:
            return float(m * 10**k)
    return float(10**k)


def _font(size: int = 11):
    """(font, the micro sign it can draw): DejaVu Sans, which matplotlib ships and which has µ; PIL's
    default bitmap font has no µ (it drew a box), so without matplotlib the bar reads "um"."""
    from PIL import ImageFont
    try:
        import os
        import matplotlib
        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
        return ImageFont.truetype(path, size), "\u00b5"
    except (ImportError, OSError):
        return ImageFont.load_default(), "u"


def _fit(draw, text: str, width: int):
    """(font, lines) that draw `text` within `width` pixels: the default size if it fits, else a
    smaller one (down to 8 px), else wrapped at spaces (a narrow preview keeps its whole title)."""
    for size in (11, 10, 9, 8):
        font, _ = _font(size)
        if draw.textlength(text, font=font) <= width:
            return font, [text]
    lines = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return font, lines


TITLE_MARGIN, TITLE_COLOUR = 6, (255, 255, 0)
DEFAULT_MAX_SIZE = 2048
DEFAULT_MAX_FETCH = 8 * 10**9  # bytes an overview may fetch (uncompressed estimate) before it is refused


def overview_plan(source, z: int, level: int) -> dict:
    """What an overview of slice `z` at `level` reads (`overview.py`): the source chunks of the
    slice's z-row, of the EM at the coarsest mip not coarser than a pixel and of the labels (never
    the 128-slice layer of level 0). Returns {"em_mip", "em_chunks", "label_chunks", "bytes"}
    (bytes uncompressed)."""
    from .overview import em_chunks
    plan = source.plan
    label_src, label_layer = plan.arrays[plan.label_name], plan.layers[plan.label_name]
    em_layer, em_grid, *_ = em_chunks(plan, z, level)
    zg = label_src.start_zyx[0] + z
    label_grid = label_layer.info.chunks_in((zg, label_src.start_zyx[1], label_src.start_zyx[2]),
                                            (zg + 1, label_src.start_zyx[1] + label_src.shape[1],
                                             label_src.start_zyx[2] + label_src.shape[2]))

    def size(layer, grid):
        return sum(int(np.prod(np.subtract(*layer.info.chunk_box(g)[::-1]))) for g in grid) \
            * np.dtype(layer.info.dtype).itemsize
    return {"em_mip": em_layer.info.mip, "em_chunks": em_grid, "label_chunks": label_grid,
            "bytes": size(em_layer, em_grid) + size(label_layer, label_grid)}


def _overview(source, z: int, level: int, max_fetch: int):
    """(EM plane, label plane) of slice `z` at `level`, on the grid of the labels' level `level`."""
    from .overview import em_slice, label_slice
    plan = source.plan
    cost = overview_plan(source, z, level)
    if cost["bytes"] > max_fetch:
        raise ValueError(
            f"an overview of slice z={z} at level {level} would fetch about {cost['bytes'] / 1e9:.1f} GB "
            f"(uncompressed: {len(cost['label_chunks'])} label chunks and {len(cost['em_chunks'])} EM chunks at mip "
            f"{cost['em_mip']}), more than max_fetch={max_fetch} bytes; choose a smaller bbox_nm, a smaller "
            "--max-size (a coarser level), or raise --max-fetch")
    return em_slice(plan, z, level), label_slice(plan, plan.label_name, z, level)


@checked_keywords
def render(source, z: int, output, max_size: int = DEFAULT_MAX_SIZE, max_fetch: int = DEFAULT_MAX_FETCH) -> int:
    """Write a PNG of slice `z` of `source`'s store: EM in grey, labels overlaid, a scale bar; returns
    the level drawn (x and y halved per level).

    A slice wider than `max_size` pixels is an overview at the level that fits (`overview.py`):
    the EM from the source's own coarser mip, the labels reduced by the pyramid's mode, both from
    the source chunks of the slice's z-row; never the 128-slice layer of level 0 under it. An
    overview estimated to fetch more than `max_fetch` bytes (uncompressed) is refused with the
    estimate and cheaper choices."""
    from PIL import Image, ImageDraw
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 16:
        raise ValueError(f"max_size={max_size!r} is not valid; allowed: an integer of at least 16 pixels")
    if isinstance(max_fetch, bool) or not isinstance(max_fetch, int) or max_fetch < 1:
        raise ValueError(f"max_fetch={max_fetch!r} is not valid; allowed: a positive number of bytes")
    plan = source.plan
    raw_src, label_src = plan.arrays["raw"], plan.arrays[plan.label_name]
    depth = label_src.shape[0]
    if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z < depth:
        raise ValueError(f"z={z!r} is not valid; allowed: a slice index from 0 to {depth - 1}")
    if raw_src.shape != label_src.shape:
        raise ValueError(f"raw {raw_src.shape} and labels {label_src.shape} differ in shape (em_mip != seg_mip); "
                         "preview needs em_mip at the labels' resolution")
    from .overview import overview_level
    level = overview_level(label_src.shape, max_size)
    if level:
        raw, labels = _overview(source, z, level, max_fetch)
    else:
        from ..store.lazy import ReadThroughArray
        arrays = [ReadThroughArray(plan, name, source.connections, source.cache_limit,
                                   check_hashes=source.check_hashes) for name in ("raw", plan.label_name)]
        raw, labels = arrays[0][z], arrays[1][z]
    rgb = np.repeat(raw[..., None], 3, axis=2).astype(np.float32)
    mask = labels > 0
    if mask.any():
        if source.request.channel().kind == "instance":
            ids, inverse = np.unique(labels[mask], return_inverse=True)
            colour = _colours(ids)[inverse].astype(np.float32)
        else:
            colour = np.array([255, 40, 40], dtype=np.float32)
        rgb[mask] = 0.45 * rgb[mask] + 0.55 * colour
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    res_x = float(label_src.layer.resolution_zyx[2]) * 2 ** level
    um = _scale_bar_um(raw.shape[1] * res_x)
    length = int(round(um * 1000 / res_x))
    h, w = raw.shape
    x0, y0 = 10, h - 14
    draw.rectangle([x0, y0, x0 + length, y0 + 5], fill=(255, 255, 255))
    font, micro = _font()
    draw.text((x0, y0 - 14), f"{um:g} {micro}m", fill=(255, 255, 255), font=font)
    title = f"{source.request.experiment} {source.request.label} z={z}" + (
        f" (overview {res_x:g} nm: EM mip, labels' mode)" if level else "")
    title_font, lines = _fit(draw, title, w - 2 * TITLE_MARGIN)
    line_height = sum(title_font.getmetrics()) + 1
    for i, line in enumerate(lines):
        draw.text((TITLE_MARGIN, 6 + i * line_height), line, fill=TITLE_COLOUR, font=title_font)
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("Title", title)  # the whole title, however it was fitted
    image.save(output, format="PNG", pnginfo=info)
    return level
