"""The Train tab: create a textual-inversion embedding, then train it on a folder of pictures."""

from __future__ import annotations

import html

import gradio as gr

from modules.service.jobs import Job, QueueFull
from modules.training import textual_inversion as ti
from modules.training.ti_dataset import LATENT_SAMPLING
from modules.ui.common import owner_of, progress_html, run_with_progress

DEFAULT_TEMPLATE = "subject_filewords.txt"


def result_text(result: ti.TrainingResult) -> str:
    how = "Interrupted" if result.interrupted else "Finished"
    loss = f", last loss {result.loss:.4f}" if result.loss is not None else ""
    return (f"{how} at step {result.step} after {result.seconds:.0f} s{loss}. "
            f"Saved to `{result.path}`" + (f"; {len(result.previews)} preview images." if result.previews else "."))


def build(ctx, checkpoint: gr.Dropdown) -> None:
    """The Train tab; `checkpoint` is the page's checkpoint dropdown, whose model trains."""
    resolution = ctx.models.loaded_resolution() or 512
    templates = ti.template_files(ctx.paths.ti_templates)
    with gr.Tab("Create embedding"):
        name = gr.Textbox(label="Name", elem_id="train_embedding_name")
        init_text = gr.Textbox(label="Initialization text", value="*", elem_id="train_embedding_init_text")
        vectors = gr.Slider(1, ti.MAX_VECTORS, value=1, step=1, label="Number of vectors per token", elem_id="train_embedding_vectors")
        file_format = gr.Radio(list(ti.EMBEDDING_SUFFIXES), value=".pt", label="File format", elem_id="train_embedding_format")
        overwrite = gr.Checkbox(label="Overwrite old embedding", elem_id="train_embedding_overwrite")
        create = gr.Button("Create embedding", variant="primary", elem_id="train_create_embedding")
        create_status = gr.Markdown(elem_id="train_create_status")
    with gr.Tab("Train"):
        with gr.Row():
            embedding = gr.Dropdown(ti.embedding_names(ctx.paths.embeddings), label="Embedding", elem_id="train_embedding", scale=4)
            refresh = gr.Button("🔄", size="sm", min_width=40, scale=0, elem_id="train_embedding_refresh")
        learn_rate = gr.Textbox(label="Embedding learning rate", value="0.005", elem_id="train_learn_rate",
                                info="A number, or a schedule such as 0.005:100, 1e-3:1000, 1e-5")
        with gr.Row():
            batch_size = gr.Number(label="Batch size", value=1, precision=0, elem_id="train_batch_size")
            gradient_steps = gr.Number(label="Gradient accumulation steps", value=1, precision=0, elem_id="train_gradient_steps")
        dataset = gr.Textbox(label="Dataset directory", placeholder="Folder of images, with optional .txt captions beside them", elem_id="train_dataset")
        template = gr.Dropdown(list(templates), value=DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in templates else next(iter(templates), None), label="Prompt template", elem_id="train_template")
        size = gr.Slider(64, 2048, value=resolution, step=8, label="Width and height", elem_id="train_size")
        with gr.Row():
            steps = gr.Number(label="Max steps", value=1000, precision=0, elem_id="train_steps")
            save_every = gr.Number(label="Save a copy of the embedding every N steps (0: off)", value=500, precision=0, elem_id="train_save_every")
            preview_every = gr.Number(label="Save an image every N steps (0: off)", value=500, precision=0, elem_id="train_preview_every")
        with gr.Row():
            shuffle_tags = gr.Checkbox(label="Shuffle tags by ',' when creating prompts", elem_id="train_shuffle_tags")
            tag_dropout = gr.Slider(0, 1, value=0, step=0.1, label="Drop out tags when creating prompts", elem_id="train_tag_dropout")
        latent_sampling = gr.Radio(list(LATENT_SAMPLING), value="once", label="Latent sampling method", elem_id="train_latent_sampling")
        with gr.Row():
            train = gr.Button("Train Embedding", variant="primary", elem_id="train_train_embedding")
            interrupt = gr.Button("Interrupt", elem_id="train_interrupt")
        progress = gr.HTML(elem_id="train_progress")
        preview = gr.Image(label="Last preview", interactive=False, elem_id="train_preview")
        train_status = gr.Markdown(elem_id="train_status")

    def on_create(name, init_text, vectors, file_format, overwrite, model, http: gr.Request):
        job = Job(description="create embedding", owner=owner_of(http))
        try:  # queued: it may load the checkpoint
            path = ctx.jobs.run(job, lambda job: ti.create_in_app(ctx, name, init_text, int(vectors), file_format,
                                                                  bool(overwrite), checkpoint=model))
        except (ValueError, LookupError, OSError, QueueFull) as e:
            raise gr.Error(str(e))
        names = ti.embedding_names(ctx.paths.embeddings)
        count = int(vectors)
        return f"Created `{path.name}` ({count} vector{'s' if count > 1 else ''}).", gr.update(choices=names, value=path.stem)

    def on_train(embedding, learn_rate, batch_size, gradient_steps, dataset, template, size, steps, save_every,
                 preview_every, shuffle_tags, tag_dropout, latent_sampling, model, http: gr.Request):
        if not embedding:
            raise gr.Error("Choose an embedding to train, or create one first.")
        if not (dataset or "").strip():
            raise gr.Error("Give the dataset directory: a folder of images.")
        found = ti.template_files(ctx.paths.ti_templates)
        if template not in found:
            raise gr.Error(f"Prompt template {template!r} not found; choose one of {', '.join(found)}.")
        try:
            options = ti.TrainingOptions(
                embedding=embedding, dataset=dataset.strip(), template=found[template], learn_rate=learn_rate,
                batch_size=int(batch_size or 0), gradient_steps=int(gradient_steps or 0), size=int(size),
                steps=int(steps or 0), save_every=int(save_every or 0), preview_every=int(preview_every or 0),
                shuffle_tags=bool(shuffle_tags), tag_dropout=float(tag_dropout), latent_sampling=latent_sampling,
            ).validate()
            ctx.paths.server_folder(options.dataset, "Dataset directory")  # refused before the job waits in the queue
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e))
        job = Job(description="train embedding", owner=owner_of(http))
        for kind, payload in run_with_progress(ctx, job, ti.train_in_app, options, model):
            if kind == "progress":
                job_now, image, ahead = payload
                status = html.escape(job_now.status) if job_now.status else ""
                yield {progress: progress_html(job_now, ahead), train_status: status} | ({preview: image} if image is not None else {})
            else:
                yield {progress: "", train_status: result_text(payload)}

    create.click(on_create, inputs=[name, init_text, vectors, file_format, overwrite, checkpoint],
                 outputs=[create_status, embedding])
    refresh.click(lambda current: gr.update(choices=ti.embedding_names(ctx.paths.embeddings), value=current),
                  inputs=embedding, outputs=embedding, queue=False)
    train.click(on_train, inputs=[embedding, learn_rate, batch_size, gradient_steps, dataset, template, size, steps,
                                  save_every, preview_every, shuffle_tags, tag_dropout, latent_sampling, checkpoint],
                outputs=[progress, preview, train_status], concurrency_limit=None)
    def on_interrupt(http: gr.Request):
        ctx.jobs.interrupt(owner_of(http))

    interrupt.click(on_interrupt, queue=False)
