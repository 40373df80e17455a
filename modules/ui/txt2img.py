"""The txt2img tab: widgets -> GenerationRequest -> the chosen script or generation -> gallery and infotext."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import gradio as gr

from modules.app.errors import RequestError
from modules.generation.request import GenerationRequest
from modules.images.infotext import parse_infotext
from modules.postprocess import upscalers
from modules.sampling.registry import SAMPLERS
from modules.sampling.schedules import SCHEDULES
from modules.scripts.library import ScriptLibrary
from modules.service.jobs import Job
from modules.ui import prompt_tools
from modules.ui.common import GalleryTools, OutputPanel, PromptArea, SeedRow, form_fields, refiner_accordion, wire_generation
from modules.ui.scripts import ScriptControls, extension_accordions

_TAG = re.compile(r"<[^>]*>")


def shown_variation_seed(infotext_html: str):
    """The variation seed in the parameters an output panel shows (its first picture's), or no
    change when that picture was made without one."""
    params = parse_infotext(html.unescape(_TAG.sub("", infotext_html or "")))[2]
    value = params.get("Variation seed", "").strip()
    return int(value) if value.isdigit() else gr.update()


@dataclass
class VariationSeeds:
    """A1111's "Extra" seed options, shown by the checkbox under the seed row: the variation seed
    (with dice and recycle buttons), its strength, and the size to resize the seed's noise from.
    Unticked, they are all off (the request's seed_enable_extras)."""

    extra: gr.Checkbox
    subseed: gr.Number
    random_subseed: gr.Button
    reuse_subseed: gr.Button
    strength: gr.Slider
    resize_w: gr.Slider
    resize_h: gr.Slider

    @classmethod
    def build(cls, prefix: str) -> "VariationSeeds":
        extra = gr.Checkbox(label="Extra", value=False, elem_id=f"{prefix}_subseed_show")
        with gr.Column(visible=False, elem_id=f"{prefix}_seed_extras") as extras:
            with gr.Row():
                subseed = gr.Number(value=-1, label="Variation seed", precision=0, elem_id=f"{prefix}_subseed")
                random_subseed = gr.Button("🎲", size="sm", min_width=40, elem_id=f"{prefix}_random_subseed")
                reuse_subseed = gr.Button("♻", size="sm", min_width=40, elem_id=f"{prefix}_reuse_subseed")
                strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength", elem_id=f"{prefix}_subseed_strength")
            with gr.Row():
                resize_w = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from width",
                                     elem_id=f"{prefix}_seed_resize_from_w")
                resize_h = gr.Slider(0, 2048, value=0, step=8, label="Resize seed from height",
                                     elem_id=f"{prefix}_seed_resize_from_h")
        extra.change(lambda shown: gr.update(visible=shown), inputs=extra, outputs=extras, queue=False)
        return cls(extra, subseed, random_subseed, reuse_subseed, strength, resize_w, resize_h)

    @property
    def fields(self) -> dict:
        """Request field -> widget."""
        return {"seed_enable_extras": self.extra, "subseed": self.subseed, "subseed_strength": self.strength,
                "seed_resize_from_w": self.resize_w, "seed_resize_from_h": self.resize_h}

    def wire(self, out: OutputPanel) -> None:
        """Dice: a random variation seed; recycle: the one of the picture shown."""
        self.random_subseed.click(lambda: -1, outputs=self.subseed, queue=False)
        self.reuse_subseed.click(shown_variation_seed, inputs=out.infotext, outputs=self.subseed, queue=False)


def final_size(width, height, scale, resize_x, resize_y) -> str:
    """What the hires fix will make, shown under its sliders as A1111 does."""
    request = GenerationRequest(width=int(width), height=int(height), hr_scale=float(scale),
                                hr_resize_x=int(resize_x), hr_resize_y=int(resize_y))
    return "from {}x{} to {}x{}".format(request.width, request.height, *request.hr_target_size())


def build(ctx, checkpoint: gr.Dropdown, scripts: ScriptLibrary, accordions: list) -> tuple[dict, GalleryTools]:
    """The tab; `scripts` fill its Script menu, `accordions` are the extensions' for it. Returns
    its widgets by request field and its gallery's buttons, whose Send to webui.py wires."""
    defaults = GenerationRequest()
    area = PromptArea.build("txt2img", lambda prompt, negative: prompt_tools.build_styles(ctx, prompt, negative, "txt2img"))
    prompt, negative, styles = area.prompt, area.negative, area.extra
    with gr.Row():
        with gr.Column():
            with gr.Row():
                sampler = gr.Dropdown([s.name for s in SAMPLERS], value=defaults.sampler_name, label="Sampling method", elem_id="txt2img_sampler")
                scheduler = gr.Dropdown([s.label for s in SCHEDULES], value=defaults.scheduler, label="Schedule type", elem_id="txt2img_scheduler")
            steps = gr.Slider(1, 150, value=defaults.steps, step=1, label="Sampling steps", elem_id="txt2img_steps")
            with gr.Row():
                width = gr.Slider(64, 2048, value=defaults.width, step=8, label="Width", elem_id="txt2img_width")
                height = gr.Slider(64, 2048, value=defaults.height, step=8, label="Height", elem_id="txt2img_height")
            with gr.Row():
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count")
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
            cfg_scale = gr.Slider(1, 30, value=defaults.cfg_scale, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            seed_row = SeedRow.build("txt2img")
            seed = seed_row.seed
            variation = VariationSeeds.build("txt2img")
            with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
                enable_hr = gr.Checkbox(label="Enable", value=defaults.enable_hr, elem_id="txt2img_enable_hr")
                with gr.Row():
                    hr_upscaler = gr.Dropdown([m.name for m in upscalers.LATENT_UPSCALE_MODES] + ctx.upscalers.names(),
                                              value=defaults.hr_upscaler, label="Upscaler", elem_id="txt2img_hr_upscaler")
                    hr_steps = gr.Slider(0, 150, value=defaults.hr_second_pass_steps, step=1, label="Hires steps (0: as sampling)",
                                         elem_id="txt2img_hires_steps")
                    denoising = gr.Slider(0, 1, value=defaults.denoising_strength, step=0.01, label="Denoising strength",
                                          elem_id="txt2img_denoising_strength")
                with gr.Row():
                    hr_scale = gr.Slider(1, 4, value=defaults.hr_scale, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                    hr_resize_x = gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x")
                    hr_resize_y = gr.Slider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y")
                hr_final = gr.Markdown(final_size(defaults.width, defaults.height, defaults.hr_scale, 0, 0),
                                       elem_id="txt2img_hr_final")
            refiner, refiner_switch_at = refiner_accordion(ctx, "txt2img", defaults.refiner_switch_at)
            with gr.Accordion("Advanced", open=False):
                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="txt2img_clip_skip")
                noise_source = gr.Radio(["CPU", "GPU"], value=ctx.settings.noise_source, label="Random number source", elem_id="txt2img_noise_source")
            prompt_tools.build_networks(ctx, "txt2img")
            extension_accordions(accordions)
            script_controls = ScriptControls.build(scripts, "txt2img")
        with gr.Column():
            out = OutputPanel.build("txt2img")

    # The widget of each request field: what Generate reads, and where pasted parameters land
    # (modules/ui/paste.py).
    fields = {"prompt": prompt, "negative_prompt": negative, "sampler_name": sampler, "scheduler": scheduler,
              "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "width": width, "height": height,
              "batch_count": batch_count, "batch_size": batch_size, "clip_skip": clip_skip,
              "noise_source": noise_source, "checkpoint": checkpoint, "styles": styles, "enable_hr": enable_hr,
              "hr_upscaler": hr_upscaler, "hr_second_pass_steps": hr_steps, "denoising_strength": denoising,
              "hr_scale": hr_scale, "hr_resize_x": hr_resize_x, "hr_resize_y": hr_resize_y,
              "refiner_checkpoint": refiner, "refiner_switch_at": refiner_switch_at, **variation.fields}

    def run(*values, owner: str = "local"):
        try:
            request = GenerationRequest(**form_fields(GenerationRequest, dict(zip(fields, values)))).validate()
            script_values = dict(zip(script_controls.inputs, values[len(fields):]))
            work = scripts.job(ctx, "txt2img", **script_controls.job_arguments(script_values))
        except (RequestError, TypeError, ValueError) as e:
            raise gr.Error(str(e))
        yield from out.stream(ctx, Job(description="txt2img", owner=owner), work, request)

    hr_size_inputs = [width, height, hr_scale, hr_resize_x, hr_resize_y]

    for component in hr_size_inputs:
        component.change(final_size, inputs=hr_size_inputs, outputs=hr_final, queue=False)

    wire_generation(ctx, run, list(fields.values()) + script_controls.inputs, out, area, seed_row)
    area.wire_token_counters(ctx, steps, checkpoint, styles)
    variation.wire(out)
    return fields, out.tools
