"""Baselines from the literature, each a keyed (or learned) transform of plain images.

* :mod:`pp_flower.baselines.tanaka` — learnable image encryption (Tanaka, ICCE-TW 2018) and its
  adaptation network;
* :mod:`pp_flower.baselines.pixel` — pixel-based image encryption (Sirichotedumrong et al., ICIP 2019),
  single-key and per-image-key variants.

Keys are explicit integers; every transform is a pure function of (images, key).
"""

from pp_flower.baselines.pixel import PixelEncryption
from pp_flower.baselines.tanaka import TanakaEncryption

BASELINES = {"tanaka": TanakaEncryption, "pixel": PixelEncryption}

__all__ = ["BASELINES", "PixelEncryption", "TanakaEncryption"]
