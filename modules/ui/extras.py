"""The Extras tab: pictures (one, several, or a folder's) -> ExtrasRequest -> extras.run -> gallery,
with A1111's buttons under it."""

from __future__ import annotations

import html

import gradio as gr

from modules.images import image_info
from modules.postprocess import extras
from modules.service.jobs import Job
from modules.ui.common import GalleryTools, owner_of, picture_texts, progress_html, run_with_progress
from modules.ui.paste import PasteTarget

SOURCES = ("single", "batch", "directory")


def build(ctx) -> tuple[PasteTarget, GalleryTools]:
    """The tab; returns where a picture sent to Extras lands, and its gallery's buttons, whose
    Send to webui.py wires."""
    defaults = extras.ExtrasRequest()
    names = ctx.upscalers.names()
    source = gr.State(SOURCES[0])
    resize_mode = gr.State(defaults.resize_mode)
    with gr.Row():
        with gr.Column():
            with gr.Tabs(elem_id="extras_sources") as sources:
                with gr.Tab("Single Image", id="extras_single") as single_tab:
                    image = gr.Image(label="Source", type="pil", image_mode=None, elem_id="extras_image")
                with gr.Tab("Batch Process", id="extras_batch") as batch_tab:
                    files = gr.File(label="Batch Process", file_count="multiple", file_types=["image"], elem_id="extras_image_batch")
                with gr.Tab("Batch from Directory", id="extras_directory") as directory_tab:
                    input_dir = gr.Textbox(label="Input directory", elem_id="extras_batch_input_dir",
                                           placeholder="A folder on the computer running the web UI")
                    output_dir = gr.Textbox(label="Output directory", elem_id="extras_batch_output_dir",
                                            placeholder="Leave blank to save in outputs/extras-images")
            run_button = gr.Button("Generate", variant="primary", elem_id="extras_generate")
            with gr.Tabs(elem_id="extras_resize_mode"):
                with gr.Tab("Scale by", id="extras_scale_by") as scale_by_tab:
                    scale = gr.Slider(1.0, extras.MAX_SCALE, value=defaults.upscaling_resize, step=0.05, label="Resize", elem_id="extras_upscaling_resize")
                with gr.Tab("Scale to", id="extras_scale_to") as scale_to_tab:
                    with gr.Row():
                        width = gr.Number(value=defaults.upscaling_resize_w, precision=0, label="Width", elem_id="extras_upscaling_resize_w")
                        height = gr.Number(value=defaults.upscaling_resize_h, precision=0, label="Height", elem_id="extras_upscaling_resize_h")
                    crop = gr.Checkbox(value=defaults.upscaling_crop, label="Crop to fit", elem_id="extras_upscaling_crop")
            with gr.Row():
                upscaler_1 = gr.Dropdown(names, value=defaults.upscaler_1, label="Upscaler 1", elem_id="extras_upscaler_1", scale=4)
                refresh = gr.Button("🔄", size="sm", min_width=40, elem_id="extras_upscaler_refresh", scale=0)
            with gr.Row():
                upscaler_2 = gr.Dropdown(names, value=defaults.upscaler_2, label="Upscaler 2", elem_id="extras_upscaler_2")
                visibility = gr.Slider(0.0, 1.0, value=defaults.upscaler_2_visibility, step=0.001, label="Upscaler 2 visibility", elem_id="extras_upscaler_2_visibility")
            # Faces are restored after upscaling, in this order, as in A1111; files in models/GFPGAN and models/Codeformer.
            gfpgan = gr.Slider(0.0, 1.0, value=defaults.gfpgan_visibility, step=0.001, label="GFPGAN visibility",
                               elem_id="extras_gfpgan_visibility")
            with gr.Row():
                codeformer = gr.Slider(0.0, 1.0, value=defaults.codeformer_visibility, step=0.001, label="CodeFormer visibility",
                                       elem_id="extras_codeformer_visibility")
                codeformer_weight = gr.Slider(0.0, 1.0, value=defaults.codeformer_weight, step=0.001,
                                              label="CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
                                              elem_id="extras_codeformer_weight")
        with gr.Column():
            progress = gr.HTML(elem_id="extras_progress")
            gallery = gr.Gallery(label="Result", columns=2, elem_id="extras_gallery", format="png")
            # As in A1111, Send to img2img / inpaint takes the picture only: the parameters it
            # carries describe the picture before upscaling (its size among them).
            tools = GalleryTools.build("extras", gallery, paste_parameters=False)
            info = gr.HTML(elem_id="extras_info")

    for tab, value in ((single_tab, "single"), (batch_tab, "batch"), (directory_tab, "directory")):
        tab.select(lambda v=value: v, outputs=source, queue=False)
    scale_by_tab.select(lambda: 0, outputs=resize_mode, queue=False)
    scale_to_tab.select(lambda: 1, outputs=resize_mode, queue=False)

    def inputs_of(source, image, files, input_dir) -> tuple[list[extras.ExtrasInput], list[str]]:
        if source == "single":
            if image is None:
                raise extras.ExtrasError("drop a picture in Source first")
            return [extras.ExtrasInput(image, "")], []
        if source == "batch":
            if not files:
                raise extras.ExtrasError("add pictures to Batch Process first")
            return extras.read_inputs(files)
        return extras.directory_inputs(ctx.paths, input_dir or "")

    def run(source, image, files, input_dir, output_dir, resize_mode, scale, width, height, crop, upscaler_1, upscaler_2,
            visibility, gfpgan, codeformer, codeformer_weight, http: gr.Request):
        try:
            request = extras.ExtrasRequest(
                resize_mode=int(resize_mode), upscaling_resize=float(scale),
                upscaling_resize_w=int(width or 0), upscaling_resize_h=int(height or 0), upscaling_crop=bool(crop),
                upscaler_1=upscaler_1 or "None", upscaler_2=upscaler_2 or "None", upscaler_2_visibility=float(visibility),
                gfpgan_visibility=float(gfpgan), codeformer_visibility=float(codeformer),
                codeformer_weight=float(codeformer_weight),
            ).validate(ctx.upscalers.names())
            inputs, problems = inputs_of(source, image, files, input_dir)
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e))
        if not inputs:
            raise gr.Error("; ".join(problems) or "no picture given")
        folder = (output_dir or "").strip() if source == "directory" else ""
        job = Job(description="extras", owner=owner_of(http))
        for kind, payload in run_with_progress(ctx, job, extras.run, request, inputs, folder or None):
            if kind == "progress":
                yield {progress: progress_html(payload[0], payload[2])}
            else:
                lines = [*(f"⚠ {p}" for p in problems), *payload.infotexts[:1]]
                yield {
                    progress: "",
                    gallery: [str(p) for p in payload.paths],
                    info: "".join(f"<p>{html.escape(line)}</p>" for line in lines),
                    tools.texts: [picture_texts(info=image_info.read_bytes(png)[1]) for png in payload.pngs],
                    tools.selected: None,
                    tools.log: "",
                }

    run_button.click(
        run,
        inputs=[source, image, files, input_dir, output_dir, resize_mode, scale, width, height, crop, upscaler_1, upscaler_2,
                visibility, gfpgan, codeformer, codeformer_weight],
        outputs=[progress, gallery, info, tools.texts, tools.selected, tools.log],
        concurrency_limit=None,
    )
    tools.wire(ctx)

    def on_refresh(first, second):
        names = ctx.upscalers.names()
        return (gr.update(choices=names, value=first if first in names else "None"),
                gr.update(choices=names, value=second if second in names else "None"))

    refresh.click(on_refresh, inputs=[upscaler_1, upscaler_2], outputs=[upscaler_1, upscaler_2], queue=False)
    return PasteTarget(
        tab_id="extras", label="extras", image=image,
        image_updates={sources: gr.update(selected="extras_single"), source: "single"},
    ), tools
