"""``ppflower reproduce``: the paper's Table I and Figs. 5–7, measured by the product itself.

:mod:`.presets` (what a run measures), :mod:`.pipeline` (the resumable stages that measure it) and :mod:`.report`
(the table, figures and provenance written from the stages' outputs).
"""

from experiments.reproduce.pipeline import Reproduction, StageRunner, StopAfter, reproduce, run_child
from experiments.reproduce.presets import PAPER_ACCURACY, PRESETS, ROW_NAMES, Preset
from experiments.reproduce.report import REPO, git_commit, machine, portable

__all__ = ["PAPER_ACCURACY", "PRESETS", "REPO", "ROW_NAMES", "Preset", "Reproduction", "StageRunner", "StopAfter",
           "git_commit", "machine", "portable", "reproduce", "run_child"]
