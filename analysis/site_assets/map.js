// The feature map: draws window.LEXICA_MAP (data/map.js) on a canvas, coloured by cluster.
// Hover shows a feature's id and top tokens (textContent only); a click opens its page.
// window.lexicaMap.screenPosition(feature) gives a point's page coordinates (used by tests).
"use strict";
(function () {
  const data = window.LEXICA_MAP;
  const canvas = document.getElementById("map");
  const tooltip = document.getElementById("tooltip");
  const context = canvas.getContext("2d");
  const count = data.feature.length;
  const HIT_RADIUS = 6;
  const highlighted = location.hash.startsWith("#f=") ? Number(location.hash.slice(3)) : null;

  let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
  for (let i = 0; i < count; i++) {
    minX = Math.min(minX, data.x[i]); maxX = Math.max(maxX, data.x[i]);
    minY = Math.min(minY, data.y[i]); maxY = Math.max(maxY, data.y[i]);
  }
  const spanX = maxX - minX || 1, spanY = maxY - minY || 1;
  // view: data -> CSS pixels is (value - min) * scale + offset; y grows upwards on screen.
  let view = null;
  let fittedScale = 1;

  function fitView() {
    const width = canvas.clientWidth, height = canvas.clientHeight, margin = 24;
    const scale = Math.min((width - 2 * margin) / spanX, (height - 2 * margin) / spanY);
    view = { scale, offsetX: (width - spanX * scale) / 2, offsetY: (height - spanY * scale) / 2 };
    fittedScale = scale;
  }

  // Canvas (CSS pixel) positions of every point, recomputed on each draw so hit tests allocate nothing.
  const screenX = new Float64Array(count), screenY = new Float64Array(count);

  function project() {
    const height = canvas.clientHeight;
    for (let i = 0; i < count; i++) {
      screenX[i] = (data.x[i] - minX) * view.scale + view.offsetX;
      screenY[i] = height - ((data.y[i] - minY) * view.scale + view.offsetY);
    }
  }

  function clusterColour(cluster) {
    const hue = (cluster * 137.508) % 360;  // golden angle: neighbouring cluster ids get distant hues
    return "hsl(" + hue.toFixed(1) + ", 65%, " + (cluster % 2 ? 42 : 55) + "%)";
  }

  const byCluster = new Map();
  for (let i = 0; i < count; i++) {
    const cluster = data.cluster[i];
    if (!byCluster.has(cluster)) byCluster.set(cluster, []);
    byCluster.get(cluster).push(i);
  }

  function draw() {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);
    project();
    // Fewer points get bigger dots; zooming in grows them a little so dense clusters separate.
    const zoom = view.scale / fittedScale;
    const size = Math.min(12, Math.max(2, 7 - Math.log10(count + 1)) * Math.sqrt(Math.max(zoom, 1)));
    for (const [cluster, members] of byCluster) {
      context.fillStyle = clusterColour(cluster);
      for (const i of members) context.fillRect(screenX[i] - size / 2, screenY[i] - size / 2, size, size);
    }
    const mark = highlighted === null ? -1 : data.feature.indexOf(highlighted);
    if (mark >= 0) {
      context.strokeStyle = "#000";
      context.lineWidth = 2;
      context.beginPath();
      context.arc(screenX[mark], screenY[mark], 9, 0, 2 * Math.PI);
      context.stroke();
    }
  }

  function nearest(event) {
    const box = canvas.getBoundingClientRect();
    const px = event.clientX - box.left, py = event.clientY - box.top;
    let best = -1, bestDistance = HIT_RADIUS * HIT_RADIUS;
    for (let i = 0; i < count; i++) {
      const distance = (screenX[i] - px) ** 2 + (screenY[i] - py) ** 2;
      if (distance <= bestDistance) { best = i; bestDistance = distance; }
    }
    return best;
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
    if (i < 0) { tooltip.hidden = true; canvas.style.cursor = "crosshair"; return; }
    const box = canvas.getBoundingClientRect();
    tooltip.textContent = "feature " + Number(data.feature[i]) + "\n" + (data.top[i] || []).join("  ");
    tooltip.style.left = (event.clientX - box.left + 12) + "px";
    tooltip.style.top = (event.clientY - box.top + 12) + "px";
    tooltip.hidden = false;
    canvas.style.cursor = "pointer";
  });
  canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
  canvas.addEventListener("click", (event) => {
    if (drag && drag.moved) return;
    const i = nearest(event);
    if (i >= 0) location.href = "features/" + Number(data.feature[i]) + ".html";
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
      const i = data.feature.indexOf(Number(feature));
      if (i < 0) return null;
      const box = canvas.getBoundingClientRect();
      return { x: box.left + screenX[i], y: box.top + screenY[i] };
    },
  };
  fitView();
  draw();
  document.body.dataset.ready = "1";
})();
