"""Previews: an EM slice with its labels overlaid (instances in distinct colours) and a scale bar."""

from __future__ import annotations

import colorsys

import numpy as np


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


def _font():
    """(font, the micro sign it can draw): DejaVu Sans, which matplotlib ships and which has µ; PIL's
    default bitmap font has no µ (it drew a box), so without matplotlib the bar reads "um"."""
    from PIL import ImageFont
    try:
        import os
        import matplotlib
        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
        return ImageFont.truetype(path, 11), "\u00b5"
    except (ImportError, OSError):
        return ImageFont.load_default(), "u"


DEFAULT_MAX_SIZE = 2048
DEFAULT_MAX_FETCH = 8 * 10**9  # bytes an overview may fetch (uncompressed estimate) before it is refused


def overview_level(shape_zyx, max_size: int) -> int:
    """The finest level (x and y halved per level) whose slice fits `max_size` pixels in y and x."""
    level, (_, y, x) = 0, shape_zyx
    while max(-(-y // 2 ** level), -(-x // 2 ** level)) > max_size:
        level += 1
    return level


def _em_source_mip(source, level: int) -> int | None:
    """The EM layer's coarsest mip not coarser than an overview pixel at `level` (x and y 2**level
    times the labels' resolution; z the labels'), or None if it has none."""
    plan = source.plan
    label_res = plan.arrays[plan.label_name].layer.resolution_zyx
    pixel = label_res[2] * 2 ** level
    best, best_res = None, 0.0
    for mip, scale in enumerate(plan.layers["raw"].info_dict["scales"]):
        res = [float(r) for r in scale["resolution"]]  # x, y, z (an axis swap keeps x = y here)
        if res[2] == label_res[0] and max(res[:2]) <= pixel and max(res[:2]) > best_res:
            best, best_res = mip, max(res[:2])
    return best


def overview_plan(source, z: int, level: int) -> dict:
    """What an overview of slice `z` at `level` reads, and its estimated cost: the EM from the source's
    coarsest mip not coarser than a pixel (through the cache: a store of its own, only the shards of
    that slice; each pixel shows the EM voxel under its centre), and the
    labels from the source chunks of the one chunk row in z that holds the slice (never the
    128-slice layer of level 0). Returns {"em_mip", "em_shards", "label_chunks", "bytes"}."""
    from ..store.cache import SHARDS
    plan = source.plan
    label_src, label_layer = plan.arrays[plan.label_name], plan.layers[plan.label_name]
    em_mip = _em_source_mip(source, level)
    if em_mip is None:
        raise ValueError(f"the EM layer {plan.layers['raw'].url} has no mip at the labels' z resolution and at "
                         f"most {2 ** level}x their x/y resolution")
    zg = label_src.start_zyx[0] + z
    chunks = label_layer.info.chunks_in((zg, label_src.start_zyx[1], label_src.start_zyx[2]),
                                        (zg + 1, label_src.start_zyx[1] + label_src.shape[1],
                                         label_src.start_zyx[2] + label_src.shape[2]))
    label_bytes = sum(int(np.prod(np.subtract(*label_layer.info.chunk_box(g)[::-1]))) for g in chunks) \
        * np.dtype(label_src.dtype).itemsize
    em_res = float(max(plan.layers["raw"].info_dict["scales"][em_mip]["resolution"][:2]))
    y, x = (-(-int(n * r // em_res) // 1) for n, r in zip(label_src.shape[1:], label_src.layer.resolution_zyx[1:]))
    em_shards = -(-y // SHARDS[1]) * -(-x // SHARDS[2])
    em_bytes = em_shards * min(SHARDS[0], label_src.shape[0]) * SHARDS[1] * SHARDS[2]
    return {"em_mip": em_mip, "em_shards": em_shards, "label_chunks": chunks, "bytes": label_bytes + em_bytes}


def _overview(source, z: int, level: int, max_fetch: int):
    """(EM plane, label plane) of slice `z` at `level`, on the grid of the labels' level `level`."""
    from ..store.lazy import ReadThroughArray
    from .overview import em_mip_source, label_slice
    plan = source.plan
    label_src = plan.arrays[plan.label_name]
    cost = overview_plan(source, z, level)
    if cost["bytes"] > max_fetch:
        raise ValueError(
            f"an overview of slice z={z} at level {level} would fetch about {cost['bytes'] / 1e9:.1f} GB "
            f"(uncompressed: {len(cost['label_chunks'])} label chunks and {cost['em_shards']} EM shards at mip "
            f"{cost['em_mip']}), more than max_fetch={max_fetch} bytes; choose a smaller bbox_nm, a smaller "
            "--max-size (a coarser level), or raise --max-fetch")
    # EM: the source's own mip, read through the cache (a store of its own; only this slice's shards).
    em_source = em_mip_source(source, cost["em_mip"])
    em_src = em_source.plan.arrays["raw"]
    em_res = np.asarray(em_src.layer.resolution_zyx, float)
    em_origin = np.asarray(em_src.origin_nm_zyx, float)
    label_res = np.asarray(label_src.layer.resolution_zyx, float)
    origin = np.asarray(label_src.origin_nm_zyx, float)
    z_nm = origin[0] + (z + 0.5) * label_res[0]
    em_z = int(np.clip(np.floor((z_nm - em_origin[0]) / em_res[0]), 0, em_src.shape[0] - 1))
    em_plane = ReadThroughArray(em_source.plan, "raw", source.connections, source.cache_limit)[em_z]
    # Each overview pixel shows the EM voxel under its centre (placed to the nanometre).
    y, x = (-(-n // 2 ** level) for n in label_src.shape[1:])
    step = label_res[1:] * 2 ** level
    rows = np.clip(np.floor((origin[1] + (np.arange(y) + 0.5) * step[0] - em_origin[1]) / em_res[1]).astype(int),
                   0, em_plane.shape[0] - 1)
    cols = np.clip(np.floor((origin[2] + (np.arange(x) + 0.5) * step[1] - em_origin[2]) / em_res[2]).astype(int),
                   0, em_plane.shape[1] - 1)
    raw = em_plane[np.ix_(rows, cols)]
    # Labels: the source chunks of the slice's chunk row, reduced by the pyramid's mode.
    labels = label_slice(plan, plan.label_name, z, level)
    return raw, labels


def render(source, z: int, output, max_size: int = DEFAULT_MAX_SIZE, max_fetch: int = DEFAULT_MAX_FETCH) -> int:
    """Write a PNG of slice `z` of `source`'s store: EM in grey, labels overlaid, a scale bar; returns
    the level drawn (x and y halved per level).

    A slice wider than `max_size` pixels is an overview at the level that fits: the EM from the
    source's own coarser mip (through the cache, only that slice's shards of it), the labels from
    the source chunks of the slice's chunk row in z (reduced by the pyramid's mode); never the
    128-slice layer of level 0 under it. An overview estimated to fetch more than `max_fetch`
    bytes (uncompressed) is refused with the estimate and cheaper choices."""
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
    draw.text((10, 6), title, fill=(255, 255, 0), font=font)
    image.save(output, format="PNG")
    return level
