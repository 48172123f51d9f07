// The feature map: every mapped feature drawn as pixels into one canvas image (fast for a million
// points), coloured by cluster. Each draw also records which point owns each pixel, so hover and
// click find a feature by looking at the pixels under the pointer.
// window.lexicaMap.screenPosition(feature) gives a point's page coordinates (used by tests).
"use strict";
(async function () {
  const { binary, summary, vocab, displayToken } = window.lexica;
  const meta = await window.lexica.header();
  const canvas = document.getElementById("map");
  const tooltip = document.getElementById("tooltip");
  const context = canvas.getContext("2d");
  const bytes = await binary("map");
  const count = meta.map.points;
  const buffer = bytes.buffer;
  const features = new Int32Array(buffer, 0, count);
  const xs = new Uint16Array(buffer, 4 * count, count);
  const ys = new Uint16Array(buffer, 6 * count, count);
  const clusters = new Uint16Array(buffer, 8 * count, count);
  const highlighted = location.hash.startsWith("#f=") ? Number(location.hash.slice(3)) : null;
  const HIT_RADIUS = 6;

  // Colour per cluster: golden-angle hues so neighbouring ids differ, as packed RGBA words.
  function hslToRgb(h, s, l) {
    const k = (n) => (n + h / 30) % 12, a = s * Math.min(l, 1 - l);
    const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
    return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
  }
  const palette = new Uint32Array(65536);
  const little = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  for (let c = 0; c < 65536; c++) {
    const [r, g, b] = hslToRgb((c * 137.508) % 360, 0.65, c % 2 ? 0.42 : 0.55);
    palette[c] = little ? (255 << 24) | (b << 16) | (g << 8) | r : (r << 24) | (g << 16) | (b << 8) | 255;
  }

  let view = null, fitted = 1, width = 0, height = 0, ratio = 1;
  let owner = new Int32Array(0);  // device pixel -> point index + 1
  const screenX = new Float32Array(count), screenY = new Float32Array(count);

  function fitView() {
    const margin = 24;
    const scale = Math.min((canvas.clientWidth - 2 * margin) / 65535, (canvas.clientHeight - 2 * margin) / 65535);
    view = { scale, offsetX: (canvas.clientWidth - 65535 * scale) / 2, offsetY: (canvas.clientHeight - 65535 * scale) / 2 };
    fitted = scale;
  }

  function draw() {
    ratio = window.devicePixelRatio || 1;
    width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
    if (owner.length !== width * height) owner = new Int32Array(width * height); else owner.fill(0);
    const image = context.createImageData(width, height);
    const pixels = new Uint32Array(image.data.buffer);
    pixels.fill(0xffffffff);  // white, whatever the byte order
    const zoom = view.scale / fitted;
    // Fewer points get bigger dots; zooming in grows them a little so dense clusters separate.
    const base = count < 20000 ? 3 : count < 200000 ? 2 : 1;
    const size = Math.max(1, Math.round(Math.min(10, base * Math.sqrt(Math.max(zoom, 1))) * ratio));
    const cssHeight = canvas.clientHeight;
    for (let i = 0; i < count; i++) {
      const sx = xs[i] * view.scale + view.offsetX, sy = cssHeight - (ys[i] * view.scale + view.offsetY);
      screenX[i] = sx; screenY[i] = sy;
      const px = Math.round(sx * ratio - size / 2), py = Math.round(sy * ratio - size / 2);
      if (px + size <= 0 || py + size <= 0 || px >= width || py >= height) continue;
      const colour = palette[clusters[i]];
      for (let dy = 0; dy < size; dy++) {
        const row = py + dy;
        if (row < 0 || row >= height) continue;
        for (let dx = 0; dx < size; dx++) {
          const column = px + dx;
          if (column < 0 || column >= width) continue;
          pixels[row * width + column] = colour;
          owner[row * width + column] = i + 1;
        }
      }
    }
    context.putImageData(image, 0, 0);
    const mark = highlighted === null ? -1 : features.indexOf(highlighted);
    if (mark >= 0) {
      context.setTransform(ratio, 0, 0, ratio, 0, 0);
      context.strokeStyle = "#000";
      context.lineWidth = 2;
      context.beginPath();
      context.arc(screenX[mark], screenY[mark], 9, 0, 2 * Math.PI);
      context.stroke();
      context.setTransform(1, 0, 0, 1, 0, 0);
    }
  }

  // The point under (or nearest within HIT_RADIUS of) the pointer, from the pixel owners.
  function nearest(event) {
    const box = canvas.getBoundingClientRect();
    const cx = (event.clientX - box.left) * ratio, cy = (event.clientY - box.top) * ratio;
    const radius = Math.ceil(HIT_RADIUS * ratio);
    let best = -1, bestDistance = Infinity;
    for (let dy = -radius; dy <= radius; dy++) {
      const row = Math.round(cy) + dy;
      if (row < 0 || row >= height) continue;
      for (let dx = -radius; dx <= radius; dx++) {
        const column = Math.round(cx) + dx;
        if (column < 0 || column >= width) continue;
        const found = owner[row * width + column] - 1;
        if (found < 0) continue;
        const distance = dx * dx + dy * dy;
        if (distance < bestDistance) { best = found; bestDistance = distance; }
      }
    }
    return best;
  }

  const strings = await vocab();
  let hovered = -1;
  async function showTooltip(i, event) {
    const box = canvas.getBoundingClientRect();
    tooltip.style.left = (event.clientX - box.left + 12) + "px";
    tooltip.style.top = (event.clientY - box.top + 12) + "px";
    tooltip.textContent = "feature " + features[i];
    tooltip.hidden = false;
    const facts = await summary(features[i]);
    if (hovered === i && facts) tooltip.textContent = "feature " + features[i] + "\n" + facts.top.slice(0, 3).map((id) => displayToken(strings.get(id) ?? "")).join("  ");
  }

  let drag = null;
  canvas.addEventListener("mousedown", (event) => {
    drag = { x: event.clientX, y: event.clientY, offsetX: view.offsetX, offsetY: view.offsetY, moved: false };
  });
  window.addEventListener("mouseup", () => { setTimeout(() => { drag = null; }, 0); });
  canvas.addEventListener("mousemove", (event) => {
    if (drag && event.buttons) {
      const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      view.offsetX = drag.offsetX + dx;
      view.offsetY = drag.offsetY - dy;
      draw();
      return;
    }
    const i = nearest(event);
    if (i < 0) { hovered = -1; tooltip.hidden = true; canvas.style.cursor = "crosshair"; return; }
    canvas.style.cursor = "pointer";
    if (i !== hovered) { hovered = i; showTooltip(i, event); }
  });
  canvas.addEventListener("mouseleave", () => { hovered = -1; tooltip.hidden = true; });
  canvas.addEventListener("click", (event) => {
    if (drag && drag.moved) return;
    const i = nearest(event);
    if (i >= 0) location.href = "feature.html#" + features[i];
  });
  canvas.addEventListener("wheel", (event) => {
    event.preventDefault();
    const box = canvas.getBoundingClientRect();
    const px = event.clientX - box.left, py = canvas.clientHeight - (event.clientY - box.top);
    const factor = Math.exp(-event.deltaY * 0.0015);
    view.offsetX = px - (px - view.offsetX) * factor;
    view.offsetY = py - (py - view.offsetY) * factor;
    view.scale *= factor;
    draw();
  }, { passive: false });
  document.getElementById("reset").addEventListener("click", () => { fitView(); draw(); });
  window.addEventListener("resize", () => { fitView(); draw(); });

  window.lexicaMap = {
    // Page (client) coordinates of a feature's point, or null when the map does not hold it.
    screenPosition(feature) {
      const i = features.indexOf(Number(feature));
      if (i < 0) return null;
      const box = canvas.getBoundingClientRect();
      return { x: box.left + screenX[i], y: box.top + screenY[i] };
    },
  };
  fitView();
  draw();
  document.body.dataset.ready = "1";
})();
