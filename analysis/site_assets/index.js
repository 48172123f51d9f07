// The index: every feature by id, a page at a time, and search by feature id, token or context word.
// A query loads one search shard; a page of results loads the summaries of the features it shows.
"use strict";
(async function () {
  const { element, chips, number, summary, searchWords, vocab } = window.lexica;
  // Rows per page: listing by id reads one or two summary files; a page of search results may read
  // one per row (~30 KB each at 2^20 features) besides its shard, so it shows fewer.
  const LIST_PAGE = 50, RESULT_PAGE = 25;
  const pageSize = () => (results ? RESULT_PAGE : LIST_PAGE);
  const tbody = document.querySelector("#features tbody");
  const search = document.getElementById("search");
  const status = document.getElementById("status");
  const pageLabel = document.getElementById("page");
  const previous = document.getElementById("previous");
  const next = document.getElementById("next");
  const meta = await window.lexica.header();
  document.getElementById("title").textContent = meta.dictionary;
  const facts = document.getElementById("facts");
  facts.appendChild(document.createTextNode(meta.present.toLocaleString("en") + " features"));
  for (const [key, value] of meta.facts) {
    facts.appendChild(document.createTextNode(" · " + key + " "));
    facts.appendChild(element("b", "", value));
  }
  const strings = await vocab();

  // The rows on show: a list of {feature, word}, or null for "every feature by id".
  let results = null;
  let truncated = false;
  let page = 0;
  let generation = 0;  // a newer query or page abandons the rendering of an older one

  function featuresOnPage() {
    if (results) return results.slice(page * pageSize(), (page + 1) * pageSize());
    const rows = [];
    for (let feature = page * LIST_PAGE; feature < Math.min(meta.features, (page + 1) * LIST_PAGE); feature++) rows.push({ feature, word: "" });
    return rows;
  }

  async function render() {
    const mine = ++generation;
    const count = results ? results.length : meta.features;
    const pages = Math.max(1, Math.ceil(count / pageSize()));
    page = Math.min(page, pages - 1);
    const shown = featuresOnPage();
    const summaries = await Promise.all(shown.map((row) => summary(row.feature)));
    if (mine !== generation) return;
    const rows = document.createDocumentFragment();
    shown.forEach((row, i) => {
      const facts = summaries[i];
      if (!facts) return;  // an id the atlas does not hold
      const tr = element("tr");
      tr.dataset.feature = String(row.feature);
      const idCell = element("td");
      const link = element("a", "", String(row.feature));
      link.href = "feature.html#" + row.feature;
      idCell.appendChild(link);
      tr.appendChild(idCell);
      tr.appendChild(element("td", "", number(facts.density, 3)));
      tr.appendChild(element("td", "", number(facts.max, 4)));
      const tokens = element("td");
      tokens.appendChild(chips(strings, facts.top));
      tr.appendChild(tokens);
      tr.appendChild(element("td", "explanation", facts.explanation));
      tr.appendChild(element("td", "score", facts.detection === null || facts.detection === undefined ? "" :
        facts.detection.toFixed(2) + " / " + (facts.fuzzing === null ? "–" : facts.fuzzing.toFixed(2))));
      tr.appendChild(element("td", "", row.word));
      tr.appendChild(element("td", "", facts.cluster === null ? "" : String(facts.cluster)));
      rows.appendChild(tr);
    });
    tbody.replaceChildren(rows);
    if (!results) status.textContent = meta.present.toLocaleString("en") + " features";
    else if (!search.value.trim()) status.textContent = "the first " + results.length.toLocaleString("en") + " by " + ORDER_NAMES[order.value];
    else {
      const capped = truncated ? " (a word matched more; the index keeps the strongest " + meta.postings_per_word.toLocaleString("en") + " per word)" : "";
      status.textContent = results.length.toLocaleString("en") + " matching features" + capped;
    }
    pageLabel.textContent = "page " + (page + 1) + " of " + pages;
    // What the table shows (tests wait on these): the query, and the listing order when there is none.
    document.body.dataset.query = results ? search.value.trim() : "";
    document.body.dataset.listed = results && !search.value.trim() ? order.value : "id";
    previous.disabled = page === 0;
    next.disabled = page >= pages - 1;
    document.body.dataset.ready = "1";
  }

  // Other listings than by id: the first 10,000 features of each order, precomputed by the build.
  const order = document.getElementById("order");
  const ORDER_NAMES = { density: "density", max: "max act.", rare: "rare", score: "detection AUC" };
  async function listed() {
    if (order.value === "id") return null;
    const bytes = await window.lexica.binary("order-" + order.value);
    const ids = new Int32Array(bytes.buffer, 0, bytes.byteLength / 4);
    return Array.from(ids, (feature) => ({ feature, word: ORDER_NAMES[order.value] }));
  }
  order.addEventListener("change", () => { search.value = ""; applySearch(); });

  async function applySearch() {
    const query = search.value.trim();
    history.replaceState(null, "", query ? "#q=" + encodeURIComponent(query) : location.pathname);
    page = 0;
    if (!query) {
      truncated = false;
      results = await listed();
      return render();
    }
    const found = await searchWords(query);
    let matches = found.matches;
    truncated = found.truncated;
    if (/^#?\d+$/.test(query)) {  // a feature id: that feature first
      const feature = Number(query.replace("#", ""));
      if (await summary(feature)) {
        matches = [{ feature, word: "feature id" }, ...matches.filter((row) => row.feature !== feature)];
      }
    }
    if (query !== search.value.trim()) return;  // typed on meanwhile
    results = matches;
    return render();
  }

  previous.addEventListener("click", () => { page -= 1; render(); });
  next.addEventListener("click", () => { page += 1; render(); });
  let pending = 0;
  search.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(applySearch, 150); });
  search.addEventListener("keydown", async (event) => {
    if (event.key !== "Enter") return;
    clearTimeout(pending);
    await applySearch();
    if (results && results.length === 1) location.href = "feature.html#" + results[0].feature;
  });
  // Test your text (served by `lexica browse` with the run's model): each token with the features
  // that fire on it; a highlighted feature marks the tokens it fires on.
  const model = await window.lexica.live();
  if (model) {
    const [panel, text, watch, textStatus, tokensBox, featuresBox] = ["live-text", "text", "watch", "text-status",
      "text-tokens", "token-features"].map((id) => document.getElementById(id));
    text.maxLength = model.limits.max_text_chars;
    watch.max = String(model.d_sae - 1);
    panel.hidden = false;
    const showToken = (answer, index) => {
      const list = element("ol", "token-features");
      for (const [feature, activation] of answer.top[index]) {
        const item = element("li");
        const link = element("a", "", "feature " + feature);
        link.href = "feature.html#" + feature;
        item.appendChild(link);
        item.appendChild(element("span", "num", number(activation, 4)));
        list.appendChild(item);
      }
      const title = element("p", "", "token " + index + " ");
      title.appendChild(element("span", "tok", window.lexica.displayToken(answer.tokens[index])));
      featuresBox.replaceChildren(title, list);
      for (const node of tokensBox.children) node.classList.toggle("chosen", Number(node.dataset.index) === index);
    };
    document.getElementById("analyse").addEventListener("click", async () => {
      textStatus.textContent = "running the model…";
      document.body.dataset.text = "busy";
      try {
        const answer = await window.lexica.post("tokens", { text: text.value, feature: watch.value === "" ? null : Number(watch.value) });
        const line = document.createDocumentFragment();
        answer.tokens.forEach((token, index) => {
          const span = element("span", "", window.lexica.displayToken(token));
          span.dataset.index = String(index);
          if (answer.values && answer.values[index] > 0) {
            span.classList.add("fires");
            span.title = "feature " + answer.feature + ": " + number(answer.values[index], 4);
          }
          span.addEventListener("click", () => showToken(answer, index));
          line.appendChild(span);
        });
        tokensBox.replaceChildren(line);
        featuresBox.replaceChildren();
        const fired = answer.values ? answer.values.filter((value) => value > 0).length : null;
        textStatus.textContent = answer.tokens.length + " tokens" + (fired === null ? "" : "; feature " + answer.feature + " fires on " + fired) + " · click a token for its features";
      } catch (error) {
        textStatus.textContent = error.message;
      }
      document.body.dataset.text = "done";
    });
  }

  const initial = location.hash.startsWith("#q=") ? decodeURIComponent(location.hash.slice(3)) : "";
  search.value = initial;
  if (initial) applySearch(); else render();
})();
