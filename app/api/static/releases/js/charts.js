// Line charts of a release's series, one line per variant, drawn by uPlot (vendored, MIT: ../vendor/).
// A series point is {t, variant, requests, errors, blocked, latency_ms, ttft_ms, feedback_up, feedback_down}
// per time bucket (GET /v1/releases/{name}/series?bucket_s=N); buckets a variant did not serve are 0 requests
// and gaps (no rate, no latency) in the other charts.

import uPlot from "../vendor/uPlot.esm.js";

// Colour-blind-safe (Okabe–Ito hues, darkened for contrast on white); every variant after the first is dashed
// as well, so the lines differ by more than colour.
export const PALETTE = ["#0a6bb3", "#d55e00", "#0f8a65", "#b4468f", "#6d5bd0", "#8a6d00"];
const DASHES = [null, [7, 4], [2, 3], [10, 3, 2, 3], [4, 4], [1, 2]];

export function variantColor(i) {
  return PALETTE[i % PALETTE.length];
}

export function variantDash(i) {
  return DASHES[i % DASHES.length];
}

export const fmt = {
  count: (v) => (v == null ? "—" : Number(v).toLocaleString()),
  pct: (v) => (v == null ? "—" : `${(v * 100).toFixed(v !== 0 && Math.abs(v) < 0.1 ? 1 : 0)}%`),
  ms: (v) => {
    if (v == null) return "—";
    if (Math.abs(v) < 1000) return `${Math.round(v)} ms`;
    return `${(v / 1000).toFixed(Math.abs(v) < 10_000 ? 2 : 1)} s`;
  },
};

// What is drawn: [id, title, y-axis format, value of one series point (null = no data), y-axis top when all 0].
export const METRICS = [
  ["requests", "Requests per bucket", fmt.count, (p) => p.requests, 1],
  ["error_rate", "Error rate", fmt.pct, (p) => (p.requests ? p.errors / p.requests : null), 0.1],
  ["block_rate", "Guardrail block rate", fmt.pct, (p) => (p.requests ? p.blocked / p.requests : null), 0.1],
  ["latency", "Mean latency", fmt.ms, (p) => p.latency_ms, 1],
  ["ttft", "Mean time to first token", fmt.ms, (p) => p.ttft_ms, 1],
  ["feedback", "Negative feedback (share of rated)", fmt.pct, (p) => {
    const rated = (p.feedback_up || 0) + (p.feedback_down || 0);
    return rated ? p.feedback_down / rated : null;
  }, 0.1],
];
const MAX_BUCKETS = 1500;
// Tick steps: whole seconds (never finer than a bucket) on the time axis, whole numbers for counts.
const TIME_INCRS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
  172800, 604800, 2592000];
const COUNT_INCRS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10_000, 20_000, 50_000,
  100_000, 200_000, 500_000, 1_000_000];

/**
 * Align the points on one time axis: every bucket from the first point to `untilS` (the current bucket, so a
 * live chart shows traffic stopping), unless that is too many buckets.
 * Returns {x: [t...], byMetric: {id: {variant: [value|null ...]}}}.
 */
export function align(points, variants, bucketS, untilS) {
  const present = [...new Set(points.map((p) => p.t))].sort((a, b) => a - b);
  let x = present;
  if (present.length) {
    const first = present[0];
    const last = Math.max(present[present.length - 1], Math.floor((untilS ?? 0) / bucketS) * bucketS);
    const n = Math.round((last - first) / bucketS) + 1;
    if (n <= MAX_BUCKETS) x = Array.from({ length: n }, (_, i) => first + i * bucketS);
  }
  const index = new Map(x.map((t, i) => [t, i]));
  const cell = new Map(points.map((p) => [`${p.variant}\u0000${index.get(p.t)}`, p]));
  const byMetric = {};
  for (const [id, , , value] of METRICS) {
    byMetric[id] = {};
    for (const v of variants) {
      byMetric[id][v] = x.map((_, i) => {
        const p = cell.get(`${v}\u0000${i}`);
        if (!p) return id === "requests" ? 0 : null;
        const y = value(p);
        return y == null || Number.isNaN(y) ? null : y;
      });
    }
  }
  return { x, byMetric };
}

function timeLabel(t) {
  return new Date(t * 1000).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** One metric's chart in `host` (a figure's plot area), one line per variant. */
