"""The zarr v3 cache and its engine: store layout, plans, materialisation, pyramid, reading and lazy access."""
