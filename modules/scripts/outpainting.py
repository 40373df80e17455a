"""A1111's "Poor man's outpainting": the picture grown by some pixels on the chosen sides, the
new border drawn by img2img under a mask (the request's outpaint fields do the work)."""

from __future__ import annotations

from modules.generation import options
from modules.scripts.base import Arg, Script

PIXELS, BLUR, FILL, DIRECTIONS = options.OUTPAINT_DEFAULTS


class PoorMansOutpainting(Script):
    title = options.OUTPAINT_SCRIPT
    tabs = ("img2img",)
    args = (
        Arg("Pixels to expand", "slider", PIXELS, 8, 256, 8),
        Arg("Mask blur", "slider", BLUR, 0, 64, 1),
        Arg("Masked content", "radio", options.MASKED_CONTENT[FILL], choices=tuple(options.MASKED_CONTENT)),
        Arg("Outpainting direction", "checkboxes", DIRECTIONS, choices=options.OUTPAINT_DIRECTIONS),
    )

    def run(self, ctx, request, values, job, generate, save):
        fields = options.outpaint_fields(values["Pixels to expand"], values["Mask blur"],
                                         options.MASKED_CONTENT.index(values["Masked content"]),
                                         values["Outpainting direction"])
        return generate(ctx, request.replace(**fields), job=job, save=save)
