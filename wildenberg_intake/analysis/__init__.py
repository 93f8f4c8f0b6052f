"""Analysis of cached stores: blockwise connected components and the per-synapse table."""
