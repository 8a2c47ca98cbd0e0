// A small SVG chart for the explorer: lines, steps and markers on linear or log axes, a legend that
// hides and shows series, a tooltip on the nearest point, drag to zoom along x, double-click to reset.

const SVG = "http://www.w3.org/2000/svg";
const PAD = { left: 64, right: 16, top: 12, bottom: 40 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

export function fmt(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2).replace("e+", "e");
  if (Number.isInteger(v)) return v.toLocaleString("en-US");
  return String(Number(v.toPrecision(4)));
}

function linearTicks(lo, hi, n = 6) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

function logTicks(lo, hi) {
  const out = [];
  const a = Math.floor(Math.log10(lo));
  const b = Math.ceil(Math.log10(hi));
  const mults = b - a <= 2 ? [1, 2, 5] : [1];
  for (let e = a; e <= b; e++) for (const m of mults) {
    const t = m * 10 ** e;
    if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) out.push(t);
  }
  return out.length >= 2 ? out : [lo, hi];
}

function extent(values, log) {
  const vs = values.filter((v) => Number.isFinite(v) && (!log || v > 0));
  if (!vs.length) return log ? [1, 10] : [0, 1];
  let lo = Math.min(...vs);
  let hi = Math.max(...vs);
  if (log) {
    if (lo === hi) { lo /= 2; hi *= 2; }
    const pad = (Math.log10(hi) - Math.log10(lo)) * 0.06;
    return [lo / 10 ** pad, hi * 10 ** pad];
  }
  if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
  const pad = (hi - lo) * 0.06;
  return [lo >= 0 && lo - pad < 0 ? 0 : lo - pad, hi + pad];
}

function scale(lo, hi, a, b, log) {
  const f = log ? Math.log10 : (v) => v;
  const l = f(lo);
  const h = f(hi);
  const s = (v) => a + ((f(v) - l) / (h - l || 1)) * (b - a);
  s.invert = (p) => { const v = l + ((p - a) / (b - a)) * (h - l); return log ? 10 ** v : v; };
  return s;
}

// opts: {series: [{name, color, points: [[x, y, label?]], kind: "line"|"step"|"points"|"band", marker: "dot"|"cross",
//        dash, hidden}], xLog, yLog, xLabel, yLabel, xMin, xMax, yMin, xTicks: [x], vlines: [x], height}
// A "band" series' points are [x, low, high]: the area between, shaded.
export class Chart {
  constructor(container, opts) {
    this.container = container;
    this.opts = opts;
    this.hidden = new Set(opts.series.filter((s) => s.hidden).map((s) => s.name));
    this.zoom = null;
    this.render();
  }

  update(opts) {
    this.opts = opts;
    this.render();
  }

  visible() {
    return this.opts.series.filter((s) => !this.hidden.has(s.name));
  }

