"""/sdapi/v1/create/embedding and /sdapi/v1/train/embedding, with A1111's field names."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict

from modules.service.jobs import Job
from modules.training import textual_inversion as ti


class CreateEmbeddingBody(BaseModel):
    name: str
    num_vectors_per_token: int = 1
    init_text: str = "*"
    overwrite_old: bool = False


class TrainEmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # A1111 clients also send hypernetwork-era fields

    embedding_name: str
    data_root: str
    template_filename: str = "subject_filewords.txt"
    learn_rate: str = "0.005"
    batch_size: int = 1
    gradient_step: int = 1
    training_width: int = 512
    training_height: int | None = None
    steps: int = 1000
    save_embedding_every: int = 500
    create_image_every: int = 0
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    latent_sampling_method: str = "once"


def add_routes(router: APIRouter, ctx) -> None:
    @router.post("/create/embedding")
    def create_embedding(body: CreateEmbeddingBody):
        try:
            path = ti.create_in_app(ctx, body.name, body.init_text, body.num_vectors_per_token, overwrite=body.overwrite_old)
        except ti.TrainingError as e:
            raise HTTPException(422, str(e))
        return {"info": f"create embedding filename: {path}"}

    @router.post("/train/embedding")
    def train_embedding(body: TrainEmbeddingBody):
        if body.training_height not in (None, body.training_width):
            raise HTTPException(422, "training_width and training_height must be equal: pictures are trained square")
        templates = ti.template_files(ctx.paths.ti_templates)
        if body.template_filename not in templates:
            raise HTTPException(422, f"template_filename {body.template_filename!r} not found; known: {', '.join(templates)}")
        try:
            options = ti.TrainingOptions(
                embedding=body.embedding_name, dataset=Path(body.data_root), template=templates[body.template_filename],
                learn_rate=body.learn_rate, batch_size=body.batch_size, gradient_steps=body.gradient_step,
                size=body.training_width, steps=body.steps, save_every=body.save_embedding_every,
                preview_every=body.create_image_every, shuffle_tags=body.shuffle_tags, tag_dropout=body.tag_drop_out,
                latent_sampling=body.latent_sampling_method,
            ).validate()
            result = ctx.jobs.run(Job(description="train embedding (api)"), ti.train_in_app, ctx, options)
        except ValueError as e:
            raise HTTPException(422, str(e))
        return {"info": f"train embedding complete: filename: {result.path} step: {result.step} "
                        f"interrupted: {result.interrupted} error: None"}
