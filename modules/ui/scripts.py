"""The scripts of a generating tab in the page: A1111's "Script" menu with each selectable
script's controls (shown while it is chosen), an accordion for each always-on script, and the
extensions' accordions. The controls are made from the scripts' Args, so a script needs no
Gradio code of its own."""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from modules.scripts.base import Arg, Script
from modules.scripts.library import ScriptLibrary

log = logging.getLogger(__name__)
NONE = "None"


def control(arg: Arg, elem_id: str) -> gr.components.Component:
    """The Gradio control for one argument."""
    common = dict(label=arg.label, value=arg.value, elem_id=elem_id, info=arg.info or None)
    if arg.kind == "text":
        return gr.Textbox(lines=1, **common)
    if arg.kind == "textbox":
        return gr.Textbox(lines=4, **common)
    if arg.kind == "checkbox":
        return gr.Checkbox(**common)
    if arg.kind == "slider":
        return gr.Slider(arg.minimum, arg.maximum, step=arg.step, **common)
    if arg.kind == "number":
        return gr.Number(minimum=arg.minimum, maximum=arg.maximum, precision=0 if arg.whole else None, **common)
    if arg.kind == "dropdown":
        return gr.Dropdown(list(arg.choices), **common)
    if arg.kind == "radio":
        return gr.Radio(list(arg.choices), **common)
    return gr.CheckboxGroup(list(arg.choices), **{**common, "value": list(arg.value)})


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


@dataclass
class ScriptControls:
    """The widgets, in the order `job_arguments` reads their values."""

    menu: gr.Dropdown
    selectable: list[tuple[Script, list]] = field(default_factory=list)
    always_on: list[tuple[Script, gr.Checkbox, list]] = field(default_factory=list)

    @classmethod
    def build(cls, library: ScriptLibrary, tab: str) -> "ScriptControls":
        titles = [NONE] + [s.title for s in library.of(tab, always_on=False)]
        menu = gr.Dropdown(titles, value=NONE, label="Script", elem_id=f"{tab}_script")
        controls = cls(menu)
        groups = []
        for script in library.of(tab, always_on=False):
            with gr.Group(visible=False, elem_id=f"{tab}_script_{_slug(script.title)}") as group:
                widgets = [control(a, f"{tab}_{_slug(script.title)}_{_slug(a.label)}") for a in script.args]
            groups.append(group)
            controls.selectable.append((script, widgets))
        for script in library.of(tab, always_on=True):
            with gr.Accordion(script.title, open=False, elem_id=f"{tab}_{_slug(script.title)}"):
                enable = gr.Checkbox(label="Enable", value=False, elem_id=f"{tab}_{_slug(script.title)}_enable")
                widgets = [control(a, f"{tab}_{_slug(script.title)}_{_slug(a.label)}") for a in script.args]
            controls.always_on.append((script, enable, widgets))
        menu.change(lambda name: [gr.update(visible=name == s.title) for s, _ in controls.selectable],
                    inputs=menu, outputs=groups, queue=False)
        return controls

    @property
    def inputs(self) -> list:
        found = [self.menu]
        for _, widgets in self.selectable:
            found += widgets
        for _, enable, widgets in self.always_on:
            found += [enable, *widgets]
        return found

    def job_arguments(self, values: dict) -> dict:
        """ScriptLibrary.job's keyword arguments from the widgets' values (keyed by widget)."""
        name = values[self.menu]
        chosen = next((widgets for s, widgets in self.selectable if s.title == name), [])
        always_on = {s.title: {"args": [values[w] for w in widgets]} for s, enable, widgets in self.always_on if values[enable]}
        return {"script_name": None if name == NONE else name, "script_args": [values[w] for w in chosen],
                "alwayson": always_on}


def extension_accordions(accordions: list[tuple[str, str, Callable[[], None]]]) -> None:
    """The extensions' accordions for one tab; one whose build fails says so inside."""
    for extension, title, build in accordions:
        with gr.Accordion(title, open=False, elem_id=f"extension_{_slug(extension)}_{_slug(title)}"):
            extension_tab(extension, title, build)


def extension_tab(extension: str, title: str, build: Callable[[], None]) -> None:
    """An extension's tab's or accordion's contents, or what went wrong making them."""
    try:
        build()
    except Exception as e:  # a user's UI code must not take the page down
        log.exception("extension %s: %r failed", extension, title)
        gr.Markdown(f"⚠ This part of **{html.escape(extension)}** failed: {html.escape(str(e))}")
