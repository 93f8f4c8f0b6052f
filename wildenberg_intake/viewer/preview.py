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


def render(source, z: int, output) -> None:
    """Write a PNG of slice `z` of `source`'s store (materialised first): EM in grey, labels overlaid."""
    from PIL import Image, ImageDraw
    ds = source.to_dask()
    depth = ds.sizes["z"]
    if isinstance(z, bool) or not isinstance(z, int) or not 0 <= z < depth:
        raise ValueError(f"z={z!r} is not valid; allowed: a slice index from 0 to {depth - 1}")
    raw = np.asarray(ds["raw"][z])
    labels = np.asarray(ds["labels"][z])
    if raw.shape != labels.shape:
        raise ValueError(f"raw {raw.shape} and labels {labels.shape} differ in shape (em_mip != seg_mip); "
                         "preview needs em_mip at the labels' resolution")
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
    res_x = float(ds["labels"].attrs["resolution_nm_zyx"][2])
    um = _scale_bar_um(raw.shape[1] * res_x)
    length = int(round(um * 1000 / res_x))
    h, w = raw.shape
    x0, y0 = 10, h - 14
    draw.rectangle([x0, y0, x0 + length, y0 + 5], fill=(255, 255, 255))
    font, micro = _font()
    draw.text((x0, y0 - 14), f"{um:g} {micro}m", fill=(255, 255, 255), font=font)
    draw.text((10, 6), f"{source.request.experiment} {source.request.label} z={z}", fill=(255, 255, 0), font=font)
    image.save(output, format="PNG")
