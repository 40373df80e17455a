"""Prompt styles: named pieces of prompt and negative prompt kept in `styles.csv`, A1111's file.

The file has the columns name, prompt, negative_prompt (older A1111 files call the prompt column
"text"). A style's text holding `{prompt}` has the user's prompt put there; otherwise the style
is appended after ", ". Styles apply in the order they are chosen, to the prompt and the negative
prompt alike, before anything else reads the prompt: the infotext then records the text that was
used, and the image can be made again without the style.
"""

from __future__ import annotations

import csv
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from modules.app.errors import RequestError
from modules.app.fileio import atomic_write

log = logging.getLogger(__name__)

PLACEHOLDER = "{prompt}"
COLUMNS = ("name", "prompt", "negative_prompt")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_text: str, prompt: str) -> str:
    """`prompt` with one style's text: in place of {prompt}, or appended after ", "."""
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: list[PromptStyle]) -> tuple[str, str]:
    for style in styles:
        prompt = merge_prompts(style.prompt, prompt)
        negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def read_styles(text: str) -> dict[str, PromptStyle]:
    """Styles by name from the CSV text; rows without a name are left out. Raises ValueError for
    a file without a name column."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    if reader.fieldnames is None:
        return {}
    if "name" not in reader.fieldnames:
        raise ValueError(f"its first line names the columns {', '.join(reader.fieldnames)}; it needs name, prompt, negative_prompt")
    styles = {}
    for row in reader:
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = PromptStyle(name, row.get("prompt") or row.get("text") or "", row.get("negative_prompt") or "")
    return styles


def write_styles(styles: list[PromptStyle]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for style in styles:
        writer.writerow((style.name, style.prompt, style.negative_prompt))
    return out.getvalue()


class StyleLibrary:
    """The styles of one styles.csv, re-read when the file changes on disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._version: tuple[int, int] | None = None
        self._styles: dict[str, PromptStyle] = {}
        self.problem: str | None = None  # why the file could not be read, for the UI

    def styles(self) -> dict[str, PromptStyle]:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._version, self._styles, self.problem = None, {}, None
                return {}
            version = (stat.st_size, stat.st_mtime_ns)
            if version != self._version:
                try:
                    # utf-8-sig: A1111 writes, and spreadsheet programs save, a byte-order mark.
                    self._styles, self.problem = read_styles(self.path.read_text(encoding="utf-8-sig")), None
                except (OSError, ValueError, csv.Error) as e:
                    self._styles, self.problem = {}, f"{self.path.name} could not be read: {e}"
                    log.warning(self.problem)
                self._version = version
            return dict(self._styles)

    def find(self, names) -> list[PromptStyle]:
        styles = self.styles()
        missing = [name for name in names if name not in styles]
        if missing:
            known = ", ".join(styles) or f"none yet ({self.problem or 'save one from the txt2img tab'})"
            raise RequestError(f"styles: no style named {', '.join(map(repr, missing))}; available: {known}")
        return [styles[name] for name in names]

    def apply(self, prompt: str, negative_prompt: str, names) -> tuple[str, str]:
        """The prompts with the named styles written into them, in the order named."""
        return apply_styles(prompt, negative_prompt, self.find(names)) if names else (prompt, negative_prompt)

    def save(self, style: PromptStyle) -> None:
        """Adds the style, or replaces the one with its name, keeping the others in their order."""
        name = style.name.strip()
        if not name:
            raise ValueError("a style needs a name")
        styles = self.styles()
        if self.problem:
            raise ValueError(f"{self.problem}; fix or move it before saving styles, so that nothing in it is lost")
        styles[name] = PromptStyle(name, style.prompt, style.negative_prompt)
        data = write_styles(list(styles.values())).encode("utf-8-sig")
        with self._lock:
            atomic_write(self.path, lambda f: f.write(data))
