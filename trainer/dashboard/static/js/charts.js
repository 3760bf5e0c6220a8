// Charts drawn by uPlot (vendored, MIT); x is unix seconds, shown in local time, unless the
// chart is made with { xTime: false } (then x is a plain number, e.g. a weight version).

const COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

export function colour(i) {
  return COLOURS[i % COLOURS.length];
}

export class TimeChart {
  // labels: series names (y columns), in order.
  constructor(container, title, labels, { id, yLabel, xTime = true } = {}) {
    this.box = document.createElement("div");
    this.box.className = "chart";
    if (id) this.box.dataset.chart = id;
    const h = document.createElement("h3");
    h.textContent = title;
    this.body = document.createElement("div");
    this.box.append(h, this.body);
    container.append(this.box);
    this.labels = labels;
    this.yLabel = yLabel;
    this.xTime = xTime;
    this.plot = null;
    this.resize = new ResizeObserver(() => this.plot && this.plot.setSize(this.size()));
    this.resize.observe(this.box);
  }

  size() {
    return { width: Math.max(240, this.box.clientWidth - 16), height: 220 };
  }

  // data: [xs, ys1, ys2, ...] (nulls are gaps)
  set(data, labels = this.labels) {
    const points = data[0].length;
    this.box.dataset.points = String(points);
    if (!points) {
      this.destroyPlot();
      this.body.replaceChildren(Object.assign(document.createElement("div"), { className: "empty", textContent: "no data yet" }));
      return;
    }
    if (this.plot && labels.join("|") === this.labels.join("|")) {
      this.plot.setData(data);
      return;
    }
    this.destroyPlot();
    this.labels = labels;
    this.body.replaceChildren();
    const opts = {
      ...this.size(),
      series: [
        {},
        ...labels.map((label, i) => ({ label, stroke: colour(i), width: 2, points: { size: 5 }, spanGaps: true })),
      ],
      axes: [{}, { label: this.yLabel, size: 56 }],
      scales: { x: { time: this.xTime } },
      legend: { live: true },
    };
    this.plot = new uPlot(opts, data, this.body);
  }

  destroyPlot() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }

  destroy() {
    this.resize.disconnect();
    this.destroyPlot();
  }
}
