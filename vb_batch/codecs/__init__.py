"""Invertible colour codecs: painted RGB <-> depth (metres), unit normals, class ids."""

from vb_batch.codecs.base import Decoded
from vb_batch.codecs import depth, normals, segmentation

__all__ = ["Decoded", "depth", "normals", "segmentation"]
