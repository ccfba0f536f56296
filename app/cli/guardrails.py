"""``keel guardrails``: rebuild what the guardrails ship.

``train-encoder`` fine-tunes the harmful-request check's second stage (MiniLM with LoRA factors, see
``app/guardrails/validators/harm_encoder.py``) on ``infra/guardrails/data/harmful/`` and writes the weights the
repository ships: run it after changing that data (a unit test says when the shipped weights are stale).
``--split train`` trains without the dev split, to choose thresholds on texts the model did not see.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Guardrails: rebuild the shipped models.", no_args_is_help=True)
console = Console(highlight=False)


@app.command("train-encoder")
def train_encoder(
    out: Annotated[Path | None, typer.Option(help="Where to write the weights (default: the shipped file).")] = None,
    split: Annotated[str, typer.Option(help="all (what ships) or train (leave the dev split out).")] = "all",
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the data.")] = 3,
) -> None:
    """Fine-tune the harmful-request encoder on the shipped data (about 12 minutes on two CPU cores)."""
    if split not in ("all", "train"):
        raise typer.BadParameter("--split must be 'all' or 'train'")
    if split == "train" and out is None:
        raise typer.BadParameter("--split train needs --out: the shipped weights are trained on all the data")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from dataclasses import replace

    from app.guardrails.embeddings import default_model_path  # lazy: keeps `keel --help` fast (torch)
    from app.guardrails.validators.harm_encoder import SHIPPED_ENCODER, EncoderConfig, train  # lazy: as above
    from app.guardrails.validators.harmful import load_training_data  # lazy: as above

    texts, labels, _ = load_training_data(split=split)  # type: ignore[arg-type]
    console.print(f"training on {len(texts)} texts ({int(labels.sum())} harmful), {epochs} epochs")
    weights = train(texts, labels, default_model_path(), replace(EncoderConfig(), epochs=epochs),
                    progress=console.print)
    target = out or SHIPPED_ENCODER
    weights.save(target)
    console.print(f"wrote {target} ({target.stat().st_size // 1024} KiB)")
