"""Feature lookups in a prompt render: what a template's ``features:`` costs per request.

    .venv/bin/python bench/features.py [--users 1000] [--renders 400] [--rounds 4]

In a scratch home: Feast's SQLite online store holding ``--users`` users' features (``keel features apply`` +
``materialize`` over synthetic ratings), and two prompt templates that differ only in that one declares two
features. Alternating rounds (so both see the same machine state) render each ``--renders`` times for random users,
the feature one with its online lookup exactly as the chat path does it (``FeatureService.online`` then
``PromptRegistry.render``). Prints p50/p95 per render for both and the added cost; writes
bench/results/features.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402 - after the path
from lifecycle.features.export import Sources  # noqa: E402
from lifecycle.features.service import FeatureService  # noqa: E402
from prompts.factory import build_registry  # noqa: E402
from prompts.models import TemplateContent  # noqa: E402

REFS = ["user_stats:ratings", "user_stats:feedback_rate"]
TEXT = "You answer support questions. Keep it short."


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--renders", type=int, default=400)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    home = Path(tempfile.mkdtemp(prefix="keel-bench-features-"))
    settings = Settings(home=home)
    now = time.time()
    rng = random.Random(0)
    users = [f"key-{i:05d}" for i in range(args.users)]
    ratings = [{"owner": u, "at": now, "score": float(rng.random() < 0.7)} for u in users for _ in range(3)]
    features = FeatureService(settings.features, home, Sources(ratings=lambda: ratings))
    t0 = time.perf_counter()
    features.apply(now=now - 60)
    features.materialize(now=now)
    setup_s = time.perf_counter() - t0

    registry = build_registry(settings)
    plain = TemplateContent.model_validate({"messages": [{"role": "system", "content": TEXT}]})
    with_features = TemplateContent.model_validate({"messages": [{"role": "system", "content": (
        TEXT + " This user rated {{ features.user_stats.ratings }} answers; {{ features.user_stats.feedback_rate }} "
        "of them good.")}], "features": REFS})
    registry.create("plain", plain, author="bench")
    registry.create("personal", with_features, author="bench")

    def render_plain(user: str) -> None:
        registry.render("plain@latest", {})

    def render_features(user: str) -> None:
        looked = features.online(registry.feature_refs("personal@latest"), {"user": user})
        registry.render("personal@latest", {}, features=looked)

    for fn in (render_plain, render_features):  # warm: compiled templates, Feast's first read
        for u in users[:20]:
            fn(u)
    timings: dict[str, list[float]] = {"without features": [], "with 2 features": []}
    for _ in range(args.rounds):
        for name, fn in (("without features", render_plain), ("with 2 features", render_features)):
            for _ in range(args.renders // args.rounds):
                u = rng.choice(users)
                t = time.perf_counter()
                fn(u)
                timings[name].append((time.perf_counter() - t) * 1000)

    rows = {name: {"p50_ms": round(statistics.median(xs), 3), "p95_ms": round(percentile(xs, 0.95), 3),
                   "n": len(xs)} for name, xs in timings.items()}
    base, feat = rows["without features"], rows["with 2 features"]
    cpu = subprocess.run("lscpu | grep -o 'avx512[a-z_0-9]*\\|amx[a-z_]*' | sort -u | tr '\\n' ' '",
                         shell=True, capture_output=True, text=True).stdout.strip() or "no avx512/amx"
    print(f"\nprompt render with Feast online features ({args.users} users, SQLite online store; {platform.machine()},"
          f" {cpu}); apply + materialize {setup_s:.2f} s\n")
    print(f"{'render':<20}{'p50 ms':>10}{'p95 ms':>10}{'n':>7}")
    for name, r in rows.items():
        print(f"{name:<20}{r['p50_ms']:>10.3f}{r['p95_ms']:>10.3f}{r['n']:>7}")
    added = {"p50_ms": round(feat["p50_ms"] - base["p50_ms"], 3), "p95_ms": round(feat["p95_ms"] - base["p95_ms"], 3)}
    print(f"{'added by features':<20}{added['p50_ms']:>10.3f}{added['p95_ms']:>10.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"users": args.users, "renders": args.renders, "rounds": args.rounds, "setup_s": round(setup_s, 3),
              "cpu_flags": cpu, "rows": rows, "added": added}
    (args.out / "features.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'features.json'}")


if __name__ == "__main__":
    main()
