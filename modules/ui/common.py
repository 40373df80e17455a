"""Pieces every generating tab shares: running a job in the background while reporting progress,
error text, the prompts with their token counters, and the gallery with A1111's buttons under it."""

from __future__ import annotations

import functools
import html
import io
import logging
import math
import threading
import time
import typing
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from modules.app.fileio import atomic_write
from modules.images import storage
from modules.images.image_info import PARAMETERS, ImageInfo
from modules.images.infotext import parse_infotext
from modules.prompting import prompt_parser
from modules.prompting.conditioning import CHUNK_TOKENS, prompt_chunks, token_count
from modules.prompting.extra_networks import parse_extra_networks
from modules.service.jobs import Job, QueueFull
from modules.ui.paste import PasteTarget, wire_send

log = logging.getLogger(__name__)

POLL_SECONDS = 0.4
SEND_TO = ("img2img", "inpaint", "extras")  # the PasteTarget labels of A1111's buttons under a gallery
SAVE_FOLDER = "save"  # outputs/save: where A1111's Save and Zip buttons write
NO_COUNT = "–"  # the token counter while the prompt does not parse
# Zips take the next number of the save folder one at a time, so two never share a name.
_ZIP_NUMBERING = threading.Lock()
# Errors whose message is already written for a person; anything else is a bug and is logged in full.
PEOPLE_ERRORS = (ValueError, LookupError, OSError)


def form_fields(request_type: type, values: dict[str, Any]) -> dict[str, Any]:
    """Request fields from widget values keyed by field name. Gradio gives a slider's value as a
    float and an empty box as None or "", so each value becomes its field's type; an empty one
    leaves the field's default."""
    hints = typing.get_type_hints(request_type)
    fields = {}
    for name, value in values.items():
        if value is None or value == "":
            continue
        kind = hints[name]
        fields[name] = tuple(value) if typing.get_origin(kind) is tuple else kind(value) if kind in (int, float, bool) else value
    return fields


def refiner_accordion(ctx, prefix: str, switch_at: float) -> tuple[gr.Dropdown, gr.Slider]:
    """A1111's "Refiner" accordion: a second checkpoint ("None": no refiner) and the fraction of
    the steps after which it takes over."""

    def titles() -> list[str]:
        return ["None"] + [c.title for c in ctx.models.checkpoints()]

    with gr.Accordion("Refiner", open=False, elem_id=f"{prefix}_refiner"):
        with gr.Row():
            checkpoint = gr.Dropdown(titles(), value="None", label="Checkpoint", elem_id=f"{prefix}_refiner_checkpoint")
            refresh = gr.Button("🔄", size="sm", min_width=40, elem_id=f"{prefix}_refiner_refresh", scale=0)
            switch = gr.Slider(0.01, 1, value=switch_at, step=0.01, label="Switch at", elem_id=f"{prefix}_refiner_switch_at")
    refresh.click(lambda current: gr.update(choices=titles(), value=current if current in titles() else "None"),
                  inputs=checkpoint, outputs=checkpoint, queue=False)
    return checkpoint, switch


def user_of(request: gr.Request | None) -> str | None:
    """The user a browser's request signed in as; None without --gradio-auth."""
    return getattr(request, "username", None) if request is not None else None


def owner_of(request: gr.Request | None) -> str:
    """Whose job a browser's request makes: the signed-in user, else that browser session."""
    if request is None:
        return "local"
    return user_of(request) or f"session {request.session_hash}"


def progress_html(job: Job, ahead: int | None = None) -> str:
    """The job's progress bar, or its place in the queue while `ahead` jobs run before it."""
    if job.finished:
        return ""
    if ahead is not None:
        jobs = "1 job" if ahead == 1 else f"{ahead} jobs"
        return f'<div class="progress-text">Queued: {jobs} ahead</div>'
    eta = job.eta
    eta_text = f", ETA {eta:.0f}s" if eta is not None else ""
    percent = round(job.progress * 100)
    status = html.escape(job.status)
    return (
        f'<div class="progress-bar" data-progress="{percent}">'
        f'<div class="progress-fill" style="width:{percent}%"></div></div>'
        f'<div class="progress-text">{status} — step {job.step}/{job.total_steps} ({percent}%){eta_text}</div>'
    )


