"""The Settings tab: edits ctx.settings and saves them to config.json."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    s = ctx.settings
    gr.Markdown(f"**Precision:** {ctx.models.policy.reason}. Chosen at start (`--precision`, `--no-half`, "
                f"`--no-half-vae`).", elem_id="settings_precision")
    vae = gr.Dropdown(
        ["Automatic", "None", *(p.name for p in ctx.models.vaes())], value=s.sd_vae, label="SD VAE", elem_id="setting_sd_vae",
        info="Automatic: a VAE named like the checkpoint, else the checkpoint's own. Files go in models/VAE.",
    )
    live_preview = gr.Slider(0, 50, value=s.live_preview_every, step=1, label="Live preview every N sampling steps (0: off)", elem_id="setting_live_preview_every")
    save_images = gr.Checkbox(value=s.save_images, label="Save every generated image to outputs/", elem_id="setting_save_images")
    noise_source = gr.Radio(["CPU", "GPU"], value=s.noise_source, label="Random number source (CPU gives the same image on any machine)", elem_id="setting_noise_source")
    with gr.Row():
        tile = gr.Slider(0, 512, value=s.upscaler_tile, step=16, label="Upscaler network tile size (0: whole picture at once)", elem_id="setting_upscaler_tile",
                         info="Smaller tiles need less memory; large pictures are cut into tiles of this many pixels.")
        overlap = gr.Slider(0, 64, value=s.upscaler_tile_overlap, step=1, label="Upscaler tile overlap, pixels", elem_id="setting_upscaler_tile_overlap",
                            info="Context around each tile; more hides seams and costs time.")
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
    status = gr.Markdown(elem_id="settings_status")

    def save(vae, every, save_images, noise_source, tile, overlap):
        ctx.update_settings(sd_vae=vae, live_preview_every=int(every), save_images=bool(save_images), noise_source=noise_source,
                            upscaler_tile=int(tile), upscaler_tile_overlap=int(overlap))
        return f"Saved to `{ctx.paths.settings_file}`."

    apply.click(save, inputs=[vae, live_preview, save_images, noise_source, tile, overlap], outputs=status)
