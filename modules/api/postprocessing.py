"""A1111's postprocessing routes: /extra-single-image, /extra-batch-images, /upscalers and
/latent-upscale-modes. As in A1111, the API returns the pictures and saves nothing."""

from __future__ import annotations

import html
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request

from modules.api import models as api
from modules.api.auth import caller
from modules.api.images import decode_image, encode_bytes
from modules.postprocess import extras
from modules.postprocess.upscalers import LATENT_UPSCALE_MODES
from modules.service.jobs import Job


def request_from_body(body: api.ExtrasBody) -> extras.ExtrasRequest:
    # upscale_first is taken and, as in A1111, changes nothing: faces are restored after upscaling.
    return extras.ExtrasRequest(**body.request_fields())


def read_input(data: str, name: str) -> extras.ExtrasInput:
    return extras.ExtrasInput(decode_image(data, name or "image"), Path(name).stem if name else "")


def create_router(ctx) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    def run(body: api.ExtrasBody, inputs: list[extras.ExtrasInput], owner: str) -> extras.ExtrasResult:
        try:
            request = request_from_body(body).validate(ctx.upscalers.names())
            return ctx.jobs.run(Job(description="extras (api)", owner=owner), extras.run, ctx, request, inputs, save=False)
        except (ValueError, LookupError, OSError) as e:
            raise HTTPException(422, str(e))

    def html_info(result: extras.ExtrasResult) -> str:
        return f"<p>{html.escape(result.infotexts[0])}</p>" if result.infotexts else ""

    @router.post("/extra-single-image", response_model=api.ExtrasSingleImageResponse)
    def extra_single_image(body: api.ExtrasSingleImageBody, http: Request):
        result = run(body, [read_input(body.image, "image")], caller(http))
        return api.ExtrasSingleImageResponse(html_info=html_info(result), image=encode_bytes(result.pngs[0]))

    @router.post("/extra-batch-images", response_model=api.ExtrasBatchImagesResponse)
    def extra_batch_images(body: api.ExtrasBatchImagesBody, http: Request):
        result = run(body, [read_input(item.data, item.name) for item in body.imageList], caller(http))
        return api.ExtrasBatchImagesResponse(html_info=html_info(result), images=[encode_bytes(png) for png in result.pngs])

    @router.get("/upscalers", response_model=list[api.UpscalerItem])
    def upscalers():
        return [
            api.UpscalerItem(name=u.name, model_name=u.folder, model_path=str(u.path) if u.path else None, model_url=None, scale=u.scale)
            for u in ctx.upscalers.all()
        ]

    @router.get("/latent-upscale-modes", response_model=list[api.LatentUpscaleModeItem])
    def latent_upscale_modes():
        return [api.LatentUpscaleModeItem(name=m.name) for m in LATENT_UPSCALE_MODES]

    return router
