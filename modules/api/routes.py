"""A1111-compatible HTTP routes: JSON -> GenerationRequest -> pipeline.generate -> JSON."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from modules.api import models as api
from modules.api import extensions as extension_routes
from modules.api import postprocessing, system, training
from modules.api.auth import BasicAuth, caller, signed_in
from modules.api.images import decode_bytes, encode_png
from modules.app.errors import RequestError
from modules.app.fields import Bounds, limits
from modules.generation.request import GenerationRequest, Img2ImgRequest
from modules.images import image_info, other_tools
from modules.images.infotext import parse_infotext
from modules.sampling.registry import SAMPLERS
from modules.sampling.schedules import SCHEDULES
from modules.extensions.loader import ExtensionSet
from modules.scripts.library import TABS, ScriptLibrary
from modules.service.auth import SignIn
from modules.service.jobs import Job, JobCancelled, JobFailed, QueueFull

DISCONNECT_POLL_SECONDS = 2.0

# override_settings keys A1111 clients use, and the request field each one sets.
OVERRIDES = {
    "sd_model_checkpoint": "checkpoint",
    "CLIP_stop_at_last_layers": "clip_skip",
    "randn_source": "noise_source",
    "inpainting_mask_weight": "inpainting_mask_weight",
}


def _whole(low: int, high: int):
    rule = Bounds(low, high)
    return lambda ctx, name, value: rule.problem(name, value)


def _true_or_false(ctx, name: str, value) -> str | None:
    return None if isinstance(value, bool) else f"{name} must be true or false, got {value!r}"


def _vae_choice(ctx, name: str, value) -> str | None:
    choices = ["Automatic", "None", *(p.name for p in ctx.models.vaes())]
    return None if value in choices else f"{name} must be one of {', '.join(choices)}, got {value!r}"


# The server's settings (config.json, the Settings tab) by the option names A1111 clients use,
# ours where A1111 has none: option -> (Settings field, what is wrong with a value). The
# checkpoint and the noise source are each caller's own (OVERRIDES); their server defaults come
# from --ckpt and config.json.
SERVER_OPTIONS = {
    "sd_vae": ("sd_vae", _vae_choice),
    "show_progress_every_n_steps": ("live_preview_every", _whole(0, 50)),
    "samples_save": ("save_images", _true_or_false),
    "filename_prompt_max": ("filename_prompt_max", _whole(0, 200)),
    "ESRGAN_tile": ("upscaler_tile", _whole(0, 512)),
    "ESRGAN_tile_overlap": ("upscaler_tile_overlap", _whole(0, 64)),
}


def request_from_body(body: api.Txt2ImgBody, chosen: dict | None = None) -> GenerationRequest:
    return GenerationRequest(**_generation_fields(body, chosen or {}))


def img2img_request_from_body(body: api.Img2ImgBody, chosen: dict | None = None) -> Img2ImgRequest:
    fields = _generation_fields(body, chosen or {})
    if "mask_blur" not in body.model_fields_set:
        across, down = (Img2ImgRequest.mask_blur if blur is None else blur for blur in (body.mask_blur_x, body.mask_blur_y))
        if across != down:
            raise RequestError("different horizontal and vertical mask blur is not supported; send mask_blur")
        fields["mask_blur"] = across
    return Img2ImgRequest(**fields)


def _generation_fields(body: api.GenerationApiFields, chosen: dict) -> dict:
    """The request fields of a /txt2img or /img2img body, with what the caller's own `chosen`
    options (POST /options) and, over them, the body's override_settings set."""
    fields = body.request_fields()
    if not body.sampler_name or "sampler_name" not in body.model_fields_set:  # older clients name it sampler_index
        fields["sampler_name"] = body.sampler_index or GenerationRequest.sampler_name
    for key, value in _normalized({**chosen, **body.override_settings}).items():
        if key in OVERRIDES:
            fields[OVERRIDES[key]] = value
    return fields


def _normalized(options: dict) -> dict:
    """A1111 clients write the noise source in either case."""
    source = options.get("randn_source")
    return {**options, "randn_source": source.upper()} if isinstance(source, str) else options


