"""The tests' example extension: a request hook, a saved hook, an accordion and a route."""

import gradio as gr

SUFFIX = ", seen by the example extension"


def setup(api):
    saved = []

    def mark(request):
        return request.replace(prompt=request.prompt + SUFFIX)

    def build():
        gr.Markdown(f"The example extension lives in {api.folder.name}.", elem_id="example_extension_note")

    api.on("request", mark)
    api.on("saved", lambda picture: saved.append({"file": picture.path.name, "infotext": picture.infotext}))
    api.add_accordion("txt2img", "Example extension", build)
    api.add_route("GET", "/saved", lambda: {"saved": saved})
