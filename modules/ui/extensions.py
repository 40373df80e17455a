"""The Extensions tab: each extension found in extensions/, whether it runs, why not if it
failed, and what it adds; ticking one on or off is remembered and takes effect at the next start."""

from __future__ import annotations

import html

import gradio as gr

from modules.extensions.loader import ExtensionSet


def status_of(extension) -> str:
    if extension.error:
        return f"failed: {extension.error}"
    return "running" if extension.enabled else "turned off"


def table_html(extensions: ExtensionSet) -> str:
    if not extensions.all:
        return (f"<p>No extensions. Put one in <code>{html.escape(str(extensions.folder))}</code>: a folder with an "
                "<code>extension.py</code> (see the README there).</p>")
    rows = []
    for e in extensions.all:
        adds = [f"{len(e.scripts)} scripts", f"{len(e.accordions)} accordions", f"{len(e.tabs)} tabs", f"{len(e.routes)} routes"]
        rows.append(f"<tr><td>{html.escape(e.name)}</td><td>{html.escape(status_of(e))}</td>"
                    f"<td>{html.escape(', '.join(adds)) if e.running else ''}</td><td><code>{html.escape(str(e.path))}</code></td></tr>")
    return ("<table id='extensions_table'><tr><th>Extension</th><th>Status</th><th>Adds</th><th>Folder</th></tr>"
            + "".join(rows) + "</table>")


def build(extensions: ExtensionSet) -> None:
    gr.HTML(table_html(extensions), elem_id="extensions_installed")
    names = [e.name for e in extensions.all]
    enabled = gr.CheckboxGroup(names, value=[e.name for e in extensions.all if e.enabled], label="Enabled",
                               elem_id="extensions_enabled")
    apply = gr.Button("Apply (takes effect at the next start)", elem_id="extensions_apply")
    status = gr.Markdown(elem_id="extensions_status")

    def save(chosen):
        extensions.set_enabled({name: name in (chosen or []) for name in names})
        return f"Saved to `{extensions.state_file}`; restart the web UI to apply."

    apply.click(save, inputs=enabled, outputs=status, queue=False)
