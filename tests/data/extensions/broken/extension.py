"""An extension that fails half-way through its set-up: what it added first must be taken back."""


def setup(api):
    api.on("request", lambda request: request.replace(prompt="the broken extension ran"))
    raise RuntimeError("this extension is broken on purpose")
