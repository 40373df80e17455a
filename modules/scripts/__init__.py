"""Scripts on typed arguments and hook points (base.py), the library of them (library.py), and
the built-in ones, in A1111's menu order."""

from modules.scripts.outpainting import PoorMansOutpainting
from modules.scripts.prompt_matrix import PromptMatrix
from modules.scripts.prompts_from_file import PromptsFromFile
from modules.scripts.sd_upscale import SdUpscale
from modules.scripts.xyz_plot import XYZPlot

BUILTIN = (PoorMansOutpainting, PromptMatrix, PromptsFromFile, SdUpscale, XYZPlot)
