"""The ``ppflower`` command (ppflower.py): the outermost layer, imported by nothing."""
