"""Scripts on typed arguments and hook points (base.py), the library of them (library.py), and
the built-in ones, in A1111's menu order."""

from modules.scripts.outpainting import PoorMansOutpainting

BUILTIN = (PoorMansOutpainting,)