def create_router(ctx, scripts: ScriptLibrary) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    async def finished(job: Job, future, http: Request):
        """The job's result; a client that goes away while its job waits takes the job out of the queue."""
        waiting = asyncio.wrap_future(future)
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if not future.running() and await http.is_disconnected():  # still waiting, and nobody to answer
                ctx.jobs.cancel(job)
        return waiting.result()

    async def run(make_request, body: api.GenerationApiFields, parameters: dict, http: Request):
        """Async, so that a request waiting in the job queue holds no server thread: however many
        wait, the queue (not the thread pool) decides the order, and /progress stays quick."""
        user = signed_in(http)

        def prepare():  # decoding pictures is work for a thread
            request = make_request(body, ctx.preferences.of(user)).validate()
            return request, scripts.job(ctx, request.mode, body.script_name, body.script_args, body.alwayson_scripts)

        try:
            request, work = await run_in_threadpool(prepare)
        except (RequestError, TypeError) as e:
            raise HTTPException(422, str(e))
        try:
            job = Job(description=f"{request.mode} (api)", owner=caller(http))
            result = await finished(job, ctx.jobs.submit(job, work, ctx, request, save=body.save_images), http)
        except JobCancelled as e:
            raise HTTPException(409, str(e))
        except LookupError as e:
            raise HTTPException(404, str(e))
        except ValueError as e:
            raise HTTPException(422, str(e))
        if not body.override_settings_restore_afterwards:  # only overrides that made a picture
            ctx.preferences.choose(user, **{k: v for k, v in body.override_settings.items() if k in OVERRIDES})
        info = {
            "prompt": result.request.prompt,
            "negative_prompt": result.request.negative_prompt,
            "seed": result.seeds[0] if result.seeds else result.request.seed,
            "all_seeds": result.seeds,
            "subseed": result.request.subseed,
            "all_subseeds": result.request.subseeds()[:len(result.seeds)],
            "subseed_strength": result.request.subseed_strength,
            "seed_resize_from_w": result.request.seed_resize_from_w,
            "seed_resize_from_h": result.request.seed_resize_from_h,
            "sampler_name": result.request.sampler_name,
            "scheduler": result.request.scheduler,
            "steps": result.request.steps,
            "cfg_scale": result.request.cfg_scale,
            "width": result.request.width,
            "height": result.request.height,
            "denoising_strength": result.request.strength_used,
            "infotexts": result.infotexts,
            "interrupted": result.interrupted,
        }
        images = await run_in_threadpool(lambda: [encode_png(i, t) for i, t in zip(result.images, result.infotexts)]
                                         if body.send_images else [])
        return api.ImagesResponse(images=images, parameters=parameters, info=json.dumps(info))

    @router.post("/txt2img", response_model=api.ImagesResponse)
    async def txt2img(body: api.Txt2ImgBody, http: Request):
        return await run(request_from_body, body, body.model_dump(), http)

    @router.post("/img2img", response_model=api.ImagesResponse)
    async def img2img_route(body: api.Img2ImgBody, http: Request):
        # As A1111: the (large) pictures are echoed back only when asked for.
        parameters = body.model_dump(exclude=set() if body.include_init_images else {"init_images", "mask"})
        return await run(img2img_request_from_body, body, parameters, http)

    @router.get("/scripts", response_model=api.ScriptsResponse)
    def script_titles():
        """The selectable scripts of each tab, lowercase as A1111 lists them."""
        return api.ScriptsResponse(**{tab: [s.title.lower() for s in scripts.of(tab, always_on=False)] for tab in TABS})

    @router.get("/script-info", response_model=list[api.ScriptInfoItem])
    def script_info():
        return [api.ScriptInfoItem(name=s.title.lower(), is_alwayson=s.always_on, is_img2img=tab == "img2img",
                                   args=[api.ScriptArgItem(label=a.label, value=a.value, minimum=a.minimum, maximum=a.maximum,
                                                           step=a.step, choices=list(a.choices) or None) for a in s.args])
                for tab in TABS for s in scripts.of(tab)]

    @router.get("/samplers", response_model=list[api.SamplerItem])
    def samplers():
        return [api.SamplerItem(name=s.name, aliases=list(s.aliases), options=s.options) for s in SAMPLERS]

    @router.get("/schedulers", response_model=list[api.SchedulerItem])
    def schedulers():
        return [api.SchedulerItem(name=s.name, label=s.label) for s in SCHEDULES]

    @router.get("/sd-models", response_model=list[api.ModelItem])
    def sd_models():
        return [
            api.ModelItem(title=c.title, model_name=c.name, hash=None, sha256=None, filename=str(c.path),
                          config=str(c.config) if c.config else None)
            for c in ctx.models.checkpoints()
        ]

    @router.post("/refresh-checkpoints")
    def refresh_checkpoints():
        return {"checkpoints": [c.title for c in ctx.models.checkpoints()]}

    @router.get("/options")
    def get_options(http: Request):
        """The per-request options as the caller's requests get them (their own choices, else
        the server's defaults), and the server's settings."""
        default = ctx.models.default_checkpoint()
        return {"sd_model_checkpoint": default.title if default else None,
                "CLIP_stop_at_last_layers": GenerationRequest.clip_skip, "randn_source": ctx.settings.noise_source,
                "inpainting_mask_weight": Img2ImgRequest.inpainting_mask_weight,
                **{name: getattr(ctx.settings, field) for name, (field, _) in SERVER_OPTIONS.items()},
                **ctx.preferences.of(signed_in(http))}

    @router.post("/options")
    def set_options(options: dict, http: Request):
        """Sets the caller's own choices, nobody else's, and the server's settings (saved in
        config.json). Every value is checked before any is set. A name this server does not know
        is refused, so that no client believes an option took that did not. A checkpoint is
        loaded by the first job that uses it, in the queue, never beside a running job."""
        unknown = [key for key in options if key not in OVERRIDES and key not in SERVER_OPTIONS]
        if unknown:
            raise HTTPException(422, f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                     f"this server has {', '.join([*OVERRIDES, *SERVER_OPTIONS])}")
        chosen = _normalized({key: value for key, value in options.items() if key in OVERRIDES})
        fields = {f.name: f for f in dataclasses.fields(Img2ImgRequest)}
        for key, value in chosen.items():
            rule = limits(fields[OVERRIDES[key]])
            problem = rule.problem(key, value) if rule else None
            if problem:
                raise HTTPException(422, problem)
        settings = {}
        for key, value in options.items():
            if key in SERVER_OPTIONS:
                field, check = SERVER_OPTIONS[key]
                problem = check(ctx, key, value)
                if problem:
                    raise HTTPException(422, problem)
                settings[field] = value
        if "sd_model_checkpoint" in chosen:
            try:
                chosen["sd_model_checkpoint"] = ctx.models.find_checkpoint(str(chosen["sd_model_checkpoint"])).title
            except LookupError as e:
                raise HTTPException(404, str(e))
        ctx.preferences.choose(signed_in(http), **chosen)
        if settings:
            ctx.update_settings(**settings)
        return get_options(http)

    @router.get("/embeddings", response_model=api.EmbeddingsResponse)
    def embeddings():
        def item(e):
            return api.EmbeddingItem(step=e.step, sd_checkpoint=e.sd_checkpoint, sd_checkpoint_name=e.sd_checkpoint_name,
                                     shape=e.width, vectors=e.count)

        loaded, skipped = ctx.embeddings.split(ctx.models.loaded_text_width())
        return api.EmbeddingsResponse(loaded={n: item(e) for n, e in loaded.items()},
                                      skipped={n: item(e) for n, e in skipped.items()})

    @router.get("/prompt-styles", response_model=list[api.PromptStyleItem])
    def prompt_styles():
        return [api.PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
                for s in ctx.styles.styles().values()]

    @router.get("/loras", response_model=list[api.LoraItem])
    def loras():
        return [api.LoraItem(name=name, alias=name, path=str(path), metadata={})
                for name, path in ctx.loras.available().items() if name == path.stem]

    @router.get("/progress", response_model=api.ProgressResponse)
    def progress(http: Request, skip_current_image: bool = False):
        """The caller's own job: the running one, or while it waits, its place in the queue."""
        jobs = ctx.jobs.jobs_of(caller(http))
        job = jobs[0] if jobs else None
        ahead = ctx.jobs.ahead_of(job) if job is not None else None
        running = job is not None and ahead is None and not job.finished
        image = None
        if running and job.preview is not None and not skip_current_image:
            image = encode_png(job.preview, None)
        waiting = f"Queued: {ahead} job{'s' if ahead != 1 else ''} ahead" if ahead is not None else None
        return api.ProgressResponse(
            progress=job.progress if running else 0.0,
            eta_relative=(job.eta or 0.0) if running else 0.0,
            state=api.ProgressState(
                skipped=bool(running and job.skipped),
                interrupted=bool(running and job.interrupted),
                job=job.description if job is not None else "",
                job_count=len(jobs),
                sampling_step=job.step if running else 0,
                sampling_steps=job.total_steps if running else 0,
            ),
            current_image=image,
            textinfo=waiting or (job.status if running else None),
        )

    @router.post("/interrupt")
    def interrupt(http: Request):
        """Interrupts the caller's own running job, nobody else's."""
        ctx.jobs.interrupt(caller(http))
        return {}

    @router.post("/skip")
    def skip(http: Request):
        ctx.jobs.skip(caller(http))
        return {}

    @router.post("/png-info", response_model=api.PngInfoResponse)
    def png_info(body: api.PngInfoBody):
        """A1111's answer; for another tool's picture, `info` and `parameters` hold what maps onto
        this web UI's parameters, and `items` all the text the tool wrote."""
        image, info = image_info.read_bytes(decode_bytes(body.image), "image")
        if info.error and not info.parameters:
            raise HTTPException(422, info.error)
        tool = other_tools.read(info, image.size if image is not None else None)
        text, items = info.parameters, info.items
        if tool is not None:
            text, items = tool.infotext, {**({image_info.PARAMETERS: info.parameters} if info.parameters else {}), **items}
        prompt, negative, params = parse_infotext(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **params} if text else {}
        return api.PngInfoResponse(info=text, items=items, parameters=parameters, tool=tool and tool.tool,
                                   not_mapped=list(tool.not_mapped) if tool else [], error=tool and tool.error)

    training.add_routes(router, ctx)
    return router


