"""The PNG Info tab: any picture in, the parameters it was made with and its other text out,
and buttons that send them (and the picture) to other tabs."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from modules.images import image_info
from modules.ui.paste import PasteTarget, send_button


def info_html(info: image_info.ImageInfo) -> str:
    """A1111's layout: each text entry as a bold name over its text, "parameters" first."""
    parts = []
    if info.error:
        parts.append(f'<p class="png-info-error">⚠ {html.escape(info.error)}</p>')
    entries = {**({image_info.PARAMETERS: info.parameters} if info.parameters else {}), **info.items}
    for key, text in entries.items():
        parts.append(f'<div><p><b>{html.escape(key)}</b></p><pre class="infotext">{html.escape(text)}</pre></div>')
    if not entries and not info.error:
        parts.append("<p>This picture carries no generation parameters or other text.</p>")
    return "\n".join(parts)


def build(ctx, targets: list[PasteTarget], tabs: gr.Tabs) -> None:
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Source", file_types=["image"], elem_id="pnginfo_image")
            preview = gr.Image(label="Picture", interactive=False, visible=False, elem_id="pnginfo_preview")
        with gr.Column():
            shown = gr.HTML(elem_id="pnginfo_html")
            parameters = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            picture = gr.State(None)
            with gr.Row():
                for target in targets:
                    send_button(ctx, target, tabs, parameters, picture)

    def read(path):
        if not path:
            return gr.update(value=None, visible=False), "", "", None
        image, info = image_info.read_path(Path(path))
        readable = str(path) if image is not None else None
        return gr.update(value=readable, visible=readable is not None), info_html(info), info.parameters, readable

    upload.change(read, inputs=upload, outputs=[preview, shown, parameters, picture], queue=False)
