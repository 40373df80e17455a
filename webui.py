"""Builds the app: one AppContext, the Gradio tabs and the /sdapi/v1 routes on one FastAPI server."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gradio as gr
import torch
import uvicorn
from fastapi import FastAPI

from modules.api import routes
from modules.app.config import Flags, parse_flags
from modules.context import AppContext
from modules.extensions.loader import ExtensionSet
from modules.scripts.library import ScriptLibrary
from modules.service import auth
from modules.service.jobs import Job
from modules.ui import extensions as extensions_tab
from modules.ui import extras as extras_tab
from modules.ui import img2img as img2img_tab
from modules.ui import merger as merger_tab
from modules.ui import png_info as png_info_tab
from modules.ui import settings as settings_tab
from modules.ui import train as train_tab
from modules.ui import txt2img as txt2img_tab
from modules.ui.common import error_message, user_of
from modules.ui.paste import PasteTarget
from modules.ui.scripts import extension_tab

log = logging.getLogger("webui")

CSS = """
.progress-bar { height: 8px; background: var(--neutral-200); border-radius: 4px; overflow: hidden; }
.progress-fill { height: 100%; background: var(--color-accent); transition: width .3s; }
.progress-text { font-size: 0.85em; margin-top: 4px; }
pre.infotext { white-space: pre-wrap; font-size: 0.85em; }
"""
LOGIN_MESSAGE = (f"After {auth.Throttle.LIMIT} wrong passwords within {auth.Throttle.WINDOW:.0f} seconds, "
                 "sign-in from that address pauses for a while.")


def build_ui(ctx: AppContext, scripts: ScriptLibrary, extensions: ExtensionSet) -> gr.Blocks:
    default = ctx.models.default_checkpoint()
    if default and ctx.generator is None:  # loaded before the server takes jobs, so that the first Generate is quick
        try:
            # As a job, on the queue's worker like every load: once the main thread has run torch too,
            # the worker's OpenMP work ran on about one core where it had two (1.0 against 0.45 s a job).
            ctx.jobs.run(Job(description="load the default checkpoint"), lambda job: ctx.models.get(default.title))
        except Exception as e:  # a broken file must not stop the UI from starting
            log.error("could not load checkpoint %s: %s", default.title, error_message(e))
    with gr.Blocks(title="Stable Diffusion") as demo:
        with gr.Row():
            checkpoint = gr.Dropdown(
                [c.title for c in ctx.models.checkpoints()],
                value=default.title if default else None,
                label="Stable Diffusion checkpoint",
                elem_id="sd_checkpoint",
                scale=4,
            )
            refresh = gr.Button("🔄", size="sm", min_width=40, elem_id="sd_checkpoint_refresh", scale=0)
            model_status = gr.Markdown(elem_id="sd_checkpoint_status")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                fields, txt2img_gallery = txt2img_tab.build(ctx, checkpoint, scripts, extensions.accordions("txt2img"))
            with gr.Tab("img2img", id="img2img"):
                img2img_target, inpaint_target, img2img_gallery = img2img_tab.build(
                    ctx, checkpoint, scripts, extensions.accordions("img2img"))
            with gr.Tab("Extras", id="extras"):
                extras_target, extras_gallery = extras_tab.build(ctx)
            with gr.Tab("PNG Info", id="pnginfo"):
                png_info_tab.build(ctx, [PasteTarget("txt2img", "txt2img", fields), img2img_target, inpaint_target, extras_target], tabs)
            with gr.Tab("Checkpoint Merger", id="modelmerger"):
                merger_tab.build(ctx, checkpoint)
            with gr.Tab("Train", id="train"):
                train_tab.build(ctx, checkpoint)
            for extension in extensions.running():
                for title, build in extension.tabs:
                    with gr.Tab(title):
                        extension_tab(extension.name, title, build)
            with gr.Tab("Settings", id="settings"):
                settings_tab.build(ctx)
            with gr.Tab("Extensions", id="extensions"):
                extensions_tab.build(extensions)

        # The Send to buttons under each gallery, now that the tabs they send to are built.
        for gallery in (txt2img_gallery, img2img_gallery, extras_gallery):
            gallery.wire_send(ctx, [img2img_target, inpaint_target, extras_target], tabs)

        def on_refresh(current):
            titles = [c.title for c in ctx.models.checkpoints()]
            return gr.update(choices=titles, value=current if current in titles else (titles[0] if titles else None))

        # txt2img's and img2img's width and height follow the checkpoint's native size.
        sizes = [fields["width"], fields["height"], img2img_target.fields["width"], img2img_target.fields["height"]]

        def native_size(name: str | None) -> tuple:
            spec = ctx.models.spec_of(name)
            return (spec.resolution,) * len(sizes) if spec else (gr.update(),) * len(sizes)

        def on_select(name, http: gr.Request):
            """The caller's own choice: their jobs name it, and the first of them loads it in the queue."""
            try:
                title = ctx.models.find_checkpoint(name).title
            except LookupError as e:
                return *(gr.update(),) * len(sizes), f"⚠ {error_message(e)}"
            ctx.preferences.choose(user_of(http), sd_model_checkpoint=title)
            return *native_size(title), ""

        def on_load(http: gr.Request):
            """A returning user finds their own checkpoint chosen, with its native size."""
            chosen = ctx.preferences.of(user_of(http)).get("sd_model_checkpoint")
            titles = [c.title for c in ctx.models.checkpoints()]
            title = chosen if chosen in titles else (default.title if default else None)
            return gr.update(value=title), *native_size(title)

        refresh.click(on_refresh, inputs=checkpoint, outputs=checkpoint, queue=False)
        checkpoint.input(on_select, inputs=checkpoint, outputs=[*sizes, model_status], queue=False)
        demo.load(on_load, outputs=[checkpoint, *sizes], queue=False)
    return demo