  render() {
    const o = this.opts;
    const width = Math.max(this.container.clientWidth || 600, 320);
    const height = o.height || 280;
    this.container.textContent = "";
    this.container.classList.add("chart");
    const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": o.title || `${o.yLabel} vs ${o.xLabel}` }, this.container);
    const series = this.visible();
    const pts = series.flatMap((s) => s.points);
    let [x0, x1] = extent(pts.map((p) => p[0]).concat(o.xExtra || []), o.xLog);
    const highs = series.filter((s) => s.kind === "band").flatMap((s) => s.points.map((p) => p[2]));
    let [y0, y1] = extent(pts.map((p) => p[1]).concat(highs, o.yExtra || []), o.yLog);
    if (o.xMin !== undefined) x0 = o.xMin;
    if (o.xMax !== undefined) x1 = o.xMax;
    if (o.yMin !== undefined) y0 = o.yMin;
    if (o.yMax !== undefined && o.yMax < y1) y1 = o.yMax; // what lies above is clipped: it runs off the top
    if (this.zoom) [x0, x1] = this.zoom;
    const X = scale(x0, x1, PAD.left, width - PAD.right, o.xLog);
    const Y = scale(y0, y1, height - PAD.bottom, PAD.top, o.yLog);
    this.X = X; this.Y = Y;

    const axes = el("g", { class: "axes" }, svg);
    const xTicks = o.xTicks ? o.xTicks.filter((t) => t >= x0 && t <= x1) : [];
    for (const t of xTicks.length >= 2 ? xTicks : o.xLog ? logTicks(x0, x1) : linearTicks(x0, x1)) {
      el("line", { x1: X(t), x2: X(t), y1: PAD.top, y2: height - PAD.bottom, class: "grid" }, axes);
      el("text", { x: X(t), y: height - PAD.bottom + 14, class: "tick", "text-anchor": "middle" }, axes).textContent = fmt(t);
    }
    for (const t of o.yLog ? logTicks(y0, y1) : linearTicks(y0, y1, 5)) {
      el("line", { x1: PAD.left, x2: width - PAD.right, y1: Y(t), y2: Y(t), class: "grid" }, axes);
      el("text", { x: PAD.left - 6, y: Y(t) + 4, class: "tick", "text-anchor": "end" }, axes).textContent = fmt(t);
    }
    el("rect", { x: PAD.left, y: PAD.top, width: width - PAD.left - PAD.right, height: height - PAD.top - PAD.bottom,
      class: "frame" }, axes);
    el("text", { x: (PAD.left + width - PAD.right) / 2, y: height - 6, class: "label", "text-anchor": "middle" }, axes)
      .textContent = o.xLabel || "";
    el("text", { x: 14, y: (PAD.top + height - PAD.bottom) / 2, class: "label", "text-anchor": "middle",
      transform: `rotate(-90 14 ${(PAD.top + height - PAD.bottom) / 2})` }, axes).textContent = o.yLabel || "";

    const clipId = `clip-${Math.random().toString(36).slice(2)}`;
    el("rect", { x: PAD.left, y: PAD.top, width: width - PAD.left - PAD.right, height: height - PAD.top - PAD.bottom },
      el("clipPath", { id: clipId }, el("defs", {}, svg)));
    const plot = el("g", { "clip-path": `url(#${clipId})` }, svg);
    for (const v of o.vlines || []) {
      el("line", { x1: X(v), x2: X(v), y1: PAD.top, y2: height - PAD.bottom, class: "vline" }, plot);
    }
    const ok = (p) => Number.isFinite(p[0]) && Number.isFinite(p[1]) && (!o.xLog || p[0] > 0) && (!o.yLog || p[1] > 0);
    for (const s of series) {
      const g = el("g", { class: `series ${s.kind || "line"}`, "data-name": s.name }, plot);
      const p = s.points.filter(ok);
      if (s.kind === "band") {
        const q = p.filter((b) => Number.isFinite(b[2]) && (!o.yLog || b[2] > 0));
        const edge = (pts, i) => pts.map((b, j) => `${j ? "L" : ""}${X(b[0])},${Y(b[i])}`).join("");
        if (q.length > 1) {
          el("path", { d: `M${edge(q, 1)}L${edge(q.slice().reverse(), 2)}Z`, fill: s.color, "fill-opacity": 0.18,
            stroke: "none" }, g);
        }
        continue;
      }
      if (s.kind === "line" || s.kind === "step" || !s.kind) {
        let d = "";
        p.forEach(([x, y], i) => {
          if (i === 0) d += `M${X(x)},${Y(y)}`;
          else if (s.kind === "step") d += `H${X(x)}V${Y(y)}`;
          else d += `L${X(x)},${Y(y)}`;
        });
        if (d) el("path", { d, stroke: s.color, fill: "none", "stroke-width": s.width || 2,
          "stroke-dasharray": s.dash || "" }, g);
      }
      if (s.kind === "points" || s.markers) {
        for (const [x, y] of p) {
          if (s.marker === "cross") {
            el("path", { d: `M${X(x) - 5},${Y(y) - 5}l10,10m0,-10l-10,10`, stroke: s.color, "stroke-width": 2 }, g);
          } else {
            el("circle", { cx: X(x), cy: Y(y), r: s.radius || 4, fill: s.color, stroke: "#fff", "stroke-width": 1 }, g);
          }
        }
      }
    }
    this.legend();
    this.interact(svg, series.filter((s) => s.kind !== "band").map((s) => ({ s, p: s.points.filter(ok) })), width,
      height);
  }

