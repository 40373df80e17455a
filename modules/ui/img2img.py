"""The img2img tab: a picture (to redraw, to inpaint with a painted or uploaded mask, or a folder
of them) and the settings -> Img2ImgRequest -> the chosen script or generation -> gallery and infotext."""

from __future__ import annotations

import gradio as gr
import numpy as np
from PIL import Image

from modules.app.errors import RequestError
from modules.generation import img2img_batch, options
from modules.generation.request import Img2ImgRequest
from modules.sampling.registry import SAMPLERS
from modules.sampling.schedules import SCHEDULES
from modules.scripts.library import ScriptLibrary
from modules.service.jobs import Job
from modules.ui.common import GalleryTools, OutputPanel, PromptArea, SeedRow, form_fields, refiner_accordion, wire_generation
from modules.ui.paste import PasteTarget
from modules.ui.scripts import ScriptControls, extension_accordions
from modules.ui.txt2img import VariationSeeds

# The source tabs, in order: the index is what the tab's select event stores.
SOURCES = ("img2img", "Inpaint", "Inpaint upload", "Batch")
INPAINTING_SOURCES = (1, 2, 3)
SIDE_RANGE = (64, 2048)


def mask_from_layers(layers) -> Image.Image | None:
    """The painted mask of an ImageEditor value: the opacity of all paint layers together
    (whatever the brush colour); None when nothing was painted."""
    alphas = [np.asarray(layer.convert("RGBA"))[..., 3] for layer in layers or [] if layer is not None]
    if not alphas or not any(a.any() for a in alphas):
        return None
    shape = alphas[0].shape
    if any(a.shape != shape for a in alphas):
        raise RequestError("the paint layers have different sizes; clear the canvas and paint again")
    return Image.fromarray(np.maximum.reduce(alphas), "L")


def size_of(image: Image.Image | None) -> tuple:
    """The picture's size as the width and height settings: a multiple of 8 within the sliders."""
    if image is None:
        return gr.update(), gr.update()
    low, high = SIDE_RANGE
    return tuple(min(high, max(low, round(side / 8) * 8)) for side in image.size)