def error_message(error: BaseException) -> str:
    if isinstance(error, PEOPLE_ERRORS):
        return str(error)
    log.exception("generation failed", exc_info=error)
    return f"Generation failed: {type(error).__name__}: {error}"


def run_with_progress(ctx, job: Job, fn, *args):
    """Generator for Gradio handlers: yields ('progress', job) while fn runs, then ('done', result).

    The job queue runs fn on its worker thread, so the UI stays responsive and Interrupt/Skip
    (which only flip flags on the job) take effect at the next step. While the job waits, the
    progress says how many run before it; when the browser goes away (Gradio closes this
    generator), a job that has not started is taken out of the queue.
    """
    try:
        future = ctx.jobs.submit(job, fn, ctx, *args)
    except QueueFull as e:
        raise gr.Error(str(e)) from e
    last_preview = -1
    try:
        while not future.done():
            time.sleep(POLL_SECONDS)
            preview = job.preview if job.preview_id != last_preview else None
            last_preview = job.preview_id
            yield "progress", (job, preview, ctx.jobs.ahead_of(job))
    except GeneratorExit:
        ctx.jobs.cancel(job)
        raise
    error = future.exception()
    if error is not None:
        raise gr.Error(error_message(error))
    yield "done", future.result()


def infotext_html(infotexts: list[str]) -> str:
    return "".join(f'<pre class="infotext">{html.escape(t)}</pre>' for t in infotexts[:1])


def picture_texts(infotext: str | None = None, info: ImageInfo | None = None) -> dict[str, str]:
    """The PNG text a gallery picture carries, "parameters" (its infotext) first: from a job's
    infotext, or from what a picture file holds."""
    parameters = info.parameters if info is not None else infotext
    return {**({PARAMETERS: parameters} if parameters else {}), **(info.items if info is not None else {})}


def name_tail(ctx, texts: dict[str, str]) -> str:
    """A saved picture's name after its number, as a job names it: <seed>-<prompt>."""
    prompt, _negative, params = parse_infotext(texts.get(PARAMETERS, ""))
    seed = storage.sanitize_prompt(params.get("Seed", ""), 20)
    return "-".join(part for part in (seed, storage.sanitize_prompt(prompt, ctx.settings.filename_prompt_max)) if part)


def picture_png(path: str, texts: dict[str, str]) -> bytes:
    """A gallery picture as PNG with its text: the gallery's own copy may have lost it (a job that
    did not save hands the gallery bare pictures)."""
    with Image.open(path) as image:
        image.load()
        return storage.png_bytes(image, texts.get(PARAMETERS), {k: v for k, v in texts.items() if k != PARAMETERS})


def save_zip(data: bytes, folder: Path, tail: str) -> Path:
    """The zip as the next NNNNN-<tail>.zip in `folder`, numbered among the pictures saved there."""
    with _ZIP_NUMBERING:
        path = Path(folder) / f"{storage.next_number(folder):05}{'-' + tail if tail else ''}.zip"
        try:
            return atomic_write(path, lambda f: f.write(data))
        except OSError as e:
            raise OSError(f"Could not write {path.name} in {folder}: {e}") from e


def gallery_pictures(gallery, texts) -> list[tuple[str, dict[str, str]]]:
    """(file, text) of each picture a gallery shows, from its value and its texts."""
    return [(item[0], texts[i] if i < len(texts or []) else {}) for i, item in enumerate(gallery or [])]


def chosen_pictures(gallery, texts, selected: int | None) -> list[tuple[str, dict[str, str]]]:
    """The picture chosen in a gallery, or every one when none is."""
    pictures = gallery_pictures(gallery, texts)
    return [pictures[selected]] if selected is not None and selected < len(pictures) else pictures