def create_app(flags: Flags, sign_ins: auth.SignIns | None = None) -> tuple[FastAPI, AppContext]:
    sign_ins = sign_ins or auth.SignIns.from_flags(flags)
    if flags.threads:
        torch.set_num_threads(flags.threads)
    generator = None
    if flags.workers or flags.ray_address:
        from modules.scaleout.ray_serve import RayServeBackend  # Ray is imported only when asked for

        generator = RayServeBackend.start(flags)
    ctx = AppContext.create(flags, generator)
    scripts = ScriptLibrary.builtin()
    extensions = ExtensionSet(ctx.paths.extensions, ctx.paths.extensions_file).load(scripts, ctx.hooks)
    app = FastAPI(title="Stable Diffusion web UI")
    if flags.api:
        routes.install(app, ctx, sign_ins.api, scripts, extensions)
    demo = build_ui(ctx, scripts, extensions)
    demo.queue(default_concurrency_limit=4)
    login = {}
    if sign_ins.ui:
        app.add_middleware(auth.ClientAddress)  # the login callable slows failures down by address
        login = dict(auth=sign_ins.ui.gradio_login, auth_message=LOGIN_MESSAGE)
    app = gr.mount_gradio_app(app, demo, path="/", css=CSS, footer_links=["api"], **login)
    return app, ctx


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flags = parse_flags(argv)
    try:
        sign_ins = auth.SignIns.from_flags(flags)
    except auth.AuthError as e:
        raise SystemExit(f"launch.py: error: {e}") from None
    for door in sign_ins.open_doors(flags):
        log.warning("listening on %s:%d without sign-in: anyone who can reach it can use %s", flags.host, flags.port, door)
    app, _ = create_app(flags, sign_ins)
    print(f"Running on http://{flags.host}:{flags.port}", flush=True)
    # The server object itself, so that POST /sdapi/v1/server-stop (--api-server-stop) can end it;
    # an open browser tab holds a stream open, which the stop waits for only so long.
    config = uvicorn.Config(app, host=flags.host, port=flags.port, log_level="warning", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    app.state.server = server
    server.run()


if __name__ == "__main__":
    main()
