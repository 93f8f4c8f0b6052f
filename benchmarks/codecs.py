"""Blosc codecs on the data the cache holds: size kept, encode and decode MB/s on one core.

    .venv/bin/python benchmarks/codecs.py [--size 512 512 64]

Writes a small synthetic mirror (the arrays the test mirror is written from), cuts them into the
cache's inner chunks (64, 128, 128), and times each candidate (best of 4 passes) for raw EM
(uint8), binary labels (uint8) and instance labels (uint32). The codecs the cache uses were chosen
from these figures: `raw_codec` zstd1 by default for raw, zstd 3 without shuffle for labels.
"""

import argparse
import tempfile
import time

import numpy as np
from numcodecs import Blosc

from wildenberg_intake.store.format import CHUNKS, CODECS, LABEL_CODEC, shuffle_of
from wildenberg_intake.mirror import build_mirror

SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def chunks_of(volume):
    c = CHUNKS
    return [np.ascontiguousarray(volume[z:z + c[0], y:y + c[1], x:x + c[2]])
            for z in range(0, volume.shape[0] - c[0] + 1, c[0])
            for y in range(0, volume.shape[1] - c[1] + 1, c[1])
            for x in range(0, volume.shape[2] - c[2] + 1, c[2])]


def measure(blocks, codec, passes=4):
    nbytes = sum(b.nbytes for b in blocks)
    encode = decode = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        encoded = [codec.encode(b) for b in blocks]
        encode = min(encode, time.perf_counter() - t)
        t = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        decode = min(decode, time.perf_counter() - t)
    return sum(len(e) for e in encoded) / nbytes, nbytes / encode / 1e6, nbytes / decode / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 64), help="label voxels x y z")
    args = parser.parse_args()
    Blosc.use_threads = False  # one core: the engine runs one codec call per thread
    with tempfile.TemporaryDirectory() as tmp:
        mirror = build_mirror(tmp, shape_xyz=args.size, experiments=("p14",))
        volumes = {
            "raw EM (uint8)": mirror.layer("p14", "em_aligned").data[1],
            "binary labels: psd (uint8)": mirror.layer("p14", "psd_autoseg").data[0],
            "instance labels: saturated (uint32)": mirror.layer("p14", "saturated_autoseg").data[0],
        }
    print(f"chunks {CHUNKS}; cache uses raw_codec (default zstd1) with {shuffle_of(False)}, "
          f"labels {LABEL_CODEC} with {shuffle_of(True)}\n")
    for title, volume in volumes.items():
        blocks = chunks_of(volume)
        print(f"{title}: {len(blocks)} chunks, {sum(b.nbytes for b in blocks) / 1e6:.0f} MB, "
              f"{100 * np.mean(volume > 0):.0f}% non-zero")
        print(f"  {'codec':8s} {'shuffle':10s} {'size kept':>9s} {'encode MB/s':>11s} {'decode MB/s':>11s}")
        shuffles = ["shuffle"] if volume.dtype.itemsize == 1 else list(SHUFFLES)
        for name, (cname, level) in CODECS.items():
            for shuffle in shuffles:
                kept, enc, dec = measure(blocks, Blosc(cname, level, SHUFFLES[shuffle]))
                print(f"  {name:8s} {shuffle:10s} {100 * kept:8.1f}% {enc:11.0f} {dec:11.0f}")
        print()


if __name__ == "__main__":
    main()
