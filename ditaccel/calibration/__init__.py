"""``ditaccel calibrate``: per-(layer, head, step range) tables searched against a quality target.

``calibrate(pipe, prompts, target="psnr=32", budget_minutes=10, candidates=...)`` profiles the
pipeline dense (:mod:`.profile`), picks per cell the cheapest candidate under an error budget and
tunes that budget with full runs through the evaluation engine (:mod:`.search`), and writes a
preset file (:mod:`.preset`) that ``ditaccel.accelerate(pipe, preset=path)`` loads.
"""

from .candidates import CANDIDATE_SETS, DEFAULT_CANDIDATES, EXTENDED_CANDIDATES, Candidate, make_candidates
from .preset import preset_config, read_preset, shipped_presets, write_preset
from .run import calibrate, parse_target

__all__ = ["calibrate", "parse_target", "CANDIDATE_SETS", "DEFAULT_CANDIDATES", "EXTENDED_CANDIDATES", "Candidate", "make_candidates", "preset_config",
           "read_preset", "shipped_presets", "write_preset"]
