"""The error a person has to fix in what they asked for. Every layer raises it for bad input (a
request field, a style name, a LoRA file named in a prompt, a batch folder), and the UI and the
API show its message as it is: a 422 over HTTP, a notice in the browser."""

from __future__ import annotations


class RequestError(ValueError):
    """A request a person has to fix; the message says which field and why."""
