"""Pieces every generating tab shares: running a job in the background while reporting progress, and error text."""

from __future__ import annotations

import html
import logging
import time

import gradio as gr

from modules.jobs import Job

log = logging.getLogger(__name__)

POLL_SECONDS = 0.4
# Errors whose message is already written for a person; anything else is a bug and is logged in full.
PEOPLE_ERRORS = (ValueError, LookupError, OSError)

def progress_html(job: Job) -> str:
    if job.finished:
        return ""
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
    (which only flip flags on the job) take effect at the next step.
    """
    future = ctx.jobs.submit(job, fn, ctx, *args)
    last_preview = -1
    while not future.done():
        time.sleep(POLL_SECONDS)
        preview = job.preview if job.preview_id != last_preview else None
        last_preview = job.preview_id
        yield "progress", (job, preview)
    error = future.exception()
    if error is not None:
        raise gr.Error(error_message(error))
    yield "done", future.result()
