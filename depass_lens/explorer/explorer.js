/* DePass feature-graph explorer: vanilla JS + SVG, no libraries, no network.
 *
 * Reads the graph JSON (format depass_lens.feature_graph/1) from the page's JSON script
 * element, #graph-data. Edges are indexed by node once at load (CSR arrays), so selecting a
 * node touches only its own edges.
 */
(function () {
  "use strict";

  var KINDS = ["value", "query", "key", "mlp", "direct"];
  var KIND_DASH = { direct: "", value: "9 3", query: "4 3", key: "1.5 2.5", mlp: "10 3 2 3" };
  var NODE_KIND_ORDER = { token: 0, position: 1, latent: 2, error: 3, constant: 4, target: 5 };
  var RDBU = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
    "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"];
  var POS_COLOR = "#b2182b";
  var NEG_COLOR = "#2166ac";
  var GROUP_COLORS = ["#7c3aed", "#059669", "#d97706", "#db2777", "#0891b2", "#65a30d",
    "#9333ea", "#ea580c"];
  var LIST_LIMIT = 100;       // edges listed per direction before "show all"
  var DRAW_LIMIT = 400;       // edges of the selected node drawn (strongest first)
  var SUBGRAPH_DRAW_LIMIT = 1500;

  var data = JSON.parse(document.getElementById("graph-data").textContent);
  var nodes = data.nodes;
  var tokens = data.tokens;
  var layers = data.layers;
  var N = nodes.length;
  var T = tokens.length;
  var R = layers.length;
  var svg = document.getElementById("graph");
  var SVG_NS = svg.namespaceURI;

  // ---- edges: typed arrays + CSR index by node -------------------------------------------
  var E = data.edges.length;
  var eSrc = new Int32Array(E), eTgt = new Int32Array(E), eKind = new Uint8Array(E);
  var eW = new Float64Array(E);
  var inCount = new Int32Array(N + 1), outCount = new Int32Array(N + 1);
  var kindTotals = [0, 0, 0, 0, 0];
  for (var e = 0; e < E; e++) {
    var rec = data.edges[e];
    eSrc[e] = rec[0]; eTgt[e] = rec[1]; eKind[e] = KINDS.indexOf(rec[2]); eW[e] = rec[3];
    outCount[rec[0] + 1]++; inCount[rec[1] + 1]++; kindTotals[eKind[e]]++;
  }
  for (var i = 0; i < N; i++) { inCount[i + 1] += inCount[i]; outCount[i + 1] += outCount[i]; }
  var inStart = inCount, outStart = outCount;
  var inList = new Int32Array(E), outList = new Int32Array(E);
  var inFill = inStart.slice(0, N), outFill = outStart.slice(0, N);
  for (e = 0; e < E; e++) { inList[inFill[eTgt[e]]++] = e; outList[outFill[eSrc[e]]++] = e; }
  var sortedCache = {};
  function edgesOf(n, dir) {  // edge indices of node n, strongest first (cached)
    var key = dir + n;
    if (sortedCache[key]) return sortedCache[key];
    var start = dir === "in" ? inStart : outStart, list = dir === "in" ? inList : outList;
    var out = Array.prototype.slice.call(list.subarray(start[n], start[n + 1]));
    out.sort(function (a, b) { return Math.abs(eW[b]) - Math.abs(eW[a]); });
    sortedCache[key] = out;
    return out;
  }

  // ---- state ---------------------------------------------------------------------------------
  var state = {
    selected: -1,
    kinds: { value: true, query: true, key: true, mlp: true, direct: true },
    pinned: [],              // node indices, in pin order
    pinnedSet: new Set(),
    supernodes: [],          // {name, members: [node indices], color}
    groupOf: new Map(),      // node index -> supernode
    showAll: { in: false, out: false },
    neighbors: [],
    matches: []
  };

  // ---- formatting ---------------------------------------------------------------------------
  function fmt(x) {
    if (x === null || x === undefined) return "—";
    if (Number.isInteger(x)) return String(x);
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return a >= 100 ? x.toFixed(1) : x.toPrecision(3);
  }
  function signed(x) {
    var s = fmt(x);
    return x > 0 ? "+" + s : s;
  }
  function showToken(t) {
    return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣");
  }
  function short(t, n) { return t.length > n ? t.slice(0, n - 1) + "…" : t; }
  function nodeName(n) { return nodes[n].id; }
  function posText(node) {
    if (node.pos === null || node.pos === undefined) return "pooled";
    return node.pos + " " + showToken(tokens[node.pos]);
  }
  function el(tag, attrs, text) {
    var x = document.createElement(tag);
    if (attrs) for (var k in attrs) x.setAttribute(k, attrs[k]);
    if (text !== undefined) x.textContent = text;
    return x;
  }
  function sv(tag, attrs) {
    var x = document.createElementNS(SVG_NS, tag);
    if (attrs) for (var k in attrs) x.setAttribute(k, attrs[k]);
    return x;
  }

  // ---- colour scale ---------------------------------------------------------------------------
  var scoreMax = 0, inflMax = 0;
  nodes.forEach(function (n) {
    if (n.kind === "target") return;
    if (typeof n.score === "number") scoreMax = Math.max(scoreMax, Math.abs(n.score));
    if (typeof n.influence === "number") inflMax = Math.max(inflMax, n.influence);
  });
  if (scoreMax === 0) scoreMax = 1;
  function hexRgb(h) {
    return [parseInt(h.slice(1, 3), 16), parseInt(h.slice(3, 5), 16), parseInt(h.slice(5, 7), 16)];
  }
  var RDBU_RGB = RDBU.map(hexRgb);
  function scoreColor(s) {
    if (typeof s !== "number") return "#d4d4d8";
    var t = Math.max(-1, Math.min(1, s / scoreMax));
    var x = (t + 1) / 2 * (RDBU_RGB.length - 1);
    var k = Math.min(RDBU_RGB.length - 2, Math.floor(x)), f = x - k;
    var a = RDBU_RGB[k], b = RDBU_RGB[k + 1];
    return "rgb(" + [0, 1, 2].map(function (j) { return Math.round(a[j] + (b[j] - a[j]) * f); })
      .join(",") + ")";
  }

  // ---- header, stats, legend -------------------------------------------------------------------
  var titleText = "Feature graph" + (data.model ? " · " + data.model : "");
  document.getElementById("title").textContent = titleText;
  var promptEl = document.getElementById("prompt");
  if (data.prompt) {
    promptEl.appendChild(el("span", { "class": "muted" }, "prompt "));
    promptEl.appendChild(el("q", null, data.prompt));
    promptEl.title = data.prompt;
  }
  var stats = document.getElementById("stats");
  function stat(name, value, title) {
    var s = el("span", { "class": "stat", title: title || "" });
    s.appendChild(el("span", { "class": "muted" }, name + " "));
    s.appendChild(el("b", null, value));
    stats.appendChild(s);
  }
  if (data.target) {
    stat("target", (data.target.name || "") +
      (typeof data.target.value === "number" ? " = " + fmt(data.target.value) : ""));
  }
  if (data.attention) stat("attention", data.attention, "how attention is treated");
  stat("nodes", String(N)); stat("edges", String(E), "edge records (one per kind)");
  if (data.scores) {
    Object.keys(data.scores).forEach(function (k) {
      stat(k.replace(/_/g, " "), fmt(data.scores[k]));
    });
  }
  if (data.pruning) {
    stat("pruning", Object.keys(data.pruning).map(function (k) {
      return k.replace(/_threshold$/, "") + " " + fmt(data.pruning[k]);
    }).join(", "), "pruning thresholds (cumulative influence kept)");
  }
  var bar = document.getElementById("legend-bar");
  bar.style.background = "linear-gradient(to right, " + RDBU.join(", ") + ")";
  document.getElementById("legend-min").textContent = signed(-scoreMax);
  document.getElementById("legend-max").textContent = signed(scoreMax);
  bar.title = "node colour: signed attribution to the target (score)";
  var legendKinds = document.getElementById("legend-kinds");
  [["kind-latent", "latent"], ["kind-error", "error"], ["kind-token", "embedding"],
    ["kind-constant", "constant"], ["kind-target", "target"]].forEach(function (k) {
    var s = el("span", { "class": "legend-node" });
    var mini = sv("svg", { width: 15, height: 15 });
    mini.appendChild(sv("circle", { cx: 7.5, cy: 7.5, r: 5, fill: "#f4f4f5",
      "class": "node " + k[0] }));
    s.appendChild(mini); s.appendChild(document.createTextNode(k[1]));
    legendKinds.appendChild(s);
  });
  legendKinds.appendChild(el("span", { "class": "muted" }, "size = influence"));

  // ---- kind filters -----------------------------------------------------------------------------
  var filters = document.getElementById("kind-filters");
  KINDS.forEach(function (k, ki) {
    var lab = el("label", { "class": "kind-filter", title: k + " edges" });
    var box = el("input", { type: "checkbox", "data-testid": "kind-filter-" + k, "data-kind": k,
      id: "kind-" + k });
    box.checked = true;
    box.addEventListener("change", function () {
      state.kinds[k] = box.checked;
      refresh();
    });
    var sw = sv("svg", { width: 22, height: 10, "class": "kind-swatch" });
    sw.appendChild(sv("line", { x1: 1, y1: 5, x2: 21, y2: 5, "stroke-dasharray": KIND_DASH[k] }));
    lab.appendChild(box); lab.appendChild(sw);
    lab.appendChild(document.createTextNode(k));
    lab.appendChild(el("span", { "class": "count" }, String(kindTotals[ki])));
    filters.appendChild(lab);
  });
  function kindOn(e) { return state.kinds[KINDS[eKind[e]]]; }

  // ---- layout -------------------------------------------------------------------------------
  var SIDE = T;  // column index of the side column (constants, pooled nodes)
  var cells = new Map();
  var cellCountByCol = new Int32Array(T + 1);
  nodes.forEach(function (n, idx) {
    var col = (n.pos === null || n.pos === undefined) ? SIDE : n.pos;
    var key = n.row * (T + 1) + col;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(idx);
  });
  var maxCell = 1;
  cells.forEach(function (list, key) {
    var col = key % (T + 1);
    cellCountByCol[col] = Math.max(cellCountByCol[col], list.length);
    maxCell = Math.max(maxCell, list.length);
    list.sort(function (a, b) {
      var A = nodes[a], B = nodes[b];
      return (NODE_KIND_ORDER[A.kind] - NODE_KIND_ORDER[B.kind]) ||
        ((B.influence || 0) - (A.influence || 0)) ||
        (Math.abs(B.score || 0) - Math.abs(A.score || 0));
    });
  });
  var RMAX = maxCell <= 4 ? 13 : maxCell <= 12 ? 10 : maxCell <= 40 ? 8 : 6;
  var RMIN = Math.max(3, RMAX * 0.32);
  var SLOT = 2 * RMAX + 5;
  function radius(n) {
    var node = nodes[n];
    if (node.kind === "target") return RMAX;
    if (typeof node.influence !== "number" || inflMax === 0) return RMIN + (RMAX - RMIN) * 0.35;
    return RMIN + (RMAX - RMIN) * Math.sqrt(node.influence / inflMax);
  }

  var measure = document.createElement("canvas").getContext("2d");
  measure.font = "12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace";
  var hasSide = cellCountByCol[SIDE] > 0;
  var colX = [], colW = [], perLine = [];
  var x = 0, SIDE_GAP = 18, COL_PAD = 10;
  for (var c = 0; c <= T; c++) {
    if (c === SIDE && !hasSide) { colX.push(x); colW.push(0); perLine.push(1); break; }
    if (c === SIDE) x += SIDE_GAP;
    var count = Math.max(1, cellCountByCol[c]);
    var maxPer = c === SIDE ? 6 : 4;
    var per = Math.max(1, Math.min(maxPer, Math.ceil(Math.sqrt(count / 1.5))));
    var label = c === SIDE ? "const / pooled" : short(showToken(tokens[c]), 14);
    var w = Math.max(48, measure.measureText(label).width + 16, per * SLOT + COL_PAD);
    colX.push(x); colW.push(w); perLine.push(per);
    x += w;
  }
  var width = Math.ceil(x + 8);
  var ROW_PAD = 12;
  var rowH = new Array(R).fill(SLOT + 2 * ROW_PAD);
  cells.forEach(function (list, key) {
    var r = Math.floor(key / (T + 1)), col = key % (T + 1);
    var lines = Math.ceil(list.length / perLine[col]);
    rowH[r] = Math.max(rowH[r], lines * SLOT + 2 * ROW_PAD);
  });
  // Stretch the rows to fill the window's height when the graph is shorter (up to 1.6x).
  // (The toolbar above is filled in by now, so the height left for the graph is final.)
  var avail = document.getElementById("graph-scroll").clientHeight - 56;
  var natural = rowH.reduce(function (a, b) { return a + b; }, 0);
  var stretch = Math.max(1, Math.min(1.6, avail / natural));
  rowH = rowH.map(function (h) { return Math.floor(h * stretch); });
  var rowY = new Array(R);  // top edge of each row band; row R-1 (target) on top
  var y = 0;
  for (var r = R - 1; r >= 0; r--) { rowY[r] = y; y += rowH[r]; }
  var height = Math.ceil(y);
  var nx = new Float64Array(N), ny = new Float64Array(N), nr = new Float64Array(N);
  cells.forEach(function (list, key) {
    var r = Math.floor(key / (T + 1)), col = key % (T + 1);
    var per = perLine[col], lines = Math.ceil(list.length / per);
    var top = rowY[r] + (rowH[r] - lines * SLOT) / 2 + SLOT / 2;
    list.forEach(function (n, k) {
      var line = Math.floor(k / per), inLine = Math.min(per, list.length - line * per);
      var left = colX[col] + colW[col] / 2 - (inLine - 1) * SLOT / 2;
      nx[n] = left + (k % per) * SLOT; ny[n] = top + line * SLOT; nr[n] = radius(n);
    });
  });

  // ---- static drawing: bands, axis labels, nodes -----------------------------------------------
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  var defs = sv("defs");
  [["arrow-pos", POS_COLOR], ["arrow-neg", NEG_COLOR]].forEach(function (m) {
    var marker = sv("marker", { id: m[0], viewBox: "0 0 10 10", refX: "9", refY: "5",
      markerWidth: "7", markerHeight: "7", markerUnits: "userSpaceOnUse", orient: "auto" });
    marker.appendChild(sv("path", { d: "M0,1 L10,5 L0,9 z", fill: m[1] }));
    defs.appendChild(marker);
  });
  svg.insertBefore(defs, svg.firstChild);
  var bands = document.getElementById("layer-bands");
  var rowLabels = document.getElementById("row-labels");
  rowLabels.style.height = height + "px";
  for (r = 0; r < R; r++) {
    bands.appendChild(sv("rect", { x: 0, y: rowY[r], width: width, height: rowH[r],
      "class": "band " + (r % 2 ? "band-odd" : "band-even") }));
    var rl = el("div", { "class": "row-label", "data-row": r, title: layers[r] },
      short(layers[r], 16));
    rl.style.top = rowY[r] + "px"; rl.style.height = rowH[r] + "px";
    rowLabels.appendChild(rl);
  }
  for (c = 0; c <= T; c++) {
    if (colW[c] === 0) continue;
    bands.appendChild(sv("line", { x1: colX[c], x2: colX[c], y1: 0, y2: height,
      "class": c === SIDE ? "col-line side-line" : "col-line" }));
  }
  var colLabels = document.getElementById("col-labels");
  colLabels.setAttribute("width", width); colLabels.setAttribute("height", 38);
  for (c = 0; c <= T; c++) {
    if (colW[c] === 0) continue;
    var cx = colX[c] + colW[c] / 2;
    var idxText = sv("text", { x: cx, y: 13, "class": "col-index" });
    idxText.textContent = c === SIDE ? "" : String(c);
    var tokText = sv("text", { x: cx, y: 30, "class": c === SIDE ? "col-token side" : "col-token",
      "data-pos": c === SIDE ? "side" : c });
    tokText.textContent = c === SIDE ? "const / pooled" : short(showToken(tokens[c]), 14);
    var title = sv("title");
    title.textContent = c === SIDE ? "constants and pooled nodes" :
      "position " + c + ": " + JSON.stringify(tokens[c]);
    tokText.appendChild(title);
    colLabels.appendChild(idxText); colLabels.appendChild(tokText);
  }

  var nodeLayer = document.getElementById("layer-nodes");
  var nodeEls = new Array(N);
  for (i = 0; i < N; i++) {
    var node = nodes[i];
    var circle = sv("circle", { cx: nx[i].toFixed(1), cy: ny[i].toFixed(1),
      r: nr[i].toFixed(2), fill: scoreColor(node.score), "class": "node kind-" + node.kind,
      "data-node-id": node.id, "data-index": i, "data-testid": "graph-node" });
    nodeEls[i] = circle;
    nodeLayer.appendChild(circle);
  }

  // ---- edge drawing -----------------------------------------------------------------------------
  function edgePath(x1, y1, x2, y2, kindIndex) {
    var off = (kindIndex - 2) * 4;
    if (Math.abs(y1 - y2) < 1) {
      var lift = 24 + Math.abs(x2 - x1) * 0.18;
      return "M" + x1.toFixed(1) + "," + y1.toFixed(1) + " C" + (x1 + off).toFixed(1) + "," +
        (y1 - lift).toFixed(1) + " " + (x2 + off).toFixed(1) + "," + (y2 - lift).toFixed(1) + " " +
        x2.toFixed(1) + "," + y2.toFixed(1);
    }
    var my = (y1 + y2) / 2;
    return "M" + x1.toFixed(1) + "," + y1.toFixed(1) + " C" + (x1 + off).toFixed(1) + "," +
      my.toFixed(1) + " " + (x2 + off).toFixed(1) + "," + my.toFixed(1) + " " +
      x2.toFixed(1) + "," + y2.toFixed(1);
  }
  // Shorten a segment's end so the arrow touches the target circle's rim.
  function trimTo(x1, y1, x2, y2, r) {
    var dx = x2 - x1, dy = y2 - y1, d = Math.sqrt(dx * dx + dy * dy) || 1;
    if (Math.abs(y1 - y2) >= 1) { return [x2, y2 + (y1 > y2 ? r : -r)]; }
    return [x2 - dx / d * r, y2 - dy / d * r];
  }
  function drawEdges(group, items, cls) {
    // items: [x1, y1, x2, y2, r2, kindIndex, weight, dataAttrs]
    group.textContent = "";
    var maxAbs = 0;
    items.forEach(function (it) { maxAbs = Math.max(maxAbs, Math.abs(it[6])); });
    if (maxAbs === 0) maxAbs = 1;
    var frag = document.createDocumentFragment();
    items.slice().reverse().forEach(function (it) {  // strongest drawn last (on top)
      var end = trimTo(it[0], it[1], it[2], it[3], it[4] + 1.5);
      var w = it[6];
      var p = sv("path", { d: edgePath(it[0], it[1], end[0], end[1], it[5]),
        "class": "edge " + cls + " edge-" + KINDS[it[5]],
        stroke: w >= 0 ? POS_COLOR : NEG_COLOR,
        "stroke-width": (0.8 + 5.2 * Math.abs(w) / maxAbs).toFixed(2),
        "stroke-dasharray": KIND_DASH[KINDS[it[5]]],
        "marker-end": "url(#" + (w >= 0 ? "arrow-pos" : "arrow-neg") + ")" });
      var attrs = it[7];
      for (var k in attrs) p.setAttribute(k, attrs[k]);
      frag.appendChild(p);
    });
    group.appendChild(frag);
  }
  function selectedEdges() {
    var n = state.selected, out = [];
    if (n < 0) return out;
    edgesOf(n, "in").forEach(function (e) { if (kindOn(e)) out.push(e); });
    edgesOf(n, "out").forEach(function (e) { if (kindOn(e)) out.push(e); });
    out.sort(function (a, b) { return Math.abs(eW[b]) - Math.abs(eW[a]); });
    return out;
  }
  function drawSelected() {
    var group = document.getElementById("layer-edges");
    var list = selectedEdges().slice(0, DRAW_LIMIT);
    drawEdges(group, list.map(function (e) {
      var s = eSrc[e], t = eTgt[e];
      return [nx[s], ny[s], nx[t], ny[t], nr[t], eKind[e], eW[e], { "data-edge": e }];
    }), "edge-selected");
    // neighbours stay opaque while the rest of the graph dims
    state.neighbors.forEach(function (m) { nodeEls[m].classList.remove("neighbor"); });
    state.neighbors = [];
    list.forEach(function (e) {
      var m = eSrc[e] === state.selected ? eTgt[e] : eSrc[e];
      if (!nodeEls[m].classList.contains("neighbor")) {
        nodeEls[m].classList.add("neighbor"); state.neighbors.push(m);
      }
    });
    svg.classList.toggle("focus", state.selected >= 0);
  }

  // ---- pinned subgraph and supernodes -------------------------------------------------------------
  function unitOf(n) {
    var g = state.groupOf.get(n);
    return g ? "group:" + g.name : "node:" + n;
  }
  function unitName(u) { return u.indexOf("group:") === 0 ? u.slice(6) : nodes[+u.slice(5)].id; }
  function unitXY(u) {
    if (u.indexOf("node:") === 0) { var n = +u.slice(5); return [nx[n], ny[n], nr[n]]; }
    var g = findGroup(u.slice(6)), sx = 0, sy = 0;
    g.members.forEach(function (m) { sx += nx[m]; sy += ny[m]; });
    return [sx / g.members.length, sy / g.members.length, 8];
  }
  function findGroup(name) {
    for (var k = 0; k < state.supernodes.length; k++) {
      if (state.supernodes[k].name === name) return state.supernodes[k];
    }
    return null;
  }
  // Edges among pinned nodes, all kinds: [edge index]
  function pinnedEdges() {
    var out = [];
    state.pinned.forEach(function (n) {
      var start = outStart[n], end = outStart[n + 1];
      for (var k = start; k < end; k++) {
        var e = outList[k];
        if (state.pinnedSet.has(eTgt[e])) out.push(e);
      }
    });
    return out;
  }
  // Aggregated unit -> unit edges (a supernode's edges summed), per kind, internal ones dropped.
  function aggregatedEdges(onlyShownKinds) {
    var sums = new Map();
    pinnedEdges().forEach(function (e) {
      if (onlyShownKinds && !kindOn(e)) return;
      var a = unitOf(eSrc[e]), b = unitOf(eTgt[e]);
      if (a === b && a.indexOf("group:") === 0) return;
      var key = a + "\u0000" + b + "\u0000" + eKind[e];
      sums.set(key, (sums.get(key) || 0) + eW[e]);
    });
    var out = [];
    sums.forEach(function (w, key) {
      var parts = key.split("\u0000");
      out.push({ from: parts[0], to: parts[1], kind: +parts[2], weight: w });
    });
    out.sort(function (p, q) { return Math.abs(q.weight) - Math.abs(p.weight); });
    return out;
  }
  function drawSubgraph() {
    var group = document.getElementById("layer-subgraph");
    var marks = document.getElementById("layer-supernodes");
    marks.textContent = "";
    var show = document.getElementById("show-subgraph").checked;
    if (!show || state.pinned.length === 0) { group.textContent = ""; return; }
    var agg = aggregatedEdges(true).slice(0, SUBGRAPH_DRAW_LIMIT);
    drawEdges(group, agg.map(function (a) {
      var p = unitXY(a.from), q = unitXY(a.to);
      return [p[0], p[1], q[0], q[1], q[2], a.kind, a.weight,
        { "data-agg": unitName(a.from) + " → " + unitName(a.to) + "\n" + KINDS[a.kind] + "  " +
          signed(a.weight) }];
    }), "edge-subgraph");
    state.supernodes.forEach(function (g) {
      var c = unitXY("group:" + g.name);
      g.members.forEach(function (m) {
        marks.appendChild(sv("line", { x1: c[0], y1: c[1], x2: nx[m], y2: ny[m],
          stroke: g.color, "class": "group-spoke" }));
      });
      marks.appendChild(sv("rect", { x: c[0] - 7, y: c[1] - 7, width: 14, height: 14,
        transform: "rotate(45 " + c[0] + " " + c[1] + ")", fill: g.color,
        "class": "group-mark", "data-supernode": g.name }));
      var t = sv("text", { x: c[0] + 11, y: c[1] - 9, "class": "group-label", fill: g.color });
      t.textContent = g.name;
      marks.appendChild(t);
    });
  }
  function setPinned(n, on) {
    if (on === state.pinnedSet.has(n)) return;
    if (on) {
      state.pinned.push(n); state.pinnedSet.add(n);
    } else {
      state.pinned = state.pinned.filter(function (m) { return m !== n; });
      state.pinnedSet.delete(n);
      var g = state.groupOf.get(n);
      if (g) removeFromGroup(g, n);
    }
    nodeEls[n].classList.toggle("pinned", on);
    refresh();
  }
  function removeFromGroup(g, n) {
    g.members = g.members.filter(function (m) { return m !== n; });
    state.groupOf.delete(n);
    nodeEls[n].style.stroke = "";
    if (g.members.length === 0) state.supernodes = state.supernodes.filter(function (h) {
      return h !== g;
    });
  }
  var groupCounter = 0;
  function groupPinned() {
    var checked = Array.prototype.map.call(
      document.querySelectorAll("#pinned-list input[type=checkbox]:checked"),
      function (box) { return +box.getAttribute("data-index"); });
    var members = checked.length ? checked : state.pinned.filter(function (n) {
      return !state.groupOf.has(n);
    });
    if (members.length === 0) return;
    var input = document.getElementById("group-name");
    var name = input.value.trim() || "group " + (++groupCounter);
    while (findGroup(name) || nodes.some(function (n) { return n.id === name; })) name += "′";
    var g = { name: name, members: [], color: GROUP_COLORS[state.supernodes.length %
      GROUP_COLORS.length] };
    members.forEach(function (n) {
      var old = state.groupOf.get(n);
      if (old) removeFromGroup(old, n);
      g.members.push(n); state.groupOf.set(n, g);
      nodeEls[n].style.stroke = g.color;
    });
    state.supernodes.push(g);
    input.value = "";
    refresh();
  }
  function ungroup(g) {
    g.members.slice().forEach(function (n) { removeFromGroup(g, n); });
    refresh();
  }
  function renderSubgraphPanel() {
    var list = document.getElementById("pinned-list");
    list.textContent = "";
    document.getElementById("pinned-count").textContent = state.pinned.length ?
      String(state.pinned.length) : "";
    document.getElementById("pinned-empty").hidden = state.pinned.length > 0;
    state.pinned.forEach(function (n) {
      var g = state.groupOf.get(n);
      var li = el("li", { "data-testid": "pinned-item", "data-node-id": nodes[n].id });
      var box = el("input", { type: "checkbox", "data-index": n, "data-testid": "pin-check",
        title: "tick to group" });
      var name = el("button", { type: "button", "class": "link", title: "select" }, nodes[n].id);
      name.addEventListener("click", function () { select(n, true); });
      li.appendChild(box); li.appendChild(name);
      if (g) {
        var badge = el("span", { "class": "badge group-badge" }, g.name);
        badge.style.background = g.color;
        li.appendChild(badge);
      }
      var un = el("button", { type: "button", "class": "x", "data-testid": "unpin-button",
        title: "unpin" }, "×");
      un.addEventListener("click", function () { setPinned(n, false); });
      li.appendChild(un);
      list.appendChild(li);
    });
    var sl = document.getElementById("supernode-list");
    sl.textContent = "";
    state.supernodes.forEach(function (g) {
      var li = el("li", { "data-testid": "supernode-item", "data-supernode": g.name });
      var sw = el("span", { "class": "swatch" });
      sw.style.background = g.color;
      li.appendChild(sw);
      li.appendChild(el("b", null, g.name));
      li.appendChild(el("span", { "class": "muted" }, " " + g.members.length + " nodes: " +
        g.members.map(function (m) { return nodes[m].id; }).join(", ")));
      var b = el("button", { type: "button", "class": "x", "data-testid": "ungroup-button",
        title: "ungroup" }, "×");
      b.addEventListener("click", function () { ungroup(g); });
      li.appendChild(b);
      sl.appendChild(li);
    });
    var agg = aggregatedEdges(true);
    var el2 = document.getElementById("subgraph-edges");
    el2.textContent = "";
    var maxAbs = agg.length ? Math.abs(agg[0].weight) : 1;
    agg.slice(0, 200).forEach(function (a) {
      var li = el("li", { "class": "edge-item", "data-testid": "subgraph-edge",
        "data-kind": KINDS[a.kind], "data-weight": String(a.weight) });
      li.appendChild(weightBar(a.weight, maxAbs));
      li.appendChild(el("span", { "class": "edge-name" },
        unitName(a.from) + " → " + unitName(a.to)));
      li.appendChild(el("span", { "class": "badge kind-badge kind-" + KINDS[a.kind] },
        KINDS[a.kind]));
      li.appendChild(el("span", { "class": "edge-weight" }, signed(a.weight)));
      el2.appendChild(li);
    });
    document.getElementById("subgraph-edge-count").textContent = state.pinned.length ?
      String(agg.length) : "";
  }
  function exportSubgraph() {
    var edgesOut = pinnedEdges().map(function (e) {
      return [nodes[eSrc[e]].id, nodes[eTgt[e]].id, KINDS[eKind[e]], eW[e]];
    });
    var doc = {
      format: "depass_lens.feature_subgraph/1",
      graph: { format: data.format, model: data.model, prompt: data.prompt,
        target: data.target, attention: data.attention },
      nodes: state.pinned.map(function (n) { return nodes[n]; }),
      edges: edgesOut,
      supernodes: state.supernodes.map(function (g) {
        return { name: g.name, members: g.members.map(function (m) { return nodes[m].id; }) };
      }),
      supernode_edges: aggregatedEdges(false).map(function (a) {
        return [unitName(a.from), unitName(a.to), KINDS[a.kind], a.weight];
      })
    };
    var text = JSON.stringify(doc, null, 2);
    document.getElementById("export-json").value = text;
    var url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
    var a = el("a", { href: url, download: "subgraph.json" });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(url); }, 5000);
  }

  // ---- side panel: the selected node -------------------------------------------------------------
  function weightBar(w, maxAbs) {
    var b = el("span", { "class": "wbar" });
    var f = el("span", { "class": w >= 0 ? "wfill pos" : "wfill neg" });
    f.style.width = Math.max(2, Math.round(100 * Math.abs(w) / (maxAbs || 1))) + "%";
    b.appendChild(f);
    return b;
  }
  function renderEdgeList(dir) {
    var n = state.selected;
    var listEl = document.getElementById(dir === "in" ? "incoming-edges" : "outgoing-edges");
    var countEl = document.getElementById(dir === "in" ? "incoming-count" : "outgoing-count");
    listEl.textContent = "";
    var all = edgesOf(n, dir);
    var shown = all.filter(kindOn);
    countEl.textContent = shown.length === all.length ? String(all.length) :
      shown.length + " of " + all.length;
    var maxAbs = shown.length ? Math.abs(eW[shown[0]]) : 1;
    var limit = state.showAll[dir] ? shown.length : Math.min(shown.length, LIST_LIMIT);
    var frag = document.createDocumentFragment();
    for (var k = 0; k < limit; k++) {
      var e = shown[k], other = dir === "in" ? eSrc[e] : eTgt[e];
      var li = el("li", { "class": "edge-item", "data-testid": "edge-item", "data-edge": e,
        "data-node-id": nodes[other].id, "data-kind": KINDS[eKind[e]],
        "data-weight": String(eW[e]), tabindex: "0", title: "go to " + nodes[other].id });
      li.appendChild(weightBar(eW[e], maxAbs));
      li.appendChild(el("span", { "class": "edge-name" }, nodes[other].id));
      li.appendChild(el("span", { "class": "badge kind-badge kind-" + KINDS[eKind[e]] },
        KINDS[eKind[e]]));
      li.appendChild(el("span", { "class": "edge-weight" }, signed(eW[e])));
      frag.appendChild(li);
    }
    listEl.appendChild(frag);
    if (limit < shown.length) {
      var more = el("li", { "class": "more" });
      var btn = el("button", { type: "button", "class": "link",
        "data-testid": "show-all-" + (dir === "in" ? "incoming" : "outgoing") },
        "show all " + shown.length);
      btn.addEventListener("click", function () { state.showAll[dir] = true; renderEdgeList(dir); });
      more.appendChild(btn);
      listEl.appendChild(more);
    }
    if (shown.length === 0) listEl.appendChild(el("li", { "class": "muted empty" }, "none"));
  }
  function renderNodePanel() {
    var n = state.selected;
    document.getElementById("node-empty").hidden = n >= 0;
    document.getElementById("node-details").hidden = n < 0;
    if (n < 0) return;
    var node = nodes[n];
    document.getElementById("node-title").textContent = node.id;
    document.getElementById("node-label").textContent = node.label || "";
    var pin = document.getElementById("pin-button");
    pin.textContent = state.pinnedSet.has(n) ? "Unpin" : "Pin";
    pin.classList.toggle("active", state.pinnedSet.has(n));
    var meta = document.getElementById("node-meta");
    meta.textContent = "";
    [["kind", node.kind], ["layer", layers[node.row]], ["site", node.site],
      ["index", node.index], ["position", posText(node)],
      ["activation", node.activation], ["score", node.score], ["influence", node.influence]]
      .forEach(function (kv) {
        if (kv[1] === undefined || kv[1] === null) return;
        meta.appendChild(el("dt", null, kv[0]));
        var v = typeof kv[1] === "number" ? (kv[0] === "score" ? signed(kv[1]) : fmt(kv[1])) :
          String(kv[1]);
        meta.appendChild(el("dd", { "data-field": kv[0] }, v));
      });
    renderEdgeList("in");
    renderEdgeList("out");
    var lens = document.getElementById("logit-lens");
    lens.textContent = "";
    var lensRows = node.lens || [];
    document.getElementById("lens-block").hidden = lensRows.length === 0;
    var lensMax = 0;
    lensRows.forEach(function (p) { lensMax = Math.max(lensMax, Math.abs(p[1])); });
    lensRows.forEach(function (p) {
      var tr = el("tr");
      tr.appendChild(el("td", { "class": "tok" }, showToken(p[0])));
      var td = el("td", { "class": "bar-cell" });
      td.appendChild(weightBar(p[1], lensMax));
      tr.appendChild(td);
      tr.appendChild(el("td", { "class": "num" }, signed(p[1])));
      lens.appendChild(tr);
    });
    var prompts = document.getElementById("top-prompts");
    prompts.textContent = "";
    var rows = node.top_prompts || [];
    document.getElementById("prompts-block").hidden = rows.length === 0;
    rows.forEach(function (p) {
      var li = el("li", { "data-testid": "top-prompt" });
      li.appendChild(el("span", { "class": "prompt-text" }, p.text));
      var info = el("span", { "class": "prompt-at" });
      var bits = [];
      if (p.token !== undefined) bits.push(showToken(p.token));
      if (p.pos !== undefined && p.pos !== null) bits.push("@" + p.pos);
      if (typeof p.activation === "number") bits.push("act " + fmt(p.activation));
      info.textContent = bits.join("  ");
      li.appendChild(info);
      prompts.appendChild(li);
    });
  }

  // ---- selection, refresh ------------------------------------------------------------------------
  function select(n, scroll) {
    if (state.selected >= 0) nodeEls[state.selected].classList.remove("selected");
    state.selected = n;
    state.showAll = { in: false, out: false };
    if (n >= 0) {
      nodeEls[n].classList.add("selected");
      if (scroll) scrollToNode(n);
    }
    refresh();
  }
  function scrollToNode(n) {
    var box = document.getElementById("graph-scroll");
    var labelW = document.getElementById("row-labels").offsetWidth;
    var left = nx[n] + labelW - box.clientWidth / 2, top = ny[n] - box.clientHeight / 2;
    box.scrollTo({ left: Math.max(0, left), top: Math.max(0, top), behavior: "auto" });
  }
  function refresh() {
    drawSelected();
    drawSubgraph();
    renderNodePanel();
    renderSubgraphPanel();
  }

  // ---- tooltip ----------------------------------------------------------------------------------
  var tip = document.getElementById("tooltip");
  function showTip(evt, lines) {
    tip.textContent = "";
    lines.forEach(function (line, k) {
      tip.appendChild(el(k === 0 ? "b" : "div", null, line));
    });
    tip.hidden = false;
    var pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    var left = evt.clientX + pad, top = evt.clientY + pad;
    if (left + w > window.innerWidth - 4) left = evt.clientX - w - pad;
    if (top + h > window.innerHeight - 4) top = evt.clientY - h - pad;
    tip.style.left = Math.max(4, left) + "px"; tip.style.top = Math.max(4, top) + "px";
  }
  function nodeTip(n) {
    var node = nodes[n];
    var lines = [node.id];
    if (node.label && node.label !== node.id) lines.push(node.label);
    lines.push(node.kind + (node.site ? " · " + node.site : "") + " · " + layers[node.row] +
      " · pos " + posText(node));
    var nums = [];
    if (typeof node.activation === "number") nums.push("act " + fmt(node.activation));
    if (typeof node.score === "number") nums.push("score " + signed(node.score));
    if (typeof node.influence === "number") nums.push("influence " + fmt(node.influence));
    if (nums.length) lines.push(nums.join("   "));
    lines.push((inStart[n + 1] - inStart[n]) + " in · " + (outStart[n + 1] - outStart[n]) +
      " out");
    if (node.lens && node.lens.length) {
      lines.push("lens: " + node.lens.slice(0, 4).map(function (p) {
        return showToken(p[0]);
      }).join(" "));
    }
    return lines;
  }
  svg.addEventListener("mousemove", function (evt) {
    var t = evt.target;
    if (t.hasAttribute && t.hasAttribute("data-index") && t.classList.contains("node")) {
      showTip(evt, nodeTip(+t.getAttribute("data-index")));
    } else if (t.hasAttribute && t.hasAttribute("data-edge")) {
      var e = +t.getAttribute("data-edge");
      showTip(evt, [nodes[eSrc[e]].id + " → " + nodes[eTgt[e]].id,
        KINDS[eKind[e]] + "  " + signed(eW[e])]);
    } else if (t.hasAttribute && t.hasAttribute("data-agg")) {
      showTip(evt, t.getAttribute("data-agg").split("\n"));
    } else {
      tip.hidden = true;
    }
  });
  svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  svg.addEventListener("click", function (evt) {
    var t = evt.target;
    if (t.classList && t.classList.contains("node") && t.hasAttribute("data-index")) {
      var n = +t.getAttribute("data-index");
      if (evt.shiftKey) { setPinned(n, !state.pinnedSet.has(n)); return; }
      select(n, false);
    } else if (t.hasAttribute && t.hasAttribute("data-edge")) {
      var e = +t.getAttribute("data-edge");
      select(eSrc[e] === state.selected ? eTgt[e] : eSrc[e], false);
    } else {
      select(-1, false);
    }
  });

  // ---- panel events -----------------------------------------------------------------------------
  function edgeListClick(evt) {
    var li = evt.target.closest ? evt.target.closest("li.edge-item") : null;
    if (!li || !li.hasAttribute("data-edge")) return;
    var e = +li.getAttribute("data-edge");
    select(eSrc[e] === state.selected ? eTgt[e] : eSrc[e], true);
  }
  ["incoming-edges", "outgoing-edges"].forEach(function (id) {
    var list = document.getElementById(id);
    list.addEventListener("click", edgeListClick);
    list.addEventListener("keydown", function (evt) {
      if (evt.key === "Enter") edgeListClick(evt);
    });
  });
  document.getElementById("pin-button").addEventListener("click", function () {
    if (state.selected >= 0) setPinned(state.selected, !state.pinnedSet.has(state.selected));
  });
  document.getElementById("group-button").addEventListener("click", groupPinned);
  document.getElementById("group-name").addEventListener("keydown", function (evt) {
    if (evt.key === "Enter") groupPinned();
  });
  document.getElementById("export-button").addEventListener("click", exportSubgraph);
  document.getElementById("clear-pins").addEventListener("click", function () {
    state.pinned.slice().forEach(function (n) { nodeEls[n].classList.remove("pinned"); });
    state.groupOf.forEach(function (g, n) { nodeEls[n].style.stroke = ""; });
    state.pinned = []; state.pinnedSet = new Set(); state.supernodes = [];
    state.groupOf = new Map();
    refresh();
  });
  document.getElementById("show-subgraph").addEventListener("change", drawSubgraph);

  // ---- search -----------------------------------------------------------------------------------
  var haystack = nodes.map(function (n) {
    var tok = (n.pos === null || n.pos === undefined) ? "" : tokens[n.pos];
    return [n.id, n.label || "", n.site || "", n.kind, tok].join(" ").toLowerCase();
  });
  var search = document.getElementById("search");
  var results = document.getElementById("search-results");
  function clearMatches() {
    state.matches.forEach(function (m) { nodeEls[m].classList.remove("match"); });
    state.matches = [];
    svg.classList.remove("searching");
  }
  function runSearch() {
    clearMatches();
    results.textContent = "";
    var q = search.value.trim().toLowerCase();
    if (!q) { results.hidden = true; return; }
    var words = q.split(/\s+/);
    for (var k = 0; k < N; k++) {
      var h = haystack[k], ok = true;
      for (var j = 0; j < words.length && ok; j++) ok = h.indexOf(words[j]) >= 0;
      if (ok) state.matches.push(k);
    }
    state.matches.forEach(function (m) { nodeEls[m].classList.add("match"); });
    svg.classList.add("searching");
    state.matches.slice(0, 30).forEach(function (m) {
      var li = el("li", { "data-node-id": nodes[m].id, "data-index": m,
        "data-testid": "search-result" });
      li.appendChild(el("b", null, nodes[m].id));
      li.appendChild(el("span", { "class": "muted" }, " " + (nodes[m].label || "") + " · " +
        posText(nodes[m])));
      results.appendChild(li);
    });
    results.appendChild(el("li", { "class": "muted summary" }, state.matches.length === 0 ?
      "no match" : state.matches.length + " match" + (state.matches.length > 1 ? "es" : "") +
      (state.matches.length > 30 ? " (first 30 listed)" : "")));
    results.hidden = false;
  }
  search.addEventListener("input", runSearch);
  search.addEventListener("keydown", function (evt) {
    if (evt.key === "Enter" && state.matches.length) {
      select(state.matches[0], true); results.hidden = true;
    } else if (evt.key === "Escape") {
      search.value = ""; runSearch();
    }
  });
  results.addEventListener("mousedown", function (evt) {
    var li = evt.target.closest("li[data-index]");
    if (!li) return;
    evt.preventDefault();
    select(+li.getAttribute("data-index"), true);
    results.hidden = true;
  });
  search.addEventListener("blur", function () { results.hidden = true; });
  search.addEventListener("focus", function () { if (search.value.trim()) runSearch(); });

  document.addEventListener("keydown", function (evt) {
    if (evt.target.tagName === "INPUT" || evt.target.tagName === "TEXTAREA") return;
    if (evt.key === "Escape") select(-1, false);
    if ((evt.key === "p" || evt.key === "P") && state.selected >= 0) {
      setPinned(state.selected, !state.pinnedSet.has(state.selected));
    }
    if (evt.key === "/") { evt.preventDefault(); search.focus(); }
  });

  refresh();
  document.body.setAttribute("data-ready", "true");
  // For tests and the console: read-only views of what the page computed.
  window.depassExplorer = {
    data: data,
    select: function (id) {
      for (var k = 0; k < N; k++) if (nodes[k].id === id) { select(k, true); return true; }
      return false;
    },
    state: state
  };
})();
