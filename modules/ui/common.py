"""Pieces every generating tab shares: running a job in the background while reporting progress, and error text."""

from __future__ import annotations

import html
import logging
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.service.jobs import Job, QueueFull

log = logging.getLogger(__name__)

POLL_SECONDS = 0.4
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


@dataclass
class OutputPanel:
    """The right-hand column of a generating tab: progress, live preview, gallery, infotext, and
    the last seed (for the reuse-seed button)."""

    progress: gr.HTML
    preview: gr.Image
    gallery: gr.Gallery
    infotext: gr.HTML
    last_seed: gr.State

    @classmethod
    def build(cls, prefix: str) -> "OutputPanel":
        return cls(
            progress=gr.HTML(elem_id=f"{prefix}_progress"),
            preview=gr.Image(label="Preview", visible=False, interactive=False, elem_id=f"{prefix}_preview"),
            gallery=gr.Gallery(label="Output", columns=2, elem_id=f"{prefix}_gallery", format="png"),
            infotext=gr.HTML(elem_id=f"{prefix}_infotext"),
            last_seed=gr.State(-1),
        )

    @property
    def components(self) -> list:
        return [self.progress, self.preview, self.gallery, self.infotext, self.last_seed]

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
                }
                return result


@dataclass
class PromptArea:
    """The top of a generating tab: prompt and negative prompt, with whatever `under_prompts`
    builds below them (its result is `extra`), and the Generate, Interrupt and Skip buttons."""

    prompt: gr.Textbox
    negative: gr.Textbox
    extra: object
    generate: gr.Button
    interrupt: gr.Button
    skip: gr.Button

    @classmethod
    def build(cls, prefix: str, under_prompts: Callable[[gr.Textbox, gr.Textbox], object] | None = None) -> "PromptArea":
        with gr.Row():
            with gr.Column(scale=4):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{prefix}_prompt",
                                    placeholder="Prompt (press Ctrl+Enter to generate)")
                negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{prefix}_neg_prompt")
                extra = under_prompts(prompt, negative) if under_prompts else None
            with gr.Column(scale=1, min_width=160):
                generate = gr.Button("Generate", variant="primary", elem_id=f"{prefix}_generate")
                with gr.Row():
                    interrupt = gr.Button("Interrupt", elem_id=f"{prefix}_interrupt", size="sm")
                    skip = gr.Button("Skip", elem_id=f"{prefix}_skip", size="sm")
        return cls(prompt, negative, extra, generate, interrupt, skip)


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
    job, the dice and recycle buttons set the seed."""

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
