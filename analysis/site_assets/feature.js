// The feature page template: feature.html#<id> renders that feature's record from its data chunk.
// Every corpus or tokenizer string goes in through textContent; the page builds no HTML from text.
"use strict";
(function () {
  const { element, chips, number, displayToken, featureRecord, vocab } = window.lexica;
  const main = document.getElementById("feature");
  const SVG = "http://www.w3.org/2000/svg";
  const SHADES = 20;  // CSS classes a1..a20

  function svgElement(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
    return node;
  }

  function histogram(edges, first, counts) {
    if (!counts.length) return element("p", "empty", "No activations recorded.");
    const width = 640, height = 120, axis = 16, bar = width / counts.length, tallest = Math.max(...counts);
    const svg = svgElement("svg", { class: "histogram", viewBox: `0 0 ${width} ${height + axis}`, role: "img", "aria-label": "activation histogram" });
    counts.forEach((count, offset) => {
      if (!count) return;
      const barHeight = Math.max(1, (count / tallest) * height);
      const rect = svgElement("rect", { x: (offset * bar).toFixed(1), y: (height - barHeight).toFixed(1), width: Math.max(bar - 1, 1).toFixed(1), height: barHeight.toFixed(1) });
      const title = svgElement("title");
      title.textContent = number(edges[first + offset], 3) + "–" + number(edges[first + offset + 1], 3) + ": " + count.toLocaleString("en");
      rect.appendChild(title);
      svg.appendChild(rect);
    });
    for (let offset = 0; offset <= counts.length; offset++) {
      const edge = edges[first + offset];
      if (edge > 0 && Math.abs(Math.log10(edge) - Math.round(Math.log10(edge))) < 1e-6) {
        const label = svgElement("text", { x: (offset * bar).toFixed(1), y: height + axis - 3 });
        label.textContent = number(edge, 3);
        svg.appendChild(label);
      }
    }
    return svg;
  }

  // One context line: its activation, its tokens shaded by the feature's activation, where it is.
  function contextItem(context, strings, ids, levels, start, maximum) {
    const [, activation, doc, position, centre, length] = context;
    const item = element("li");
    item.appendChild(element("span", "num", number(activation, 4)));
    const line = element("span", "ctx");
    for (let i = 0; i < length; i++) {
      const level = levels[start + i];
      const token = element("span", "", displayToken(strings.get(ids[start + i]) ?? ""));
      const classes = [];
      if (level) {
        classes.push("a" + Math.max(1, Math.ceil((level / 255) * SHADES)));
        token.title = "≈ " + number((level / 255) * maximum, 3);
      }
      if (i === centre) { classes.push("x"); token.title = number(activation, 4); }
      token.className = classes.join(" ");
      line.appendChild(token);
    }
    item.appendChild(line);
    item.appendChild(element("span", "where", "doc " + doc + " · pos " + position));
    return item;
  }

  // How well the explanation lets a scorer find where the feature fires (lexica score), beside the
  // same scorer given another feature's explanation.
  function scores(sc) {
    const box = element("div", "scores");
    const table = element("table", "score-table");
    const headRow = element("tr");
    for (const label of ["", "accuracy", "F1", "AUC"]) headRow.appendChild(element("th", "", label));
    table.appendChild(headRow);
    const cell = (value) => (value === null || value === undefined ? "–" : value.toFixed(2));
    for (const [label, values] of [["detection", sc.d], ["  baseline", sc.bd], ["fuzzing", sc.f], ["  baseline", sc.bf]]) {
      const tr = element("tr", label.trim() === "baseline" ? "baseline" : "");
      tr.appendChild(element("th", "", label.trim() === "baseline" ? "baseline (another feature's explanation)" : label));
      for (const value of values) tr.appendChild(element("td", "", cell(value)));
      table.appendChild(tr);
    }
    box.appendChild(table);
    box.appendChild(element("p", "hint", "Scored by " + sc.by + " on " + sc.n[0] + " held-out activating and " + sc.n[1] +
      " non-activating texts (" + sc.n[2] + " from neighbouring features)."));
    return box;
  }

  function section(title) {
    const box = element("section");
    box.appendChild(element("h2", "", title));
    return box;
  }

  function logitList(strings, ids, values) {
    const list = element("ol", "logit");
    ids.forEach((id, i) => {
      const item = element("li");
      item.appendChild(element("span", "tok", displayToken(strings.get(id) ?? "")));
      item.appendChild(element("span", "num", (values[i] >= 0 ? "+" : "") + values[i].toFixed(3)));
      list.appendChild(item);
    });
    return list;
  }

  function link(href, text, rel) {
    const anchor = element("a", "", text);
    anchor.href = href;
    if (rel) anchor.rel = rel;
    return anchor;
  }

  async function render() {
    document.body.dataset.ready = "0";
    const meta = await window.lexica.header();
    const feature = Number.parseInt(location.hash.slice(1), 10);
    const [record, strings] = await Promise.all([featureRecord(feature), vocab()]);
    const page = document.createDocumentFragment();
    const nav = element("nav", "pager");
    if (feature > 0) nav.appendChild(link("#" + (feature - 1), "← feature " + (feature - 1), "prev"));
    if (meta.has_map && record && record.head.m) nav.appendChild(link("map.html#f=" + feature, "on the map"));
    if (feature + 1 < meta.features) nav.appendChild(link("#" + (feature + 1), "feature " + (feature + 1) + " →", "next"));
    page.appendChild(nav);
    if (!record) {
      page.appendChild(element("h1", "", "No feature " + (location.hash.slice(1) || "(none given)")));
      page.appendChild(element("p", "empty", "This atlas holds features 0 to " + (meta.features - 1) + "; this one has no record."));
      main.replaceChildren(page);
      document.title = "No such feature · " + meta.dictionary;
      document.body.dataset.ready = "1";
      return;
    }
    const head = record.head;
    document.title = "Feature " + feature + " · " + meta.dictionary + " · Lexica atlas";
    page.appendChild(element("h1", "", "Feature " + feature));
    if (head.x) page.appendChild(element("p", "explanation", head.x));
    if (head.sc) page.appendChild(scores(head.sc));
    const stats = element("dl", "stats");
    for (const [label, value] of [["density", number(head.d, 4)], ["fires", head.n.toLocaleString("en")], ["max activation", number(head.mx, 4)], ["mean activation", number(head.mn, 4)]]) {
      const pair = element("div");
      pair.appendChild(element("dt", "", label));
      pair.appendChild(element("dd", "", value));
      stats.appendChild(pair);
    }
    page.appendChild(stats);
    if (head.lb) {
      // Where its shown examples come from, by the corpus's label field (e.g. their language).
      page.appendChild(element("p", "labels", "examples by " + (meta.label_field || "label") + ": " +
        head.lb.map(([label, count]) => label + " " + count).join(" · ")));
    }
    const histogramBox = section("Activation histogram");
    histogramBox.appendChild(histogram(meta.histogram_edges, head.h[0], head.h[1]));
    page.appendChild(histogramBox);

    let start = 0;
    const top = section("Top contexts");
    const topList = element("ol", "contexts");
    const bands = new Map();
    for (const context of head.c) {
      const item = contextItem(context, strings, record.ids, record.levels, start, head.mx);
      start += context[5];
      if (context[0] < 0) topList.appendChild(item);
      else {
        if (!bands.has(context[0])) bands.set(context[0], { items: [], low: Infinity, high: -Infinity });
        const band = bands.get(context[0]);
        band.items.push(item);
        band.low = Math.min(band.low, context[1]);
        band.high = Math.max(band.high, context[1]);
      }
    }
    if (topList.childElementCount) top.appendChild(topList);
    else top.appendChild(element("p", "empty", "This feature never fired on the analysed tokens."));
    page.appendChild(top);
    if (bands.size) {
      const samples = section("Samples by activation quantile");
      for (const [band, entry] of bands) {
        const title = element("h3", "", "Band " + band + " ");
        title.appendChild(element("small", "", "activations " + entry.low.toFixed(3) + "–" + entry.high.toFixed(3)));
        samples.appendChild(title);
        const list = element("ol", "contexts");
        for (const item of entry.items) list.appendChild(item);
        samples.appendChild(list);
      }
      page.appendChild(samples);
    }
    if (head.p) {
      const logits = section("Logit effects");
      const columns = element("div", "columns");
      for (const [title, [ids, values]] of [["Promoted", head.p], ["Suppressed", head.s]]) {
        const column = element("div");
        column.appendChild(element("h3", "", title));
        column.appendChild(logitList(strings, ids, values));
        columns.appendChild(column);
      }
      logits.appendChild(columns);
      page.appendChild(logits);
    }
    if (head.nb && head.nb[0].length) {
      const neighbours = section("Nearest features (decoder cosine)");
      const list = element("ol", "neighbours");
      head.nb[0].forEach((other, i) => {
        const item = element("li");
        item.appendChild(link("#" + other, "feature " + other));
        item.appendChild(element("span", "num", "cos " + head.nb[1][i].toFixed(3)));
        item.appendChild(chips(strings, head.nb[2][i]));
        list.appendChild(item);
      });
      neighbours.appendChild(list);
      page.appendChild(neighbours);
    }
    const model = await window.lexica.live();
    if (model) page.appendChild(steerPanel(feature, model));
    main.replaceChildren(page);
    window.scrollTo(0, 0);
    document.body.dataset.ready = "1";
  }

  // Steering (served by `lexica browse` with the run's model): clamp this feature while the model
  // continues a prompt, beside the unsteered continuation; the same as `lexica steer`.
  function steerPanel(feature, model) {
    const box = section("Steer");
    const prompt = element("textarea");
    prompt.id = "steer-prompt";
    prompt.rows = 2;
    prompt.maxLength = model.limits.max_text_chars;
    prompt.placeholder = "A prompt for the model to continue";
    const value = element("input");
    value.id = "steer-value";
    value.value = "2x";
    value.size = 8;
    const tokens = element("input");
    tokens.id = "steer-tokens";
    tokens.type = "number";
    tokens.min = "1";
    tokens.max = String(model.limits.max_new_tokens);
    tokens.value = String(Math.min(24, model.limits.max_new_tokens));
    const run = element("button", "", "Steer");
    run.id = "steer-run";
    run.type = "button";
    const status = element("span", "", "");
    status.id = "steer-status";
    status.setAttribute("role", "status");
    const controls = element("div", "controls");
    const valueLabel = element("label", "", "value (a number, or a multiple of the max activation like 2x) ");
    valueLabel.appendChild(value);
    const tokensLabel = element("label", "", "new tokens ");
    tokensLabel.appendChild(tokens);
    for (const node of [valueLabel, tokensLabel, run, status]) controls.appendChild(node);
    const results = element("div", "columns");
    const baseline = element("div");
    baseline.appendChild(element("h3", "", "baseline"));
    const baselineText = element("pre", "generation");
    baselineText.id = "steer-baseline";
    baseline.appendChild(baselineText);
    const steered = element("div");
    steered.appendChild(element("h3", "", "steered"));
    const steeredText = element("pre", "generation");
    steeredText.id = "steer-steered";
    steered.appendChild(steeredText);
    results.appendChild(baseline);
    results.appendChild(steered);
    for (const node of [prompt, controls, results]) box.appendChild(node);
    run.addEventListener("click", async () => {
      status.textContent = "generating…";
      document.body.dataset.steer = "busy";
      try {
        const answer = await window.lexica.post("steer", { feature, value: value.value.trim(), prompt: prompt.value, max_new_tokens: Number(tokens.value) });
        baselineText.textContent = answer.prompt + answer.baseline;
        steeredText.textContent = answer.prompt + answer.steered;
        status.textContent = "feature " + feature + " clamped to " + number(answer.activation, 4) + (answer.stopped_early ? " · stopped at the time limit" : "");
      } catch (error) {
        status.textContent = error.message;
      }
      document.body.dataset.steer = "done";
    });
    return box;
  }

  window.addEventListener("hashchange", render);
  render().catch((error) => {
    main.replaceChildren(element("p", "empty", "Cannot show this feature: " + error.message));
    document.body.dataset.ready = "1";
  });
})();
