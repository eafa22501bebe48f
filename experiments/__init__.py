"""Experiments built on the app: ``ppflower reproduce`` (Table I), ``ppflower demo`` and ``ppflower curve``."""
