// The concepts view: features grouped by map cluster, each group named by the words its members'
// explanations share (or their top tokens), filtered by a word. Text goes in through textContent only.
"use strict";
(async function () {
  const { json, element } = window.lexica;
  const meta = await window.lexica.header();
  const document_ = await json("concepts");
  const list = document.getElementById("concepts");
  const filter = document.getElementById("filter");
  const status = document.getElementById("status");
  const SHOWN = 60;  // clusters drawn at once; the filter finds the others
  const clusters = document_.clusters;
  document.getElementById("concepts-facts").textContent = clusters.length.toLocaleString("en") + " clusters of " +
    meta.present.toLocaleString("en") + " features (k-means of decoder directions, as on the map); " +
    meta.explained.toLocaleString("en") + " features explained, " + (meta.scored || 0).toLocaleString("en") + " scored.";

  function card(group) {
    const box = element("section", "concept");
    box.dataset.cluster = String(group.c);
    const title = element("h2");
    title.appendChild(element("span", "words", group.words.join(" · ") || "(no words)"));
    title.appendChild(element("small", "", "cluster " + group.c + " · " + group.size.toLocaleString("en") + " features" +
      (group.explained ? " · " + group.explained + " explained" : "") +
      (group.auc === null ? "" : " · mean detection AUC " + group.auc.toFixed(2)) +
      (group.named_by === "top tokens" ? " · named by top tokens" : "")));
    box.appendChild(title);
    const members = element("ul", "members");
    for (const [feature, explanation] of group.members) {
      const item = element("li");
      const link = element("a", "", "feature " + feature);
      link.href = "feature.html#" + feature;
      item.appendChild(link);
      if (explanation) item.appendChild(element("span", "explanation", " " + explanation));
      members.appendChild(item);
    }
    box.appendChild(members);
    return box;
  }

  function matches(group, words) {
    const text = (group.words.join(" ") + " " + group.members.map((member) => member[1]).join(" ")).toLowerCase();
    return words.every((word) => text.includes(word));
  }

  function render() {
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    const found = words.length ? clusters.filter((group) => matches(group, words)) : clusters;
    list.replaceChildren(...found.slice(0, SHOWN).map(card));
    status.textContent = (words.length ? found.length + " matching clusters" : clusters.length + " clusters") +
      (found.length > SHOWN ? ", the first " + SHOWN + " shown" : "");
    document.body.dataset.filter = filter.value.trim();
    document.body.dataset.ready = "1";
  }
  filter.addEventListener("input", render);
  render();
})();
