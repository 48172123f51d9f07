// What every atlas page shares: loading the data files (scripts that call lexicaData), decoding
// them, the vocabulary, feature records and summaries, the search shards, and building elements.
// Data reach a page only through textContent and element properties, never through HTML parsing.
"use strict";
(function () {
  const arrived = new Map();  // key -> {kind, payload} of data files that ran before anyone asked
  const waiting = new Map();  // key -> resolve of a load in flight
  const loads = new Map();    // key -> Promise of {kind, payload}
  const decoded = new Map();  // key -> Promise of a decoded JSON document

  window.lexicaData = function (key, kind, payload) {
    const resolve = waiting.get(key);
    if (resolve) { waiting.delete(key); resolve({ kind, payload }); } else arrived.set(key, { kind, payload });
  };

  function load(key) {
    if (loads.has(key)) return loads.get(key);
    const promise = arrived.has(key) ? Promise.resolve(arrived.get(key)) : new Promise((resolve, reject) => {
      waiting.set(key, resolve);
      const element = document.createElement("script");
      element.src = "data/" + key + ".js";
      element.onerror = () => { waiting.delete(key); loads.delete(key); reject(new Error("cannot load data/" + key + ".js")); };
      document.head.appendChild(element);
    });
    loads.set(key, promise);
    return promise;
  }

  async function inflate(base64) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }

  function json(key) {
    if (!decoded.has(key)) {
      decoded.set(key, load(key).then(async ({ payload }) => JSON.parse(new TextDecoder().decode(await inflate(payload)))));
    }
    return decoded.get(key);
  }

  async function binary(key) {
    const { payload } = await load(key);
    return inflate(payload);
  }

  let vocabulary = null;
  async function vocab() {
    if (!vocabulary) {
      // Site index -> string; `get` so pages can treat it like a map.
      vocabulary = json("vocab").then((document) => ({ get: (index) => document.text[index] }));
    }
    return vocabulary;
  }

  // A feature's record: its head (statistics, contexts, logits, neighbours, map position), and the
  // token ids and activation levels (0..255 of its maximum) of all its contexts, one after another.
  async function featureRecord(feature) {
    const meta = await json("meta");
    if (!(feature >= 0 && feature < meta.features)) return null;
    const chunk = Math.floor(feature / meta.per_chunk);
    const { payload } = await load("features/" + chunk);
    const packed = payload[feature - chunk * meta.per_chunk];
    if (!packed) return null;
    const bytes = await inflate(packed);
    const headLength = new DataView(bytes.buffer).getUint32(0, true);
    const head = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + headLength)));
    let offset = 4 + headLength;
    offset += (4 - (offset % 4)) % 4;
    const total = head.c.reduce((sum, context) => sum + context[5], 0);
    const ids = meta.id_bytes === 2 ? new Uint16Array(bytes.buffer, offset, total) : new Int32Array(bytes.buffer, offset, total);
    const levelsAt = offset + ids.byteLength + ((4 - (ids.byteLength % 4)) % 4);
    return { head, ids, levels: bytes.subarray(levelsAt, levelsAt + total) };
  }

  // Density, maximum, top tokens and cluster of one feature (null if the atlas does not hold it).
  async function summary(feature) {
    const meta = await json("meta");
    if (!(feature >= 0 && feature < meta.features)) return null;
    const block = Math.floor(feature / meta.per_summary);
    const document = await json("summaries/" + block);
    const row = feature - document.first;
    if (!document.present[row]) return null;
    return { feature, density: document.d[row], max: document.mx[row], top: document.top[row], cluster: document.cl ? document.cl[row] : null, explanation: document.ex ? document.ex[row] : "", detection: document.sd ? document.sd[row] : null, fuzzing: document.sf ? document.sf[row] : null };
  }

  // The search shard of a word: FNV-1a of the UTF-8 of its first three characters, as site_search.py.
  function shardOf(word, shards) {
    const key = Array.from(word).slice(0, 3).join("");
    let hash = 0x811c9dc5;
    for (const byte of new TextEncoder().encode(key)) hash = Math.imul(hash ^ byte, 0x01000193) >>> 0;
    return hash % shards;
  }

  // Features whose words match the query: the word itself first, then (queries of 3+ characters)
  // words that start with it, most frequent first. Returns [{feature, word}], and whether a word
  // matched more features than the index keeps for it (its heaviest are kept).
  async function searchWords(query) {
    const meta = await json("meta");
    const word = query.trim().toLowerCase();
    if (!word) return { matches: [], truncated: false };
    const document = await json("search/" + shardOf(word, meta.search_shards));
    const found = [];
    document.words.forEach((candidate, i) => {
      if (candidate === word || (Array.from(word).length >= 3 && candidate.startsWith(word))) found.push(i);
    });
    found.sort((a, b) => (document.words[b] === word) - (document.words[a] === word) || document.count[b] - document.count[a]);
    const seen = new Set();
    const matches = [];
    let truncated = false;  // a word leads to more features than the index keeps for it
    for (const i of found) {
      truncated = truncated || document.count[i] > document.features[i].length;
      for (const feature of document.features[i]) {
        if (!seen.has(feature)) { seen.add(feature); matches.push({ feature, word: document.words[i] }); }
      }
    }
    return { matches, truncated };
  }

  const VISIBLE = { "\n": "↵", "\r": "⏎", "\t": "⇥", "\x0b": "␋", "\x0c": "␌", "\x00": "␀", "\x7f": "␡" };
  // A token as shown: newlines, tabs and control characters visible, a blank token as dots.
  function displayToken(token) {
    if (token === "\r\n") return "↵";
    let shown = "";
    for (const character of token || "") {
      const code = character.codePointAt(0);
      shown += VISIBLE[character] || (code < 32 ? String.fromCodePoint(0x2400 + code) : character);
    }
    return shown && !shown.replace(/ /g, "") ? "·".repeat(shown.length) : shown;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function chips(strings, ids) {
    const box = element("span", "chips");
    for (const id of ids || []) box.appendChild(element("span", "tok", displayToken(strings.get(id) ?? "")));
    return box;
  }

  function number(value, digits) {
    const n = Number(value);
    if (n !== 0 && Math.abs(n) < 1e-3) return n.toExponential(2);
    return String(Number(n.toPrecision(digits || 4)));
  }

  async function header() {
    const meta = await json("meta");
    const label = document.getElementById("dictionary");
    if (label) label.textContent = meta.dictionary;
    return meta;
  }

  // The model routes of `lexica browse`, when the page is served by it with a model: its status, else null.
  async function live() {
    if (!location.protocol.startsWith("http")) return null;
    try {
      const response = await fetch("api/status");
      return response.ok ? (await response.json()).live : null;
    } catch (error) {
      return null;
    }
  }

  async function post(route, body) {
    const response = await fetch("api/" + route, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    let answer = {};
    try { answer = await response.json(); } catch (error) { /* an empty or non-JSON answer */ }
    if (!response.ok) throw new Error(answer.error || response.status + " " + response.statusText);
    return answer;
  }

  window.lexica = { live, post, load, json, binary, vocab, featureRecord, summary, searchWords, shardOf, displayToken, element, chips, number, header };
})();