def _finite(value):
    """`value` with NaN and the infinities, which JSON has no words for, as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


class JSONBody(JSONResponse):
    """A JSON response that always encodes, whatever a client sent and hears back (in a body's
    echo or a refusal that quotes it): a lone surrogate, which UTF-8 cannot hold, is written as
    its \\u escape, as the client wrote it; NaN or an infinity (Python's JSON reader takes them) as text."""

    def render(self, content) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # UnicodeEncodeError is one
            return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def install(app: FastAPI, ctx, sign_in: SignIn | None = None, scripts: ScriptLibrary | None = None,
            extensions: ExtensionSet | None = None) -> None:
    """The /sdapi/v1 routes on `app`; with `sign_in`, each asks for HTTP Basic credentials.
    `scripts`: the app's script library (default: the built-in scripts); `extensions`: the
    extensions found at start, listed, with their own routes."""
    if sign_in is not None:
        app.add_middleware(BasicAuth, sign_in=sign_in)
    app.include_router(create_router(ctx, scripts or ScriptLibrary.builtin()), default_response_class=JSONBody)
    if extensions is not None:
        app.include_router(extension_routes.create_router(extensions), default_response_class=JSONBody)
        extension_routes.mount(app, extensions)
    app.include_router(postprocessing.create_router(ctx), default_response_class=JSONBody)
    app.include_router(system.create_router(ctx), default_response_class=JSONBody)

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, error: QueueFull):
        return JSONBody(status_code=429, content={"error": "QueueFull", "detail": str(error)}, headers={"Retry-After": "10"})

    @app.exception_handler(JobFailed)
    async def job_failed(_: Request, error: JobFailed):  # the server's fault, not the request's: try again later
        return JSONBody(status_code=503, content={"error": "JobFailed", "detail": str(error)}, headers={"Retry-After": "10"})

    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError):
        return JSONBody(status_code=422, content={"error": "RequestError", "detail": str(error)})

    # FastAPI's own answers, in a response that encodes whatever they quote.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return JSONBody(status_code=error.status_code, content={"detail": error.detail}, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError):
        return JSONBody(status_code=422, content={"detail": jsonable_encoder(error.errors())})