export class LineChart {
  constructor(host, { title, format, variants, bucketS, floorTop = 1, whole = false, height = 190 }) {
    this.host = host;
    this.variants = variants;
    this.format = format;
    const width = Math.max(260, Math.floor(host.getBoundingClientRect().width) || 480);
    const opts = {
      width,
      height,
      legend: { show: true, live: true },
      // A live chart refreshes every few seconds: no drag-zoom (it would be undone by the next refresh).
      cursor: { drag: { x: false, y: false, setScale: false }, points: { size: 7 } },
      scales: {
        x: { time: true, range: (u, min, max) => (min === max ? [min - bucketS, max + bucketS] : [min, max]) },
        y: { range: (u, min, max) => [0, max > 0 ? max * 1.12 : floorTop] },
      },
      axes: [
        {
          stroke: "#5d6676", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#dde1e7", width: 1 },
          incrs: TIME_INCRS.filter((i) => i >= bucketS),
        },
        {
          stroke: "#5d6676", grid: { stroke: "#eef0f3", width: 1 }, ticks: { stroke: "#dde1e7", width: 1 },
          size: 64, values: (u, splits) => splits.map((v) => format(v)), incrs: whole ? COUNT_INCRS : undefined,
        },
      ],
      series: [
        { label: "Time", value: (u, t) => (t == null ? "—" : timeLabel(t)) },
        ...variants.map((name, i) => ({
          label: name,
          stroke: variantColor(i),
          width: 2,
          dash: variantDash(i) || undefined,
          spanGaps: false,
          points: { show: true, size: 5, fill: variantColor(i) },
          value: (u, v) => format(v),
        })),
      ],
      hooks: {
        draw: [(u) => {
          // What the canvas shows, for tests and assistive tech: lines drawn and their points.
          const drawn = u.data.slice(1).filter((ys) => ys.some((y) => y != null)).length;
          host.dataset.lines = String(drawn);
          host.dataset.points = String(u.data[0].length);
        }],
      },
    };
    this.plot = new uPlot(opts, [[]].concat(variants.map(() => [])), host);
    host.setAttribute("role", "img");
    host.setAttribute("aria-label", `${title}, one line per variant (${variants.join(", ")})`);
  }

  update(x, byVariant) {
    this.plot.setData([x, ...this.variants.map((v) => byVariant[v] || x.map(() => null))]);
  }

  resize(width) {
    if (width > 0 && Math.abs(width - this.plot.width) > 1) this.plot.setSize({ width, height: this.plot.height });
  }

  destroy() {
    this.plot.destroy();
  }
}

/** The grid of charts of one release: created once per release (and variant set), updated on each refresh. */
export class ChartGrid {
  constructor(container) {
    this.container = container;
    this.key = null;
    this.charts = [];
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(container);
  }

  render(points, variants, bucketS, untilS) {
    const key = `${variants.join("\u0000")}|${bucketS}`;
    if (key !== this.key) this.build(variants, bucketS, key);
    const { x, byMetric } = align(points, variants, bucketS, untilS);
    for (const { id, chart, figure } of this.charts) {
      chart.update(x, byMetric[id]);
      const empty = !Object.values(byMetric[id]).some((ys) => ys.some((y) => y != null && (id !== "requests" || y > 0)));
      figure.classList.toggle("no-data", empty);
    }
    return x.length;
  }

  build(variants, bucketS, key) {
    this.clear();
    this.key = key;
    for (const [id, title, format, , floorTop] of METRICS) {
      const figure = document.createElement("figure");
      figure.className = "chart";
      figure.dataset.metric = id;
      const caption = document.createElement("figcaption");
      caption.id = `chart-title-${id}`;
      caption.textContent = title;
      const host = document.createElement("div");
      host.className = "chart-plot";
      host.id = `chart-${id}`;
      const note = document.createElement("p");
      note.className = "chart-empty muted small-text";
      note.textContent = "No data in this window yet.";
      figure.append(caption, host, note);
      this.container.append(figure);
      const chart = new LineChart(host, { title, format, variants, bucketS, floorTop, whole: id === "requests" });
      this.charts.push({ id, chart, figure });
    }
  }

  resize() {
    for (const { chart, figure } of this.charts) chart.resize(Math.floor(figure.getBoundingClientRect().width) - 2);
  }

  clear() {
    for (const { chart } of this.charts) chart.destroy();
    this.charts = [];
    this.key = null;
    this.container.replaceChildren();
  }
}
