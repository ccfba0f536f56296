"""Hybrid query latency: p50/p95 with and without a filter, embedded engine vs qdrant-client local mode.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/retrieve.py [--sizes 10000 100000] [--queries 200]

Corpus vectors are random unit vectors (embedding 100k real chunks would take ~an hour on 2 cores),
with BM25 sparse vectors of synthetic text whose words follow a Zipf law over a 30k-word vocabulary (as
natural text does: a few very common words, a long tail), and a 'tag' keyword field (1 of 20 values) for
the filter. An earlier version drew every word from 42 words, so each query term's posting list held most
of the corpus; that measured an unrealistic worst case for the sparse leg.
Each timed query includes embedding the query text with the real MiniLM model, as a request would.
Prints a table and writes bench/results/retrieve-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB = 30_000


def zipf_words(rng: np.random.Generator, k: int) -> str:
    """k pseudo-words, rank r drawn with probability ~ 1/r^1.1 (capped to the vocabulary)."""
    ranks = np.minimum(rng.zipf(1.1, size=k), VOCAB)
    return " ".join(f"w{int(r)}" for r in ranks)


def build(store, n: int, dim: int, rng: np.random.Generator, sparse) -> None:
    from ingest.store.base import ChunkPoint

    store.ensure_collection("bench", dim, "random")
    nprng = np.random.default_rng(0)
    batch = 2000
    for start in range(0, n, batch):
        m = min(batch, n - start)
        dense = nprng.standard_normal((m, dim)).astype(np.float32)
        dense /= np.linalg.norm(dense, axis=1, keepdims=True)
        texts = [zipf_words(rng, 120) for _ in range(m)]
        sv = sparse.encode_documents(texts)
        pts = [ChunkPoint(str(uuid.UUID(int=start + i + 1)), dense[i], sv[i],
                          {"doc_id": f"d{(start + i) // 10}", "doc_version": "v", "tag": f"t{(start + i) % 20}",
                           "text": texts[i]}) for i in range(m)]
        store._upsert("bench", pts)  # bulk load: bypasses the per-document replace protocol


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--local-queries", type=int, default=30, help="qdrant-client local mode is slow; fewer")
    ap.add_argument("--stores", nargs="+", default=["edge", "qdrant-local"])
    ap.add_argument("--embedder", choices=["api", "encode"], default="api")
    args = ap.parse_args()

    from app.container import shared_embedder
    from app.settings import Settings
    from ingest.embedding import Bm25Encoder, SentenceTransformerEmbedder
    from ingest.store.base import HybridQuery
    from ingest.store.edge import EdgeStore
    from ingest.store.qdrant import QdrantClientStore

    # What the API process embeds queries with (app.container.shared_embedder): a direct pass on a
    # pinned one-thread worker; --embedder encode measures plain SentenceTransformer.encode instead.
    emb = shared_embedder(Settings(home=ROOT / ".keel")) if args.embedder == "api" else SentenceTransformerEmbedder()
    emb.warm_up()
    sparse = Bm25Encoder()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        for kind in args.stores:
            tmp = Path(tempfile.mkdtemp(prefix="keel-bench-retrieve-"))
            # 'tag' is the metadata field the filtered rows filter on: indexed, as rag.payload_indexes would.
            store = (EdgeStore(tmp / "edge", keyword_indexes=["tag"]) if kind == "edge"
                     else QdrantClientStore(path=tmp / "q", keyword_indexes=["tag"]))
            t = time.perf_counter()
            build(store, n, emb.dim, rng, sparse)
            load_s = time.perf_counter() - t
            nq = args.queries if kind == "edge" else args.local_queries
            for filtered in (False, True):
                lat, embed_lat, engine_lat = [], [], []
                for i in range(nq):
                    text = zipf_words(rng, 6)
                    t0 = time.perf_counter()
                    q = HybridQuery(dense=emb.embed_query(text), sparse=sparse.encode_query(text), top_k=10,
                                    prefetch_limit=50, filters={"tag": f"t{i % 20}"} if filtered else None)
                    t1 = time.perf_counter()
                    hits = store.query("bench", q)
                    t2 = time.perf_counter()
                    assert hits, "no hits"
                    lat.append(t2 - t0)
                    embed_lat.append(t1 - t0)
                    engine_lat.append(t2 - t1)
                rows.append({"store": kind, "chunks": n, "filter": filtered, "queries": nq,
                             "p50_ms": round(pct(lat, 50), 2), "p95_ms": round(pct(lat, 95), 2),
                             "embed_p50_ms": round(pct(embed_lat, 50), 2),
                             "engine_p50_ms": round(pct(engine_lat, 50), 2),
                             "engine_p95_ms": round(pct(engine_lat, 95), 2), "load_s": round(load_s, 1)})
                print(rows[-1], flush=True)
            store.close()

    from rich.console import Console
    from rich.table import Table

    table = Table(title="hybrid query latency (query embedding included; top-10, RRF over dense+BM25)")
    cols = ("store", "chunks", "filter", "queries", "p50_ms", "p95_ms", "embed_p50_ms", "engine_p50_ms",
            "engine_p95_ms", "load_s")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    Console().print(table)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retrieve-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "embedder": args.embedder,
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
