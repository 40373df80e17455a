"""The Checkpoint Merger tab: models A, B, C and settings -> MergeRequest -> merger.merge -> a new
file in models/Stable-diffusion, listed at once in every checkpoint dropdown."""

from __future__ import annotations

import html

import gradio as gr

from modules.models import merger
from modules.service.jobs import Job
from modules.ui.common import owner_of, progress_html, run_with_progress


def build(ctx, checkpoint: gr.Dropdown) -> None:
    defaults = merger.MergeRequest(primary="")

    def titles() -> list[str]:
        return [c.title for c in ctx.models.checkpoints()]

    def vaes() -> list[str]:
        return ["None", *(p.relative_to(ctx.paths.vae).as_posix() for p in ctx.models.vaes())]

    with gr.Row():
        with gr.Column():
            with gr.Row():
                primary = gr.Dropdown(titles(), value=None, label="Primary model (A)", elem_id="modelmerger_primary_model_name")
                secondary = gr.Dropdown(titles(), value=None, label="Secondary model (B)", elem_id="modelmerger_secondary_model_name")
                tertiary = gr.Dropdown(titles(), value=None, label="Tertiary model (C)", elem_id="modelmerger_tertiary_model_name")
                refresh = gr.Button("🔄", size="sm", min_width=40, elem_id="modelmerger_refresh", scale=0)
            name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name",
                              placeholder="Made from the models' names when left blank")
            multiplier = gr.Slider(0.0, 1.0, value=defaults.multiplier, step=0.05, label="Multiplier (M) - set to 0 to get model A",
                                   elem_id="modelmerger_interp_amount")
            interpolation = gr.Radio([m.name for m in merger.INTERPOLATIONS], value=defaults.interpolation,
                                     label="Interpolation Method", elem_id="modelmerger_interp_method")
            with gr.Row():
                checkpoint_format = gr.Radio(list(merger.FORMATS), value=defaults.checkpoint_format, label="Checkpoint format",
                                             elem_id="modelmerger_checkpoint_format")
                save_as_half = gr.Checkbox(value=defaults.save_as_half, label="Save as float16", elem_id="modelmerger_save_as_half")
            with gr.Row():
                bake_in_vae = gr.Dropdown(vaes(), value="None", label="Bake in VAE", elem_id="modelmerger_bake_in_vae")
                discard = gr.Textbox(label="Discard weights with matching name (regular expression)", elem_id="modelmerger_discard_weights")
            run_button = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge")
        with gr.Column():
            progress = gr.HTML(elem_id="modelmerger_progress")
            result = gr.HTML(elem_id="modelmerger_result")

    def run(a, b, c, name_value, m, method, fmt, half, vae, discard_value, http: gr.Request):
        request = merger.MergeRequest(
            primary=a or "", secondary=b or None, tertiary=c or None, interpolation=method, multiplier=float(m),
            name=name_value or "", checkpoint_format=fmt, save_as_half=bool(half), bake_in_vae=vae or "None",
            discard_weights=discard_value or "",
        )
        if not request.primary:
            raise gr.Error("choose the primary model (A)")
        job = Job(description="checkpoint merger", owner=owner_of(http))
        for kind, payload in run_with_progress(ctx, job, merger.merge, request):
            if kind == "progress":
                yield {progress: progress_html(payload[0], payload[2])}
            else:
                yield {progress: "", result: f"<p>Saved <b>{html.escape(payload.name)}</b> in {html.escape(str(payload.parent))}.</p>"}

    def list_new_file(current):
        choices = titles()
        return (*(gr.update(choices=choices) for _ in range(3)), gr.update(choices=choices, value=current))

    # The lists are updated by a second step so that a failed merge marks only the result as failed.
    run_button.click(
        run,
        inputs=[primary, secondary, tertiary, name, multiplier, interpolation, checkpoint_format, save_as_half, bake_in_vae, discard],
        outputs=[progress, result],
        concurrency_limit=None,
    ).success(list_new_file, inputs=checkpoint, outputs=[primary, secondary, tertiary, checkpoint], queue=False)

    def on_refresh(a, b, c):
        choices = titles()
        return (*(gr.update(choices=choices, value=v if v in choices else None) for v in (a, b, c)),
                gr.update(choices=vaes()))

    refresh.click(on_refresh, inputs=[primary, secondary, tertiary], outputs=[primary, secondary, tertiary, bake_in_vae], queue=False)
