"""Source access: BossDB's precomputed layers over HTTP (transfer, layer info and chunk decoding)."""
