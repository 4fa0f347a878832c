"""Invertible colour codecs: painted RGB <-> depth (metres), unit normals, class ids.

    depth.py          Barron's squash + the 7-edge walk of the RGB cube (named presets)
    normals.py        (n + 1) / 2 per axis, OpenGL or OpenCV frame
    segmentation.py   nearest legend colour with a distance threshold; permuted-legend ensembles
    base.py           what the codecs share: Decoded, the per-preset colour tables
    block_search.py   the legend colours that can be nearest in a block of colours (table filling)
    kernels.py        when the compiled kernels (_kernels.c, built at install) run; numpy is the fallback
"""

from vb_batch.codecs import depth, normals, segmentation
from vb_batch.codecs.base import Decoded

__all__ = ["Decoded", "depth", "normals", "segmentation"]
