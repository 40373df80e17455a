"""The web UI's code, in packages by responsibility. One request travels down this list and back:

    ui/, api/        Gradio tabs and /sdapi/v1 routes: widgets or JSON -> request, result -> widgets or JSON
    extensions/      users' extensions from extensions/, each adding scripts, hooks, UI and routes
    scripts/         A1111's scripts (X/Y/Z plot...) on typed arguments and hook points, the script library
    scaleout/        generation on Ray Serve replicas (--workers, --ray-address), pipeline.generate's stand-in
    training/        textual-inversion training, the built-in model's dataset and trainer
    generation/      request (what was asked, validated), pipeline (the numbered steps of a
                     generation), img2img and masks, hires fix, folder batches, the A1111 option
                     tables, the request's infotext parameters
    context.py       AppContext: what a request may use, built once from the flags
    postprocess/     upscalers and the Extras tab's work
    networks/        textual-inversion embeddings and LoRA, applied for one job
    models/          the networks keyed by checkpoint keys, detection, loading, memory, merging
    sampling/        seeded noise, sigma schedules, the CFG denoiser, the sampler table
    prompting/       the prompt language, tokenizer, conditioning, extra-network tags, styles
    service/         jobs and the fair queue that runs them, sign-in, each user's own choices
    images/          picture files: reading pictures and their text, the infotext format, saving
    app/             flags, settings, paths, atomic file writes, the error people fix

A module imports only from its own layer or the layers below it in LAYERS (tests/test_layout.py
checks this, and that no import cycle exists). The queue in service/ runs whatever callable it
is given, so the pipeline reports into its Job without the service knowing about generation.
"""

# Bottom first. A name is a package of modules/ or a module at its top.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("app",),
    ("images",),
    ("service",),
    ("prompting",),
    ("sampling",),
    ("models",),
    ("networks",),
    ("postprocess",),
    ("context",),
    ("generation",),
    ("training",),
    ("scaleout",),
    ("scripts",),
    ("extensions",),
    ("ui", "api"),
)