@dataclass
class GalleryTools:
    """A1111's buttons under a gallery, for the picture chosen in it (the first when none is):
    Send to img2img / inpaint / extras (the picture, and its parameters where `paste_parameters`),
    Save (the chosen picture, or every one when none is chosen, with its text, into
    outputs/save, also when the job saved it already) and Zip (every picture in one .zip there),
    the files written offered for download."""

    gallery: gr.Gallery
    texts: gr.State  # per picture: picture_texts
    selected: gr.State  # the index of the picture chosen in the gallery; None: none
    send: dict[str, gr.Button]  # by PasteTarget label
    save: gr.Button
    zip: gr.Button
    files: gr.File
    log: gr.HTML
    paste_parameters: bool = True

    @classmethod
    def build(cls, prefix: str, gallery: gr.Gallery, paste_parameters: bool = True) -> "GalleryTools":
        """The buttons (A1111's elem_ids) below `gallery`; `wire` makes them work."""
        with gr.Row(elem_id=f"image_buttons_{prefix}"):
            save = gr.Button("Save", size="sm", elem_id=f"save_{prefix}")
            zip_button = gr.Button("Zip", size="sm", elem_id=f"save_zip_{prefix}")
            send = {label: gr.Button(f"Send to {label}", size="sm", elem_id=f"{prefix}_send_to_{label}") for label in SEND_TO}
        files = gr.File(file_count="multiple", interactive=False, show_label=False, visible=False,
                        elem_id=f"download_files_{prefix}")
        log = gr.HTML(elem_id=f"html_log_{prefix}")
        return cls(gallery, gr.State([]), gr.State(None), send, save, zip_button, files, log, paste_parameters)

    def wire(self, ctx) -> None:
        """Choosing a picture, Save and Zip."""

        def select(event: gr.SelectData):
            return event.index

        def save(gallery, texts, selected):
            pictures = chosen_pictures(gallery, texts, selected)
            if not pictures:
                return gr.update(), "<p>Nothing to save: the gallery is empty.</p>"
            folder = ctx.paths.outputs / SAVE_FOLDER
            try:
                saved = [storage.save_png(picture_png(path, text), folder, name_tail(ctx, text)) for path, text in pictures]
            except OSError as e:
                raise gr.Error(str(e))
            names = ", ".join(p.name for p in saved)
            return gr.update(value=[str(p) for p in saved], visible=True), f"<p>Saved: {html.escape(names)}</p>"

        def zip_all(gallery, texts):
            pictures = gallery_pictures(gallery, texts)
            if not pictures:
                return gr.update(), "<p>Nothing to zip: the gallery is empty.</p>"
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:  # stored: PNGs are compressed already
                for index, (path, text) in enumerate(pictures):
                    tail = name_tail(ctx, text)
                    archive.writestr(f"{index:05}{'-' + tail if tail else ''}.png", picture_png(path, text))
            try:
                path = save_zip(buffer.getvalue(), ctx.paths.outputs / SAVE_FOLDER, name_tail(ctx, pictures[0][1]))
            except OSError as e:
                raise gr.Error(str(e))
            return gr.update(value=[str(path)], visible=True), f"<p>Saved: {html.escape(path.name)}</p>"

        self.gallery.select(select, outputs=self.selected, queue=False)
        self.gallery.preview_close(lambda: None, outputs=self.selected, queue=False)
        self.save.click(save, inputs=[self.gallery, self.texts, self.selected], outputs=[self.files, self.log], queue=False)
        self.zip.click(zip_all, inputs=[self.gallery, self.texts], outputs=[self.files, self.log], queue=False)

    def wire_send(self, ctx, targets: list[PasteTarget], tabs: gr.Tabs) -> None:
        """The Send to buttons, once every target tab is built."""

        def first_chosen(gallery, texts, selected):
            pictures = chosen_pictures(gallery, texts, selected)
            if not pictures:
                return None, None
            path, text = pictures[0]
            return (text.get(PARAMETERS) if self.paste_parameters else None), path

        for target in targets:
            if target.label in self.send:
                wire_send(ctx, self.send[target.label], target, tabs, [self.gallery, self.texts, self.selected], first_chosen)