  legend() {
    const box = document.createElement("div");
    box.className = "legend";
    for (const s of this.opts.series) {
      if (s.legend === false) continue;
      const item = document.createElement("button");
      item.type = "button";
      item.className = this.hidden.has(s.name) ? "off" : "";
      item.innerHTML = `<span class="swatch"></span>`;
      item.querySelector(".swatch").style.background = s.color;
      item.append(s.name);
      item.title = "show or hide";
      item.onclick = () => {
        if (this.hidden.has(s.name)) this.hidden.delete(s.name); else this.hidden.add(s.name);
        this.render();
      };
      box.appendChild(item);
    }
    this.container.appendChild(box);
  }

  interact(svg, drawn, width, height) {
    const tip = document.createElement("div");
    tip.className = "tooltip";
    tip.hidden = true;
    this.container.appendChild(tip);
    const guide = el("line", { y1: PAD.top, y2: height - PAD.bottom, class: "guide", visibility: "hidden" }, svg);
    const dot = el("circle", { r: 6, class: "focus", visibility: "hidden" }, svg);
    const brush = el("rect", { y: PAD.top, height: height - PAD.top - PAD.bottom, class: "brush", visibility: "hidden" }, svg);
    let dragFrom = null;
    const local = (ev) => {
      const r = svg.getBoundingClientRect();
      return [ev.clientX - r.left, ev.clientY - r.top];
    };
    svg.addEventListener("mousemove", (ev) => {
      const [mx, my] = local(ev);
      if (dragFrom !== null) {
        brush.setAttribute("x", Math.min(dragFrom, mx));
        brush.setAttribute("width", Math.abs(mx - dragFrom));
        brush.setAttribute("visibility", "visible");
      }
      let best = null;
      for (const { s, p } of drawn) {
        if (s.tooltip === false) continue;
        for (const pt of p) {
          const d = Math.hypot(this.X(pt[0]) - mx, (this.Y(pt[1]) - my) * 0.5);
          if (!best || d < best.d) best = { d, s, pt };
        }
      }
      if (!best || best.d > 60 || mx < PAD.left || mx > width - PAD.right) {
        tip.hidden = true; guide.setAttribute("visibility", "hidden"); dot.setAttribute("visibility", "hidden");
        return;
      }
      const [x, y, label] = best.pt;
      const px = this.X(x);
      const py = this.Y(y);
      guide.setAttribute("x1", px); guide.setAttribute("x2", px); guide.setAttribute("visibility", "visible");
      dot.setAttribute("cx", px); dot.setAttribute("cy", py); dot.setAttribute("stroke", best.s.color);
      dot.setAttribute("visibility", "visible");
      const o = this.opts;
      const lines = [[best.s.name, "b"], [`${o.xLabel || "x"}: ${fmt(x)}`], [`${o.yLabel || "y"}: ${fmt(y)}`]];
      if (label) lines.push([label, "i"]);
      tip.replaceChildren(...lines.map(([text, tag = "div"]) => {
        const line = document.createElement(tag);
        line.textContent = text;
        return line;
      }));
      tip.hidden = false;
      tip.style.left = `${Math.min(px + 12, width - 180)}px`;
      tip.style.top = `${Math.max(py - 10, 0)}px`;
    });
    svg.addEventListener("mouseleave", () => {
      tip.hidden = true; guide.setAttribute("visibility", "hidden"); dot.setAttribute("visibility", "hidden");
      dragFrom = null; brush.setAttribute("visibility", "hidden");
    });
    svg.addEventListener("mousedown", (ev) => { dragFrom = local(ev)[0]; ev.preventDefault(); });
    svg.addEventListener("mouseup", (ev) => {
      const to = local(ev)[0];
      if (dragFrom !== null && Math.abs(to - dragFrom) > 8) {
        const a = this.X.invert(Math.min(dragFrom, to));
        const b = this.X.invert(Math.max(dragFrom, to));
        this.zoom = [a, b];
        dragFrom = null;
        this.render();
        return;
      }
      dragFrom = null;
      brush.setAttribute("visibility", "hidden");
    });
    svg.addEventListener("dblclick", () => { this.zoom = null; this.render(); });
  }
}
