// The feature index: filters, sorts and pages the table from window.LEXICA_INDEX (data/index.js).
// Data reach the page only through textContent and element properties, never through HTML parsing.
"use strict";
(function () {
  const data = window.LEXICA_INDEX;
  const PAGE_SIZE = 100;
  const tbody = document.querySelector("#features tbody");
  const search = document.getElementById("search");
  const status = document.getElementById("status");
  const pageLabel = document.getElementById("page");
  const previous = document.getElementById("previous");
  const next = document.getElementById("next");
  const count = data.feature.length;
  const rowOf = new Map(data.feature.map((feature, row) => [feature, row]));
  let matches = [...Array(count).keys()];
  let sortKey = "feature";
  let ascending = true;
  let page = 0;

  function tokenChips(tokens) {
    const cell = document.createElement("td");
    for (const token of tokens || []) {
      const chip = document.createElement("span");
      chip.className = "tok";
      chip.textContent = token;
      cell.appendChild(chip);
    }
    return cell;
  }

  function textCell(text) {
    const cell = document.createElement("td");
    cell.textContent = text;
    return cell;
  }

  function render() {
    const pages = Math.max(1, Math.ceil(matches.length / PAGE_SIZE));
    page = Math.min(page, pages - 1);
    const rows = document.createDocumentFragment();
    for (const row of matches.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE)) {
      const feature = Number(data.feature[row]);
      const tr = document.createElement("tr");
      tr.dataset.feature = String(feature);
      const idCell = document.createElement("td");
      const link = document.createElement("a");
      link.href = "features/" + feature + ".html";
      link.textContent = String(feature);
      idCell.appendChild(link);
      tr.appendChild(idCell);
      const density = Number(data.density[row]);
      tr.appendChild(textCell(density > 0 && density < 1e-3 ? density.toExponential(2) : density.toPrecision(3)));
      tr.appendChild(textCell(Number(data.max[row]).toPrecision(4)));
      tr.appendChild(tokenChips(data.top[row]));
      tr.appendChild(tokenChips(data.promoted ? data.promoted[row] : []));
      tr.appendChild(textCell(data.cluster && data.cluster[row] !== null ? String(data.cluster[row]) : ""));
      rows.appendChild(tr);
    }
    tbody.replaceChildren(rows);
    status.textContent = matches.length === count ? count + " features" : matches.length + " of " + count + " features";
    pageLabel.textContent = "page " + (page + 1) + " of " + pages;
    previous.disabled = page === 0;
    next.disabled = page >= pages - 1;
  }

  function sortValue(row) {
    if (sortKey === "cluster") return data.cluster ? data.cluster[row] ?? -1 : 0;
    return data[sortKey][row];
  }

  function sortMatches() {
    const direction = ascending ? 1 : -1;
    matches.sort((a, b) => (sortValue(a) - sortValue(b)) * direction || data.feature[a] - data.feature[b]);
  }

  // A query matches a feature's id exactly, or is a substring of one of its words (top tokens,
  // promoted logit tokens, words near its top examples; all lower case, one per line).
  function applySearch() {
    const query = search.value.trim().toLowerCase();
    history.replaceState(null, "", query ? "#q=" + encodeURIComponent(query) : location.pathname);
    if (!query) {
      matches = [...Array(count).keys()];
      sortMatches();
    } else {
      const byId = /^#?\d+$/.test(query) ? rowOf.get(Number(query.replace("#", ""))) : undefined;
      matches = [];
      for (let row = 0; row < count; row++) {
        if (row !== byId && data.search[row].includes(query)) matches.push(row);
      }
      sortMatches();
      if (byId !== undefined) matches.unshift(byId);
    }
    page = 0;
    render();
  }

  for (const header of document.querySelectorAll("th[data-sort]")) {
    header.addEventListener("click", () => {
      const key = header.dataset.sort;
      if (key === "cluster" && !data.cluster) return;
      ascending = key === sortKey ? !ascending : key === "feature";
      sortKey = key;
      for (const other of document.querySelectorAll("th[data-sort]")) other.removeAttribute("aria-sort");
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      sortMatches();
      page = 0;
      render();
    });
  }
  previous.addEventListener("click", () => { page -= 1; render(); });
  next.addEventListener("click", () => { page += 1; render(); });
  let pending = 0;
  search.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(applySearch, 120); });
  search.addEventListener("keydown", (event) => {
    if (event.key === "Enter") {
      clearTimeout(pending);
      applySearch();
      if (matches.length === 1) location.href = "features/" + Number(data.feature[matches[0]]) + ".html";
    }
  });

  const initial = location.hash.startsWith("#q=") ? decodeURIComponent(location.hash.slice(3)) : "";
  search.value = initial;
  if (initial) applySearch(); else render();
  document.body.dataset.ready = "1";
})();