def build(ctx, checkpoint: gr.Dropdown, scripts: ScriptLibrary,
          accordions: list) -> tuple[PasteTarget, PasteTarget, GalleryTools]:
    """The tab, with `scripts` in its Script menu and the extensions' `accordions`; returns where
    pasted parameters and pictures land (img2img, and inpaint) and its gallery's buttons, whose
    Send to webui.py wires."""
    defaults = Img2ImgRequest()
    source = gr.State(0)
    area = PromptArea.build("img2img")
    prompt, negative = area.prompt, area.negative
    with gr.Row():
        with gr.Column():
            with gr.Tabs(elem_id="img2img_sources") as sources:
                with gr.Tab(SOURCES[0], id="img2img_tab_img2img") as tab_img2img:
                    image = gr.Image(label="Image for img2img", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                     elem_id="img2img_image", height=420)
                with gr.Tab(SOURCES[1], id="img2img_tab_inpaint") as tab_inpaint:
                    editor = gr.ImageEditor(
                        label="Image for inpainting: paint over what to regenerate", type="pil", image_mode="RGBA",
                        sources=["upload", "clipboard"], brush=gr.Brush(colors=["#ffffff", "#000000"], default_size=16),
                        layers=False, transforms=(), format="png", elem_id="img2img_inpaint_editor", height=420,
                    )
                with gr.Tab(SOURCES[2], id="img2img_tab_inpaint_upload") as tab_upload:
                    upload_image = gr.Image(label="Image", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                            elem_id="img2img_inpaint_upload_image")
                    upload_mask = gr.Image(label="Mask (white: regenerate)", type="pil", image_mode=None, sources=["upload", "clipboard"],
                                           elem_id="img2img_inpaint_upload_mask")
                with gr.Tab(SOURCES[3], id="img2img_tab_batch") as tab_batch:
                    gr.Markdown("Process every picture in a folder on the server; results take the pictures' names.")
                    input_dir = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                    output_dir = gr.Textbox(label="Output directory (empty: outputs/img2img-images)", elem_id="img2img_batch_output_dir")
                    mask_dir = gr.Textbox(label="Inpaint batch mask directory (optional: masks named like the pictures)",
                                          elem_id="img2img_batch_inpaint_mask_dir")
            resize_mode = gr.Radio([m.name for m in options.RESIZE_MODES], value=options.RESIZE_MODES[defaults.resize_mode].name,
                                   type="index", label="Resize mode", elem_id="img2img_resize_mode")
            with gr.Group(visible=False) as inpaint_options:
                mask_blur = gr.Slider(0, 64, value=defaults.mask_blur, step=1, label="Mask blur", elem_id="img2img_mask_blur")
                mask_mode = gr.Radio(list(options.MASK_MODES), value=options.MASK_MODES[0], type="index", label="Mask mode",
                                     elem_id="img2img_mask_mode")
                masked_content = gr.Radio(list(options.MASKED_CONTENT), value=options.MASKED_CONTENT[defaults.inpainting_fill],
                                          type="index", label="Masked content", elem_id="img2img_inpainting_fill")
                with gr.Row():
                    inpaint_area = gr.Radio(list(options.INPAINT_AREAS), value=options.INPAINT_AREAS[0], type="index",
                                            label="Inpaint area", elem_id="img2img_inpaint_full_res")
                    padding = gr.Slider(0, 256, value=defaults.inpaint_full_res_padding, step=4, label="Only masked padding, pixels",
                                        elem_id="img2img_inpaint_full_res_padding")
            with gr.Row():
                sampler = gr.Dropdown([s.name for s in SAMPLERS], value=defaults.sampler_name, label="Sampling method", elem_id="img2img_sampler")
                scheduler = gr.Dropdown([s.label for s in SCHEDULES], value=defaults.scheduler, label="Schedule type", elem_id="img2img_scheduler")
            steps = gr.Slider(1, 150, value=defaults.steps, step=1, label="Sampling steps", elem_id="img2img_steps")
            with gr.Row():
                width = gr.Slider(*SIDE_RANGE, value=defaults.width, step=8, label="Width", elem_id="img2img_width")
                height = gr.Slider(*SIDE_RANGE, value=defaults.height, step=8, label="Height", elem_id="img2img_height")
            with gr.Row():
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="img2img_batch_count")
                batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="img2img_batch_size")
            cfg_scale = gr.Slider(1, 30, value=defaults.cfg_scale, step=0.5, label="CFG Scale", elem_id="img2img_cfg_scale")
            denoising = gr.Slider(0, 1, value=defaults.denoising_strength, step=0.01, label="Denoising strength",
                                  elem_id="img2img_denoising_strength")
            seed_row = SeedRow.build("img2img")
            seed = seed_row.seed
            variation = VariationSeeds.build("img2img")
            refiner, refiner_switch_at = refiner_accordion(ctx, "img2img", defaults.refiner_switch_at)
            with gr.Accordion("Advanced", open=False):
                clip_skip = gr.Slider(1, 12, value=1, step=1, label="Clip skip", elem_id="img2img_clip_skip")
                noise_source = gr.Radio(["CPU", "GPU"], value=ctx.settings.noise_source, label="Random number source", elem_id="img2img_noise_source")
                mask_weight = gr.Slider(0, 1, value=defaults.inpainting_mask_weight, step=0.01,
                                        label="Conditional mask weight (inpainting models)", elem_id="img2img_inpainting_mask_weight")
            extension_accordions(accordions)
            script_controls = ScriptControls.build(scripts, "img2img")
        with gr.Column():
            out = OutputPanel.build("img2img")

    # The widget of each request field that pasted parameters can set (modules/ui/paste.py; the
    # picture goes to the img2img source) ...
    fields = {"prompt": prompt, "negative_prompt": negative, "sampler_name": sampler, "scheduler": scheduler,
              "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "width": width, "height": height,
              "batch_count": batch_count, "batch_size": batch_size, "clip_skip": clip_skip, "noise_source": noise_source,
              "checkpoint": checkpoint, "denoising_strength": denoising, "mask_blur": mask_blur,
              "inpaint_full_res_padding": padding, "inpainting_mask_weight": mask_weight,
              "refiner_checkpoint": refiner, "refiner_switch_at": refiner_switch_at, **variation.fields}
    # ... and the options chosen by their index, which Generate reads too.
    by_index = {"resize_mode": resize_mode, "inpainting_fill": masked_content, "inpainting_mask_invert": mask_mode,
                "inpaint_full_res": inpaint_area}
    inputs = {
        source, image, editor, upload_image, upload_mask, input_dir, output_dir, mask_dir,
        *script_controls.inputs, *fields.values(), *by_index.values(),
    }

    def make_request(v: dict) -> Img2ImgRequest:
        """The request the widgets describe (not yet validated); for Batch, without pictures."""
        kind = v[source]
        pictures, mask = {
            0: lambda: (v[image], None),
            1: lambda: ((v[editor] or {}).get("background"), mask_from_layers((v[editor] or {}).get("layers"))),
            2: lambda: (v[upload_image], v[upload_mask]),
            3: lambda: (None, None),
        }[kind]()
        if kind in (1, 2) and pictures is not None and mask is None:
            raise RequestError("no mask: paint over the part of the picture to regenerate" if kind == 1 else "upload a mask too")
        request_fields = form_fields(Img2ImgRequest, {name: v[widget] for name, widget in {**fields, **by_index}.items()})
        request_fields.update(init_images=(pictures,) if pictures is not None else (), mask=mask)
        return Img2ImgRequest(**request_fields)

    def run(v: dict, owner: str = "local"):
        try:
            request = make_request(v)
            if v[source] != 3:
                request = request.validate()
            work = scripts.job(ctx, "img2img", **script_controls.job_arguments(v))
        except (RequestError, TypeError, ValueError) as e:
            raise gr.Error(str(e))
        if v[source] == 3:
            result = yield from out.stream(ctx, Job(description="img2img batch", owner=owner), img2img_batch.run_folder,
                                           request, v[input_dir], v[output_dir], v[mask_dir], work)
            if result.skipped:
                gr.Warning("Skipped: " + "; ".join(result.skipped))
        else:
            yield from out.stream(ctx, Job(description="img2img", owner=owner), work, request)

    wire_generation(ctx, run, inputs, out, area, seed_row)
    area.wire_token_counters(ctx, steps, checkpoint)
    variation.wire(out)

    def chosen(index: int):
        return lambda: (index, gr.update(visible=index in INPAINTING_SOURCES))

    for index, tab in enumerate((tab_img2img, tab_inpaint, tab_upload, tab_batch)):
        tab.select(chosen(index), outputs=[source, inpaint_options], queue=False)
    image.upload(size_of, inputs=image, outputs=[width, height], queue=False)
    upload_image.upload(size_of, inputs=upload_image, outputs=[width, height], queue=False)
    # Queued, unlike the others: the editor sends its picture as separate uploads, which an
    # unqueued event did not receive.
    editor.upload(lambda value: size_of((value or {}).get("background")), inputs=editor, outputs=[width, height])
    return (
        PasteTarget(tab_id="img2img", label="img2img", fields=fields, image=image,
                    image_updates={sources: gr.update(selected="img2img_tab_img2img"), source: 0,
                                   inpaint_options: gr.update(visible=False)}),
        # "Send to inpaint": the same fields, the picture into the brush editor, ready to paint on.
        PasteTarget(tab_id="img2img", label="inpaint", fields=fields, image=editor,
                    image_updates={sources: gr.update(selected="img2img_tab_inpaint"), source: 1,
                                   inpaint_options: gr.update(visible=True)}),
        out.tools,
    )