@dataclass
class OutputPanel:
    """The right-hand column of a generating tab: progress, live preview, gallery with its
    buttons, infotext, and the last seed (for the reuse-seed button)."""

    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    tools: GalleryTools
    infotext: gr.HTML
    last_seed: gr.State

    @classmethod
    def build(cls, prefix: str) -> "OutputPanel":
        progress = gr.HTML(elem_id=f"{prefix}_progress")
        preview = gr.Image(label="Preview", visible=False, interactive=False, elem_id=f"{prefix}_preview")
        gallery = gr.Gallery(label="Output", columns=2, elem_id=f"{prefix}_gallery", format="png")
        tools = GalleryTools.build(prefix, gallery)
        return cls(progress, preview, gallery, tools, gr.HTML(elem_id=f"{prefix}_infotext"), gr.State(-1))

    @property
    def components(self) -> list:
        return [self.progress, self.preview, self.gallery, self.infotext, self.last_seed,
                self.tools.texts, self.tools.selected, self.tools.log]

    def stream(self, ctx, job: Job, fn, *args):
        """Generator for a Gradio handler: runs fn(ctx, *args) on the job queue, yields progress
        and preview updates while it runs, then the result's images and infotext; returns the
        result (for `result = yield from panel.stream(...)`)."""
        for kind, payload in run_with_progress(ctx, job, fn, *args):
            if kind == "progress":
                job_now, new_preview, ahead = payload
                yield {self.progress: progress_html(job_now, ahead)} | (
                    {self.preview: gr.update(value=new_preview, visible=True)} if new_preview is not None else {}
                )
            else:
                result = payload
                yield {
                    self.progress: "",
                    self.preview: gr.update(value=None, visible=False),
                    self.gallery: [str(p) for p in result.paths] if result.paths else result.images,
                    self.infotext: infotext_html(result.infotexts),
                    self.last_seed: result.seeds[0] if result.seeds else -1,
                    self.tools.texts: [picture_texts(t) for t in result.infotexts],
                    self.tools.selected: None,
                    self.tools.log: "",
                }
                return result

    @staticmethod
    def show_chosen(texts: list[dict[str, str]], event: gr.SelectData):
        """The infotext and seed of the picture chosen in the gallery, as A1111 shows them."""
        text = texts[event.index].get(PARAMETERS, "") if event.index < len(texts or []) else ""
        seed = parse_infotext(text)[2].get("Seed", "")
        return (infotext_html([text]) if text else gr.update()), (int(seed) if seed.isdigit() else gr.update())


def embeddings_for(ctx, checkpoint: str | None):
    """The embeddings table a job on `checkpoint` would use, without loading it; None while the
    width of its text encoders cannot be known."""
    try:
        spec = ctx.models.spec_of(checkpoint)
    except LookupError:
        spec = None
    width = spec.text_width if spec is not None else ctx.models.loaded_text_width()
    return ctx.embeddings.table(width) if width else None


def token_counter(ctx, text: str | None, steps, checkpoint: str | None, styles=None, *, negative: bool = False) -> str:
    """A1111's "12/75" beside a prompt: the tokens the prompt uses with its styles (the most over
    its AND parts and editing steps, an embedding's vectors each one) over the room the chunks
    of 75 it fills give; a dash while it does not parse."""
    try:
        prompt, negative_prompt = ctx.styles.apply(text or "", text or "", styles)
        table = embeddings_for(ctx, checkpoint)
        steps = int(steps or 1)
        if negative:  # as the pipeline reads it: whole (no AND parts), tags included
            texts = [t for _end, t in prompt_parser.get_prompt_schedule(negative_prompt, steps)]
            count = max(prompt_chunks(t, embeddings=table)[1] for t in texts)
        else:  # its <lora:...> tags are not text
            count = token_count(parse_extra_networks(prompt)[0], steps, table)
    except (ValueError, LookupError):  # PromptError, RequestError (a style gone) are ValueErrors
        return NO_COUNT
    return f"{count}/{math.ceil(max(count, 1) / CHUNK_TOKENS) * CHUNK_TOKENS}"


