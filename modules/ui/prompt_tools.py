"""Widgets around a tab's prompt: the styles menu with "save as style", and the list of the
embeddings and LoRAs a prompt can call."""

from __future__ import annotations

import html

import gradio as gr

from modules.networks.embeddings import skipped_reason
from modules.prompting.styles import PromptStyle


def build_styles(ctx, prompt: gr.Textbox, negative: gr.Textbox, tab: str) -> gr.Dropdown:
    """The styles dropdown (applied at generation, in the order chosen) and a form that saves the
    current prompts as a style."""
    with gr.Row():
        styles = gr.Dropdown(list(ctx.styles.styles()), value=[], multiselect=True, label="Styles",
                             elem_id=f"{tab}_styles", scale=4)
        refresh = gr.Button("🔄", size="sm", min_width=40, elem_id=f"{tab}_styles_refresh", scale=0)
    with gr.Accordion("Save prompts as a style", open=False, elem_id=f"{tab}_style_save_box"):
        with gr.Row():
            name = gr.Textbox(label="Style name", elem_id=f"{tab}_style_name", scale=3)
            save = gr.Button("Save style", elem_id=f"{tab}_style_save", scale=1)
        status = gr.Markdown(elem_id=f"{tab}_style_status")

    def choices(selected):
        names = list(ctx.styles.styles())
        return gr.update(choices=names, value=[s for s in selected or [] if s in names])

    def on_save(style_name, prompt_text, negative_text, selected):
        try:
            ctx.styles.save(PromptStyle(style_name or "", prompt_text or "", negative_text or ""))
        except (ValueError, OSError) as e:
            raise gr.Error(str(e))
        return choices(selected), f"Saved style **{html.escape(style_name.strip())}** to {ctx.styles.path.name}."

    refresh.click(choices, inputs=styles, outputs=styles, queue=False)
    save.click(on_save, inputs=[name, prompt, negative, styles], outputs=[styles, status], queue=False)
    return styles


def networks_html(ctx) -> str:
    """The embeddings (usable, skipped, unreadable) and LoRAs, with how a prompt calls them."""
    width = ctx.models.loaded_text_width()
    loaded, skipped = ctx.embeddings.split(width)
    parts = ["<h4>Textual-inversion embeddings</h4>"]
    if loaded:
        parts.append("<ul class='embeddings-loaded'>" + "".join(
            f"<li><code>{html.escape(name)}</code> ({e.count} vector{'s' * (e.count != 1)}, {e.width} wide)</li>"
            for name, e in sorted(loaded.items(), key=lambda item: item[0].lower())) + "</ul>")
    else:
        parts.append(f"<p>None: put .pt, .bin or .safetensors files in {html.escape(str(ctx.embeddings.folder))} "
                     "and write the file name in a prompt.</p>")
    problems = {name: skipped_reason(e, width) for name, e in skipped.items()} | ctx.embeddings.problems()
    if problems:
        parts.append("<p>Not used:</p><ul class='embeddings-skipped'>" + "".join(
            f"<li><code>{html.escape(name)}</code>: {html.escape(why)}</li>" for name, why in problems.items()) + "</ul>")
    parts.append("<h4>LoRA</h4>")
    loras = sorted({path.stem for path in ctx.loras.available().values()}, key=str.lower)
    if loras:
        parts.append("<ul class='loras'>" + "".join(f"<li><code>&lt;lora:{html.escape(n)}:1&gt;</code></li>" for n in loras) + "</ul>")
    else:
        parts.append(f"<p>None: put .safetensors files in {html.escape(str(ctx.loras.folder))}.</p>")
    return "".join(parts)


def build_networks(ctx, tab: str) -> gr.HTML:
    with gr.Accordion("Embeddings and LoRA", open=False, elem_id=f"{tab}_extra_networks"):
        # A callable value is called again on every page load, so the list follows the folders.
        listing = gr.HTML(lambda: networks_html(ctx), elem_id=f"{tab}_extra_networks_list")
        refresh = gr.Button("🔄 Refresh list", size="sm", elem_id=f"{tab}_extra_networks_refresh")
    refresh.click(lambda: networks_html(ctx), outputs=listing, queue=False)
    return listing
