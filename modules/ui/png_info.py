"""The PNG Info tab: any picture in, the parameters it was made with and its other text out,
and buttons that send them (and the picture) to other tabs. A picture made by another tool
(ComfyUI, InvokeAI, NovelAI, Fooocus) shows that tool's name, its parameters mapped onto this
web UI's, which the buttons send, and what did not map."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from modules.images import image_info, other_tools
from modules.ui.paste import PasteTarget, send_button


def _entry(key: str, text: str) -> str:
    return f'<div><p><b>{html.escape(key)}</b></p><pre class="infotext">{html.escape(text)}</pre></div>'


def info_html(info: image_info.ImageInfo, tool: other_tools.ToolInfo | None = None) -> str:
    """A1111's layout: each text entry as a bold name over its text, "parameters" first. Another
    tool's picture has its name, the mapped parameters and what did not map above the text it
    carries, which is shown as the tool wrote it."""
    parts = []
    if info.error:
        parts.append(f'<p class="png-info-error">⚠ {html.escape(info.error)}</p>')
    if tool is not None:
        parts.append(f'<p class="png-info-tool">Made with {html.escape(tool.tool)}</p>')
        if tool.error:
            parts.append(f'<p class="png-info-error">⚠ {html.escape(tool.error)}</p>')
        if tool.infotext:
            parts.append(_entry(image_info.PARAMETERS, tool.infotext))
        if tool.not_mapped:
            listed = "".join(f"<li>{html.escape(line)}</li>" for line in tool.not_mapped)
            parts.append(f'<div class="png-info-not-mapped"><p><b>not mapped</b></p><ul>{listed}</ul></div>')
    raw_name = f"{image_info.PARAMETERS} ({tool.tool})" if tool is not None else image_info.PARAMETERS
    entries = {**({raw_name: info.parameters} if info.parameters else {}), **info.items}
    parts += [_entry(key, text) for key, text in entries.items()]
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
        tool = other_tools.read(info, image.size if image is not None else None)
        readable = str(path) if image is not None else None
        parameters = tool.infotext if tool is not None else info.parameters
        return gr.update(value=readable, visible=readable is not None), info_html(info, tool), parameters, readable

    upload.change(read, inputs=upload, outputs=[preview, shown, parameters, picture], queue=False)
