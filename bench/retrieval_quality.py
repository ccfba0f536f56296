"""Retrieval quality on two public question sets, every method measured in the same run on the same chunks.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/retrieval_quality.py [--sets python-faq debian-faq] [--tune]

Sets (evals/retrieval.py): the CPython FAQ (python3.11-doc) and the Debian FAQ (debian-faq), each entry's
answer ingested through Keel's own pipeline (chunker, MiniLM, BM25, edge store) and its question asked.
Methods, all through ``Retriever`` with ``group_by="document"`` (ranks count documents, not chunks):
  bm25         the BM25 leg alone (RRF weights 0:1)
  dense        the MiniLM leg alone (1:0)
  hybrid 1:1   RRF with equal weights (Keel's fusion before this benchmark)
  hybrid       RRF with the configured default weights (rag.retrieval.weights)
  hybrid+rerank  hybrid, then the late-interaction reranker over the top ``rerank.top_n`` candidates
Latency is per query, end to end (query embedding, search, rerank), measured as each method runs its queries
in turn, rotating the method order per query so that no method always runs first or on a warm cache.
``--tune`` sweeps the dense:BM25 weight on the CPython FAQ only (the set the default was tuned on).
``--long`` asks each question as a long message instead: another entry's answer pasted first (~1,500
characters, as a user pastes context into a support ticket), then the question; the MiniLM leg reads only
the first ~256 tokens, so it adds "hybrid, whole query" (rag.retrieval.focus_chars off) to show what the
query focus does. Synthetic wrapping of real questions: a stand-in for long conversational queries.
Prints tables and writes bench/results/retrieval_quality-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 10


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=["python-faq", "debian-faq"])
    ap.add_argument("--tune", action="store_true", help="sweep the dense:BM25 RRF weight on python-faq")
    ap.add_argument("--top-n", type=int, default=None, help="rerank candidates (default: the configured one)")
    ap.add_argument("--long", action="store_true", help="long messages: pasted context, then the question")
    args = ap.parse_args()

    from app.settings import Settings
    from evals.retrieval import debian_faq, python_faq, rank_of, summarize
    from ingest import build_rag
    from ingest.retriever import Retriever
    from ingest.settings import RerankConfig, RetrievalDefaults

    loaders = {"python-faq": python_faq, "debian-faq": debian_faq}
    cpu = subprocess.run("lscpu | grep -o 'avx512[a-z_0-9]*\\|amx[a-z_]*' | sort -u | tr '\\n' ' '",
                         shell=True, capture_output=True, text=True).stdout.strip() or "no avx512/amx"
    base = RetrievalDefaults(group_by="document", top_k=K)
    rerank = RerankConfig(kind="late_interaction", top_n=args.top_n or base.rerank.top_n)
    methods = {
        "bm25": base.model_copy(update={"weights": (0.0, 1.0)}),
        "dense": base.model_copy(update={"weights": (1.0, 0.0)}),
        "hybrid 1:1": base.model_copy(update={"weights": (1.0, 1.0)}),
        "hybrid": base,
        "hybrid+rerank": base.model_copy(update={"rerank": rerank}),
    }
    if args.long:
        methods["hybrid, whole query"] = base.model_copy(update={"focus_chars": None})
    report: dict = {"machine": platform.platform(), "cpus": os.cpu_count(), "cpu_flags": cpu, "k": K, "long": args.long,
                    "default_weights": base.weights, "rerank_top_n": rerank.top_n, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        rag = build_rag(Settings(home=Path(tmp)))
        rag.warm_up()
        for name in args.sets:
            qs = loaders[name]()
            folder = qs.write(Path(tmp) / "corpus" / name)
            t0 = time.perf_counter()
            res = rag.pipeline.run([folder], name)
            ingest_s = time.perf_counter() - t0
            queries = qs.queries
            if args.long:
                pasted = [e.answer[:1500] for e in qs.entries]
                queries = [(f"I was reading this earlier:\n\n{pasted[(i * 7 + 3) % len(pasted)]}\n\n"
                            f"Anyway, here is my question. {q}", gold) for i, (q, gold) in enumerate(queries)]
            retrievers = {m: Retriever(store=rag.store, embedder=rag.embedder, sparse=rag.sparse, defaults=d,
                                       rerankers=rag.retriever.rerankers) for m, d in methods.items()}
            if args.tune and name == "python-faq":
                for w in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
                    retrievers[f"tune {w:g}:1"] = Retriever(
                        store=rag.store, embedder=rag.embedder, sparse=rag.sparse,
                        defaults=base.model_copy(update={"weights": (w, 1.0)}))
            retrievers["hybrid+rerank"].retrieve("warm up", collection=name)  # load the reranker once
            ranks: dict[str, list[int]] = {m: [] for m in retrievers}
            lat: dict[str, list[float]] = {m: [] for m in retrievers}
            order = list(retrievers)
            for i, (question, gold) in enumerate(queries):
                for m in order[i % len(order):] + order[:i % len(order)]:
                    t = time.perf_counter()
                    got = retrievers[m].retrieve(question, collection=name)
                    lat[m].append((time.perf_counter() - t) * 1000)
                    ranks[m].append(rank_of([Path(c.citation.source).stem for c in got.chunks], gold))
            rows = {}
            for m in retrievers:
                s = summarize(ranks[m], K)
                s.update(p50_ms=pct(lat[m], 50), p95_ms=pct(lat[m], 95))
                rows[m] = s
            singles = max(rows["bm25"]["mrr"], rows["dense"]["mrr"])
            report["sets"][name] = {"documents": len(qs.entries), "queries": len(queries), "chunks": res.chunks_total,
                                    "ingest_s": round(ingest_s, 1), "methods": rows,
                                    "rerank_vs_best_single_mrr": rows["hybrid+rerank"]["mrr"] / singles,
                                    "hybrid_vs_best_single_mrr": rows["hybrid"]["mrr"] / singles}
            print(f"\n{name}: {len(qs.entries)} documents, {res.chunks_total} chunks, {len(queries)} questions "
                  f"(ingest {ingest_s:.0f} s; {cpu})")
            print(f"{'method':16} {'MRR':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'nDCG@10':>8} {'p50 ms':>8} "
                  f"{'p95 ms':>8}")
            for m, s in rows.items():
                print(f"{m:16} {s['mrr']:6.3f} {s['recall@1']:6.3f} {s['recall@5']:6.3f} {s[f'recall@{K}']:6.3f} "
                      f"{s[f'ndcg@{K}']:8.3f} {s['p50_ms']:8.1f} {s['p95_ms']:8.1f}")
            print(f"MRR vs the best single method: hybrid {rows['hybrid']['mrr'] / singles:.3f}, "
                  f"hybrid+rerank {rows['hybrid+rerank']['mrr'] / singles:.3f}")
        rag.close()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retrieval_quality{'-long' if args.long else ''}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