@dataclass
class PromptArea:
    """The top of a generating tab: prompt and negative prompt with their token counters, with
    whatever `under_prompts` builds below them (its result is `extra`), and the Generate,
    Interrupt and Skip buttons."""

    prompt: gr.Textbox
    negative: gr.Textbox
    extra: object
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button
    prompt_tokens: gr.HTML
    negative_tokens: gr.HTML

    @classmethod
    def build(cls, prefix: str, under_prompts: Callable[[gr.Textbox, gr.Textbox], object] | None = None) -> "PromptArea":
        with gr.Row():
            with gr.Column(scale=4):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{prefix}_prompt", scale=1,
                                        placeholder="Prompt (press Ctrl+Enter to generate)")
                    prompt_tokens = gr.HTML(f"0/{CHUNK_TOKENS}", elem_id=f"{prefix}_token_counter", scale=0, min_width=70)
                with gr.Row():
                    negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_neg_prompt", scale=1)
                    negative_tokens = gr.HTML(f"0/{CHUNK_TOKENS}", elem_id=f"{prefix}_negative_token_counter",
                                              scale=0, min_width=70)
                extra = under_prompts(prompt, negative) if under_prompts else None
            with gr.Column(scale=1, min_width=160):
                generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}_generate")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt", size="sm")
                    skip = gr.Button("Skip", elem_id=f"{prefix}_skip", size="sm")
        return cls(prompt, negative, extra, generate, interrupt, skip, prompt_tokens, negative_tokens)

    def wire_token_counters(self, ctx, steps: gr.Slider, checkpoint: gr.Dropdown, styles: gr.Dropdown | None = None) -> None:
        """Each counter follows its prompt as the person types (and the styles chosen): only the
        last of a burst of keystrokes is counted, without the queue or a progress overlay."""
        for box, counter, negative in ((self.prompt, self.prompt_tokens, False), (self.negative, self.negative_tokens, True)):
            gr.on([box.change, *([styles.change] if styles is not None else [])],
                  functools.partial(token_counter, ctx, negative=negative),
                  inputs=[box, steps, checkpoint, *([styles] if styles is not None else [])], outputs=counter,
                  trigger_mode="always_last", show_progress="hidden", queue=False)


@dataclass
class SeedRow:
    """The seed, with the dice (random: -1) and recycle (the last picture's seed) buttons."""

    seed: gr.Number
    random_seed: gr.Button
    reuse_seed: gr.Button

    @classmethod
    def build(cls, prefix: str) -> "SeedRow":
        with gr.Row():
            seed = gr.Number(value=-1, label="Seed", precision=0, elem_id=f"{prefix}_seed")
            random_seed = gr.Button("🎲", size="sm", min_width=40, elem_id=f"{prefix}_random_seed")
            reuse_seed = gr.Button("♻", size="sm", min_width=40, elem_id=f"{prefix}_reuse_seed")
        return cls(seed, random_seed, reuse_seed)


def wire_generation(ctx, run, inputs: list, out: OutputPanel, area: PromptArea, seed: SeedRow) -> None:
    """The buttons every generating tab has: Generate (and Enter in the prompt) runs
    `run(*values, owner=...)` for the caller, Interrupt and Skip reach the caller's own running
    job, the dice and recycle buttons set the seed, and the gallery's Save and Zip work; a
    picture chosen in the gallery shows its own parameters, whose seed the recycle button takes."""

    def generate(request: gr.Request, *values):
        yield from run(*values, owner=owner_of(request))

    def interrupt(request: gr.Request):
        ctx.jobs.interrupt(owner_of(request))

    def skip(request: gr.Request):
        ctx.jobs.skip(owner_of(request))

    area.generate.click(generate, inputs=inputs, outputs=out.components, concurrency_limit=None)
    area.prompt.submit(generate, inputs=inputs, outputs=out.components, concurrency_limit=None)
    area.interrupt.click(interrupt, queue=False)
    area.skip.click(skip, queue=False)
    seed.random_seed.click(lambda: -1, outputs=seed.seed, queue=False)
    seed.reuse_seed.click(lambda s: s, inputs=out.last_seed, outputs=seed.seed, queue=False)
    out.tools.wire(ctx)
    out.gallery.select(out.show_chosen, inputs=out.tools.texts, outputs=[out.infotext, out.last_seed], queue=False)
