"""``hivemem eval locomo``: retrieval recall and latency on LoCoMo-format conversations.
``hivemem.cli`` registers it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import typer
from pydantic import ValidationError

import hivemem
from hivemem.cli.common import guard, out, progress, table
from hivemem.config import Settings
from hivemem.errors import InvalidInput

__all__ = ["eval_locomo"]


def _parse_ks(raw: str) -> tuple[int, ...]:
    """``--k`` as sorted distinct cut-offs, e.g. ``"5,10"`` -> (5, 10)."""
    try:
        ks = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        ks = []
    if not ks or not all(1 <= k <= 100 for k in ks):
        raise InvalidInput("--k takes comma-separated cut-offs between 1 and 100", field="k")
    return tuple(ks)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def eval_locomo(
    file: Annotated[
        Path | None,
        typer.Argument(
            show_default=False,
            help="LoCoMo-format JSON file (e.g. locomo10.json). Default: env HIVEMEM_LOCOMO, "
            "else ../shared/data/locomo-dev.json relative to the hivemem source checkout.",
        ),
    ] = None,
    k: Annotated[str, typer.Option("--k", help="Cut-offs, comma-separated (1..100).")] = "5,10",
    mode: Annotated[
        Literal["hybrid", "vector", "lexical", "all"],
        typer.Option(help="Search mode to measure; all: each of the three."),
    ] = "hybrid",
    limit_conversations: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N conversations.")
    ] = None,
    embedder: Annotated[
        Literal["minilm", "openai", "none"] | None,
        typer.Option(
            show_default=False, help="Embedder. Default: env HIVEMEM_EMBEDDER, else minilm."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON to this file.")
    ] = None,
) -> None:
    """Retrieval recall on LoCoMo-format conversations, in a fresh temporary hive.

    Each dialog turn becomes one item in namespace locomo/<sample_id> (key: its dialog
    id; text: "[<session date>] <speaker>: <text>", plus " \\[shares <caption>]" when it
    shared an image; metadata: dia_id, session, turn). Every question whose evidence
    names turns of its conversation is searched in that conversation's namespace
    (malformed evidence ids are normalised, unknown ones dropped).

    [bold]recall@k[/] of a question is the share of its evidence turns among the first
    k hits; per category (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop,
    5 adversarial) and overall it is the mean over the questions. Timings: loading
    (writing and embedding every turn) in seconds and items/s, and the latency of each
    search call (query embedding included) at p50 and p99 in ms. Search settings come
    from HIVEMEM_* variables as usual.

    The data is LoCoMo's data/locomo10.json (github.com/snap-research/locomo, CC BY-NC
    4.0), not shipped with hivemem; see examples/README.md.
    """
    import tempfile

    from hivemem import evaluation

    with guard():
        ks = _parse_ks(k)
        if file is None:
            file = evaluation.default_locomo_path()
            if not file.is_file():
                raise InvalidInput(
                    f"no LoCoMo file at {file}: pass FILE or set {evaluation.LOCOMO_ENV} "
                    "(the public file is data/locomo10.json of github.com/snap-research/locomo)",
                    field="file",
                )
        conversations = evaluation.load_locomo(file)[:limit_conversations]
        try:
            settings = Settings() if embedder is None else Settings(embedder=embedder)
        except ValidationError as exc:
            from hivemem.validation import invalid_input

            raise invalid_input(exc, what="invalid HIVEMEM_* setting: ") from None
        modes: tuple[evaluation.Mode, ...] = (
            ("hybrid", "vector", "lexical") if mode == "all" else (mode,)
        )
        if settings.embedder == "none":
            if mode == "vector":
                raise InvalidInput("vector mode needs an embedder (embedder=none)", field="mode")
            modes = tuple(m for m in modes if m != "vector")
        turns = sum(len(c.turns) for c in conversations)
        questions = sum(len(c.questions) for c in conversations)

        async def run(path: str) -> evaluation.Report:
            async with hivemem.connect(
                f"sqlite:///{path}", agent="eval", settings=settings
            ) as hive:
                with progress() as bar:
                    loading = bar.add_task("loading turns", total=turns)
                    asking = bar.add_task("asking questions", total=questions * len(modes))
                    return await evaluation.evaluate(
                        hive,
                        conversations,
                        modes,
                        ks,
                        on_load=lambda n: bar.update(loading, advance=n),
                        on_question=lambda n: bar.update(asking, advance=n),
                    )

        with tempfile.TemporaryDirectory(prefix="hivemem-eval-") as tmp:
            report = anyio.run(run, str(Path(tmp) / "locomo.db"))

    search = {
        name.removeprefix("search_"): value
        for name, value in settings.model_dump().items()
        if name.startswith("search_")
    }
    doc = {"file": str(file), "embedder": settings.embedder, "search": search}
    doc.update(report.to_json())
    if json_path is not None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    counts = report.questions_by_category
    out.print(
        f"{report.conversations} conversations, {report.items} turns, "
        f"{sum(counts.values())} questions ({report.skipped_questions} without evidence "
        f"skipped); embedder {settings.embedder}",
        soft_wrap=True,
    )
    for name, result in report.modes.items():
        columns = ["category", "questions"] + [f"recall@{n}" for n in ks]
        rows: list[list[Any]] = [
            [f"{c} {evaluation.CATEGORIES.get(c, '')}".strip(), counts[c]]
            + [_fmt(result.recall(n, c)) for n in ks]
            for c in sorted(counts)
        ]
        rows.append(["overall", sum(counts.values())] + [_fmt(result.recall(n)) for n in ks])
        table(columns, rows, title=f"{name} search")
        out.print(
            f"{name}: query p50 {result.latency_ms(50):.1f} ms, p99 {result.latency_ms(99):.1f} ms",
            soft_wrap=True,
        )
    out.print(f"load: {report.load_seconds:.1f} s ({report.items_per_second:.0f} items/s)")
