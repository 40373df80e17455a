"""/sdapi/v1/create/embedding and /sdapi/v1/train/embedding, with A1111's field names."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel

from modules.api.auth import caller, signed_in
from modules.api.models import RequestBody, request_body
from modules.service.jobs import Job
from modules.training import textual_inversion as ti


class CreateEmbeddingBody(BaseModel):
    name: str
    num_vectors_per_token: int = 1
    init_text: str = "*"
    overwrite_old: bool = False


class TrainingApiFields(RequestBody):
    """What /train/embedding takes beside the training options; A1111 clients also send
    hypernetwork-era fields, which are ignored."""

    training_height: int | None = None  # pictures are trained square: equal to training_width, or absent


TrainEmbeddingBody = request_body(
    "TrainEmbeddingBody", ti.TrainingOptions, base=TrainingApiFields,
    api_names={"embedding": "embedding_name", "dataset": "data_root", "template": "template_filename",
               "gradient_steps": "gradient_step", "size": "training_width", "save_every": "save_embedding_every",
               "preview_every": "create_image_every", "tag_dropout": "tag_drop_out",
               "latent_sampling": "latent_sampling_method"},
    api_types={"dataset": str, "template": str},  # a folder on the server, a template file's name
    api_defaults={"template": "subject_filewords.txt", "preview_every": 0},
    leave_out=("clip_skip", "seed"),
    doc="A1111's /sdapi/v1/train/embedding body.",
)


def add_routes(router: APIRouter, ctx) -> None:
    def checkpoint(http: Request) -> str | None:
        return ctx.preferences.of(signed_in(http)).get("sd_model_checkpoint")

    @router.post("/create/embedding")
    def create_embedding(body: CreateEmbeddingBody, http: Request):
        job = Job(description="create embedding (api)", owner=caller(http))
        try:  # queued: it may load the checkpoint
            path = ctx.jobs.run(job, lambda job: ti.create_in_app(ctx, body.name, body.init_text, body.num_vectors_per_token,
                                                                  overwrite=body.overwrite_old, checkpoint=checkpoint(http)))
        except LookupError as e:
            raise HTTPException(404, str(e))
        except ti.TrainingError as e:
            raise HTTPException(422, str(e))
        return {"info": f"create embedding filename: {path}"}

    @router.post("/train/embedding")
    def train_embedding(body: TrainEmbeddingBody, http: Request):
        if body.training_height not in (None, body.training_width):
            raise HTTPException(422, "training_width and training_height must be equal: pictures are trained square")
        templates = ti.template_files(ctx.paths.ti_templates)
        if body.template_filename not in templates:
            raise HTTPException(422, f"template_filename {body.template_filename!r} not found; known: {', '.join(templates)}")
        try:
            options = ti.TrainingOptions(**{
                **body.request_fields(), "dataset": Path(body.data_root), "template": templates[body.template_filename],
            }).validate()
            # Refused here as well as in train_in_app, so that a folder outside waits for no queue.
            ctx.paths.server_folder(body.data_root, "data_root")
            job = Job(description="train embedding (api)", owner=caller(http))
            result = ctx.jobs.run(job, ti.train_in_app, ctx, options, checkpoint(http))
        except LookupError as e:
            raise HTTPException(404, str(e))
        except ValueError as e:
            raise HTTPException(422, str(e))
        return {"info": f"train embedding complete: filename: {result.path} step: {result.step} "
                        f"interrupted: {result.interrupted} error: None"}
