"""Baselines from the literature, each a keyed (or learned) transform of plain images.

* :mod:`pp_flower.baselines.tanaka` — learnable image encryption (Tanaka, ICCE-TW 2018) and its
  adaptation network;
* :mod:`pp_flower.baselines.pixel` — pixel-based image encryption (Sirichotedumrong et al., ICIP 2019),
  single-key and per-image-key variants;
* :mod:`pp_flower.baselines.gan` — GAN-based transformation (Sirichotedumrong & Kiya, EUSIPCO 2020), a learned,
  keyless transform trained with :func:`~pp_flower.baselines.gan.train_gan_transform`.

Keys are explicit integers; every transform is a pure function of (images, key).
"""

from pp_flower.baselines.pixel import PixelEncryption
from pp_flower.baselines.tanaka import TanakaEncryption

BASELINES = {"tanaka": TanakaEncryption, "pixel": PixelEncryption,
             "pixel-per-image": lambda key: PixelEncryption(key, per_image=True)}

__all__ = ["BASELINES", "PixelEncryption", "TanakaEncryption"]
