"""A1111's "Prompt matrix": the prompt split at '|' into a part always in and variable parts,
and a picture for every combination of the variable parts (2^n of them), in a grid whose
legends show which parts each column and row has (those it lacks struck through in grey)."""

from __future__ import annotations

from modules.app.errors import RequestError
from modules.generation.pipeline import Result
from modules.images import grids, storage
from modules.scripts.base import Arg, Script
from modules.scripts.xyz_plot import run_cells

TITLE = "Prompt matrix"


def matrix_prompts(prompt: str, at_start: bool = False, joiner: str = ", ") -> tuple[list[str], list[str]]:
    """(the prompt's parts, the prompt of each combination) as A1111 builds them: combination n
    has variable part i when bit i of n is set, each stripped of spaces and commas, joined to the
    first part (kept as written) after it, or before it with `at_start`."""
    parts = prompt.split("|")
    prompts = []
    for combination in range(2 ** (len(parts) - 1)):
        chosen = [text.strip().strip(",") for n, text in enumerate(parts[1:]) if combination & (1 << n)]
        prompts.append(joiner.join(chosen + [parts[0]] if at_start else [parts[0]] + chosen))
    return parts, prompts


class PromptMatrix(Script):
    title = TITLE
    args = (
        Arg("Put variable parts at start of prompt", "checkbox", False),
        Arg("Use different seed for each picture", "checkbox", False),
        Arg("Select prompt", "radio", "positive", choices=("positive", "negative")),
        Arg("Select joining char", "radio", "comma", choices=("comma", "space")),
        Arg("Grid margins (px)", "slider", 0, 0, 500, 2),
    )

    def run(self, ctx, request, values, job, generate, save):
        request = request.with_seed_resolved()  # as A1111: one seed for all, or counted up from it
        field = "prompt" if values["Select prompt"] == "positive" else "negative_prompt"
        text = getattr(request, field)
        count = 2 ** text.count("|")
        problem = grids.grid_size_problem(count, request.width, request.height)
        if problem:
            raise RequestError(f"{TITLE}: {problem}")
        joiner = ", " if values["Select joining char"] == "comma" else " "
        parts, prompts = matrix_prompts(text, values["Put variable parts at start of prompt"], joiner)
        step = 1 if values["Use different seed for each picture"] else 0
        cells = []
        for i, prompt in enumerate(prompts):
            # One picture per prompt; its variation seed counts up, as A1111's does over a job.
            cell = request.replace(**{field: prompt}, seed=request.seed + i * step, subseed=request.subseed + i,
                                   batch_count=1, batch_size=1)
            try:
                cells.append(cell.validate())
            except ValueError as e:
                raise RequestError(f"{TITLE}: the picture for {prompt!r}: {e}") from None

        made = run_cells(ctx, cells, range(len(cells)), job, generate, save)
        if not made:
            return Result(request=cells[0], interrupted=True)
        pictures = [made[i].images[0] if i in made else None for i in range(len(cells))]
        first = made[min(made)]
        width, height = first.images[0].size
        grid = grids.image_grid(pictures, rows=1 << ((len(parts) - 1) // 2))
        grid = grids.draw_prompt_matrix(grid, width, height, parts, values["Grid margins (px)"])

        result = Result(request=first.request, images=[grid], infotexts=[first.infotexts[0]], seeds=[first.seeds[0]],
                        interrupted=job.interrupted or any(r.interrupted for r in made.values()))
        if ctx.settings.save_images if save is None else save:
            result.paths.append(storage.save_grid(grid, ctx.paths.outputs, request.mode, seed=first.seeds[0],
                                                  prompt=text, infotext=first.infotexts[0]))
        for index in sorted(made):
            result.images.append(pictures[index])
            result.infotexts.append(made[index].infotexts[0])
            result.seeds.append(made[index].seeds[0])
            result.paths.extend(made[index].paths)
        return result
