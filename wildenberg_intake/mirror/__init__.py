"""The test mirror: synthetic volumes in BossDB's layout, and the static HTTP server that serves them."""

from .build import EXPERIMENTS, LABEL_CHANNELS, Mirror, MirrorLayer, build_mirror, copy_box
from .server import Faults, MirrorServer, gzip_bomb

__all__ = ["EXPERIMENTS", "LABEL_CHANNELS", "Mirror", "MirrorLayer", "build_mirror", "copy_box",
           "Faults", "MirrorServer", "gzip_bomb"]
