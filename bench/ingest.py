"""Ingest throughput: the whole pipeline's chunks/s against raw SentenceTransformer.encode on the same texts;
then a no-op re-run, and a re-run after a one-sentence edit in every document (changed chunks only re-embedded).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ingest.py [--copies 40] [--store edge]

The corpus is the shipped tests/data/docs set, copied N times with a per-copy marker so no two
documents are equal. Prints a table and writes bench/results/ingest-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=40)
    ap.add_argument("--store", choices=["edge", "qdrant"], default="edge")
    args = ap.parse_args()

    from app.settings import Settings
    from ingest import build_rag
    from ingest.documents import load_paths

    tmp = Path(tempfile.mkdtemp(prefix="keel-bench-ingest-"))
    corpus = tmp / "corpus"
    corpus.mkdir()
    src = sorted((ROOT / "tests" / "data" / "docs" / "corpus").iterdir())
    for i in range(args.copies):
        for f in src:
            (corpus / f"{f.stem}-{i:03d}{f.suffix}").write_text(f.read_text() + f"\n\nCopy {i}.\n")
    rag = build_rag(Settings(home=tmp / "home", rag={"store": args.store}))
    t = time.perf_counter()
    rag.warm_up()
    load_s = time.perf_counter() - t

    # The exact texts the pipeline will embed, for the raw baseline.
    report, _ = load_paths([corpus])
    texts = [c.embed_text for d in report.documents for c in rag.pipeline.chunker.chunk(d)]
    model = rag.embedder._load()

    def raw() -> float:
        t = time.perf_counter()
        model.encode(texts, batch_size=rag.settings.embedding_batch_size, normalize_embeddings=True,
                     show_progress_bar=False)
        return time.perf_counter() - t

    # Raw encode before and after the pipeline; the faster is the baseline (the machine is shared and noisy).
    raw_before = raw()
    t = time.perf_counter()
    result = rag.pipeline.run([corpus], "bench")
    pipe_s = time.perf_counter() - t
    raw_s = min(raw_before, raw())
    t = time.perf_counter()
    again = rag.pipeline.run([corpus], "bench")
    noop_s = time.perf_counter() - t
    # An edit in every document (one sentence appended): only the chunks whose text changed are embedded again,
    # the rest keep the vectors of the document's previous version. Compared with the first, full ingest.
    for f in corpus.iterdir():
        if f.suffix not in (".json", ".jsonl", ".pdf"):  # appending text would break those formats
            f.write_text(f.read_text() + "\nEdited after review.\n")
    t = time.perf_counter()
    edited = rag.pipeline.run([corpus], "bench")
    edit_s = time.perf_counter() - t
    rag.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    raw_rate = len(texts) / raw_s
    pipe_rate = result.chunks_written / pipe_s
    rows = {
        "documents": len(report.documents), "chunks": len(texts),
        "mean_tokens_per_chunk": round(sum(len(rag.pipeline.chunker.tokenizer.token_spans(x)) for x in texts)
                                       / len(texts), 1),
        "model_load_s": round(load_s, 2),
        "raw_encode_chunks_per_s": round(raw_rate, 1),
        "pipeline_chunks_per_s": round(pipe_rate, 1),
        "pipeline_vs_raw": round(pipe_rate / raw_rate, 3),
        "pipeline_embed_share": round(result.embed_seconds / pipe_s, 3),
        "rerun_unchanged_s": round(noop_s, 3), "rerun_chunks_written": again.chunks_written,
        "edit_every_doc_s": round(edit_s, 2), "edit_chunks_written": edited.chunks_written,
        "edit_chunks_reembedded": edited.chunks_written - edited.chunks_reused,
        "edit_vs_full_ingest_time": round(edit_s / pipe_s, 3),
        "peak_rss_mb": round(peak_mb, 1),
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ingest benchmark ({args.store} store, {os.cpu_count()} CPUs)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        table.add_row(k, str(v))
    Console().print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ingest-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"store": args.store, "copies": args.copies, "machine": platform.platform(),
                                "cpus": os.cpu_count(), **rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
