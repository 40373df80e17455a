"""The Settings tab: edits ctx.settings and saves them to config.json."""

from __future__ import annotations

import gradio as gr


def build(ctx) -> None:
    s = ctx.settings
    vae = gr.Dropdown(
        ["Automatic", "None", *(p.name for p in ctx.models.vaes())], value=s.sd_vae, label="SD VAE", elem_id="setting_sd_vae",
        info="Automatic: a VAE named like the checkpoint, else the checkpoint's own. Files go in models/VAE.",
    )
    live_preview = gr.Slider(0, 50, value=s.live_preview_every, step=1, label="Live preview every N sampling steps (0: off)", elem_id="setting_live_preview_every")
    save_images = gr.Checkbox(value=s.save_images, label="Save every generated image to outputs/", elem_id="setting_save_images")
    noise_source = gr.Radio(["CPU", "GPU"], value=s.noise_source, label="Random number source (CPU gives the same image on any machine)", elem_id="setting_noise_source")
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
    status = gr.Markdown(elem_id="settings_status")

    def save(vae, every, save_images, noise_source):
        ctx.update_settings(sd_vae=vae, live_preview_every=int(every), save_images=bool(save_images), noise_source=noise_source)
        return f"Saved to `{ctx.paths.settings_file}`."

    apply.click(save, inputs=[vae, live_preview, save_images, noise_source], outputs=status)
