"""Seeing the data: the PNG preview and the neuroglancer view of a cached store."""
