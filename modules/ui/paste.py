"""Sending a picture's parameters (or the picture itself) to a tab: "Send to txt2img", "Send to extras".

A tab that can receive describes itself as a PasteTarget: its id in the main tabs and its
components by GenerationRequest field name. `send_button` (PNG Info) and `wire_send` (the
buttons under a gallery) make a button that fills those fields from an infotext, as A1111 does;
fields an infotext does not mention, or gives a value that cannot be used for, keep what the
person had set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gradio as gr

from modules.generation.parameters import request_fields
from modules.images.infotext import parse_infotext


@dataclass
class PasteTarget:
    tab_id: str  # the id of the tab in the main gr.Tabs
    label: str  # as on the button: "Send to <label>"; unique among the targets
    fields: dict[str, gr.components.Component] = field(default_factory=dict)  # request field -> component
    image: gr.components.Component | None = None  # receives the picture itself, where the tab takes one
    # Further updates when a picture arrives, e.g. selecting the tab's single-image input.
    image_updates: dict = field(default_factory=dict)


def checkpoint_title(ctx, name: str | None) -> str | None:
    """The dropdown title of a checkpoint named in an infotext, when that checkpoint is here."""
    if not name:
        return None
    try:
        return ctx.models.find_checkpoint(name).title
    except LookupError:
        return None


def field_values(ctx, infotext: str, fields: dict[str, object]) -> dict[object, object]:
    """{component: new value} for the components of `fields` that the infotext sets."""
    prompt, negative, params = parse_infotext(infotext or "")
    values = request_fields(prompt, negative, params, img2img=True)
    if params:  # A1111's "Extra" beside the seed: ticked for a picture made with variation seeds or a seed resize
        values["seed_enable_extras"] = "Variation seed" in params or "Seed resize from" in params
    checkpoint = checkpoint_title(ctx, params.get("Model"))
    if checkpoint is not None:
        values["checkpoint"] = checkpoint
    if "refiner_checkpoint" in values:  # the dropdown lists titles, and "None"
        refiner = values.pop("refiner_checkpoint")
        title = "None" if refiner is None else checkpoint_title(ctx, refiner)
        if title is not None:
            values["refiner_checkpoint"] = title
    return {fields[name]: value for name, value in values.items() if name in fields}


def send_button(ctx, target: PasteTarget, tabs: gr.Tabs, infotext: gr.components.Component,
                image: gr.components.Component | None = None) -> gr.Button:
    """A "Send to <tab>" button: fills the target's fields from `infotext`'s value, hands over
    `image`'s value where the target takes a picture, and switches to the target's tab."""
    button = gr.Button(f"Send to {target.label}", elem_id=f"send_to_{target.label}", size="sm")
    wire_send(ctx, button, target, tabs, [infotext, *([image] if image is not None else [])],
              lambda text, picture=None: (text, picture))
    return button


def wire_send(ctx, button: gr.Button, target: PasteTarget, tabs: gr.Tabs, inputs: list, chosen) -> None:
    """Makes `button` send to `target`: `chosen(*values of inputs)` gives (infotext, picture);
    the infotext fills the target's fields, the picture goes where the target takes one, and the
    target's tab is shown. (None, None): nothing to send, nothing changes."""
    outputs = [*target.fields.values(), *([target.image] if target.image is not None else []), tabs]
    outputs += [c for c in target.image_updates if c not in outputs] if target.image is not None else []

    def send(*values):
        text, picture = chosen(*values)
        if text is None and picture is None:
            return {}
        updates = field_values(ctx, text, target.fields) if text else {}
        if target.image is not None and picture is not None:
            updates[target.image] = picture
            updates.update(target.image_updates)
        updates[tabs] = gr.Tabs(selected=target.tab_id)
        return updates

    button.click(send, inputs=inputs, outputs=outputs, queue=False)
