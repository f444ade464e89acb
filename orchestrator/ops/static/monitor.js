// The confidence monitor page: polls monitor.json and draws one row per stream (and track), one
// tile per encoder group. Every name goes into the page as text (textContent), never as markup.
"use strict";

(function () {
  const rows = document.getElementById("rows");
  const summary = document.getElementById("summary");
  const peersBox = document.getElementById("peers");
  const images = new Map(); // tile id -> <img>, kept across polls so a picture only reloads when it changes
  let pollMs = 1000;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function line(key, value, className) {
    const node = el("div", "line" + (className ? " " + className : ""));
    node.append(el("span", "k", key + " "), el("span", "", value));
    node.title = key + " " + value;
    return node;
  }

  function clock(ms) {
    if (ms === null || ms === undefined) return "–";
    return new Date(ms).toISOString().slice(11, 23) + "Z";
  }

  function picture(tileId, tile, kind) {
    const box = el("div", "pic");
    const p = tile.picture;
    if (p && p.url) {
      let img = images.get(tileId);
      if (!img) {
        img = document.createElement("img");
        img.alt = "latest keyframe";
        images.set(tileId, img);
      }
      if (img.getAttribute("src") !== p.url) img.setAttribute("src", p.url);
      box.append(img);
    } else if (kind === "audio" || (p && p.level_dbfs !== null && p.level_dbfs !== undefined)) {
      box.className = "pic audio";
      box.textContent = p && p.level_dbfs !== null && p.level_dbfs !== undefined
        ? p.level_dbfs.toFixed(1) + " dBFS" : "audio: waiting for a level";
    } else {
      box.textContent = p ? "no picture" : "waiting for a picture";
    }
    return box;
  }

  function levelMeter(p) {
    const meter = document.createElement("meter");
    meter.min = -90; meter.max = 0; meter.low = -60; meter.high = -6; meter.optimum = -20;
    meter.value = Math.max(-90, p.level_dbfs);
    meter.title = p.level_dbfs.toFixed(1) + " dBFS";
    return meter;
  }

  // An endpoint's state; with details (the relay's tiles): its backlog and its last error.
  function endpointLines(node, e, details) {
    let state = e.state;
    if (details && e.backlog_fragments) {
      state += " · backlog " + e.backlog_fragments + " fragment(s), " + e.backlog_seconds.toFixed(1) + " s";
    }
    if (details && e.state === "reconnecting" && e.retry_in_seconds) {
      state += " · retry in " + e.retry_in_seconds.toFixed(1) + " s";
    }
    const row = line(e.endpoint + " (" + e.region + ")", state, "endpoint state-" + e.state);
    row.dataset.endpoint = e.endpoint;
    row.dataset.state = e.state;
    node.append(row);
    if (details && e.last_error) node.append(line(e.endpoint + " last error", e.last_error, "error"));
  }

  function tileNode(rowId, tile, kind) {
    const tileId = rowId + "\u0000" + tile.group + "\u0000" + (tile.where || "");
    const marks = tile.marks || [];
    const node = el("div", "tile" + (marks.length ? " marked" : ""));
    node.dataset.group = tile.group;
    node.dataset.where = tile.where || "";
    node.dataset.marks = marks.join(" ");
    node.dataset.index = tile.picture ? String(tile.picture.index) : "";
    node.dataset.lastIndex = tile.last_index === null ? "" : String(tile.last_index);
    if (tile.picture && tile.picture.frozen_since !== null) node.dataset.frozenSince = String(tile.picture.frozen_since);
    const name = el("div", "name");
    name.append(el("span", "", tile.group), el("span", "where", tile.where && tile.where !== "here" ? tile.where : ""));
    node.append(name, picture(tileId, tile, kind));
    const p = tile.picture;
    if (p && p.level_dbfs !== null && p.level_dbfs !== undefined) {
      node.append(levelMeter(p));
    }
    const markBox = el("div", "marks");
    for (const m of marks) markBox.append(el("span", "mark", m));
    node.append(markBox);
    node.append(line("picture", p ? "#" + p.index + (p.luma !== null ? " · luma " + p.luma : "") : "–"));
    const when = "clock_time_ms" in tile ? clock(tile.clock_time_ms)
      : (tile.media_ms === null || tile.media_ms === undefined ? "–" : "t=" + (tile.media_ms / 1000).toFixed(3) + " s");
    node.append(line("last", tile.last_index === null ? "–" : "#" + tile.last_index + " · " + when));
    if (tile.age_seconds !== undefined) node.append(line("age", tile.age_seconds === null ? "–" : tile.age_seconds + " s"));
    if ("encoder_up" in tile) {
      node.append(line("encoder", (tile.encoder_up ? "up" : "DOWN") + (tile.restarts !== null ? " · restarts " + tile.restarts : "")));
    }
    for (const e of tile.endpoints || []) endpointLines(node, e, !("encoder_up" in tile));
    if ("encoder_up" in tile) {
      node.append(line("lock", (tile.lock || "–") + (tile.content_offset_seconds !== null && tile.content_offset_seconds !== undefined
        ? " · offset " + tile.content_offset_seconds + " s" : "")));
      if (tile.last_error) node.append(line("last error", tile.last_error, "error"));
    }
    if (tile.outcomes) {
      const parts = Object.keys(tile.outcomes).map(function (k) { return k + " " + tile.outcomes[k]; });
      node.append(line("arrived", parts.join(" · ") || "–"));
    }
    return node;
  }

  function render(doc) {
    document.title = "Monitor · " + (doc.presentation || doc.kind);
    const titles = { ingest: "Ingest monitor", relay: "Relay monitor" };
    document.getElementById("title").textContent = (titles[doc.kind] || "Confidence monitor") +
      (doc.presentation ? " · " + doc.presentation : "");
    const source = doc.rows || doc.streams;
    let marked = 0;
    let differing = 0;
    const fragment = document.createDocumentFragment();
    const seen = new Set();
    for (const row of source) {
      const rowId = row.stream + "\u0000" + (row.track || "");
      const node = el("section", "row" + (row.differs ? " differs" : ""));
      node.dataset.stream = row.stream;
      node.dataset.track = row.track || "";
      node.dataset.differs = row.differs ? "yes" : "no";
      const h = el("h2", "", row.stream);
      if (row.track) h.append(el("span", "sub", row.track + (row.kind ? " (" + row.kind + ")" : "")));
      if (row.differs) { h.append(el("span", "mark", "differs")); differing += 1; }
      node.append(h);
      const tiles = el("div", "tiles");
      for (const tile of row.tiles) {
        seen.add(rowId + "\u0000" + tile.group + "\u0000" + (tile.where || ""));
        if ((tile.marks || []).length) marked += 1;
        tiles.append(tileNode(rowId, tile, row.kind));
      }
      node.append(tiles);
      fragment.append(node);
    }
    for (const id of Array.from(images.keys())) if (!seen.has(id)) images.delete(id);
    rows.replaceChildren(fragment);
    peersBox.replaceChildren();
    for (const peer of doc.peers || []) {
      const node = el("span", "peer" + (peer.ok ? "" : " unreachable"), "peer " + peer.name + (peer.ok ? ": ok" : ": UNREACHABLE " + (peer.error || "")));
      node.dataset.peer = peer.name;
      node.dataset.ok = peer.ok ? "yes" : "no";
      peersBox.append(node);
    }
    summary.className = "summary" + (marked || differing ? " bad" : "");
    summary.textContent = (marked ? marked + " tile(s) marked · " : "") + (differing ? differing + " row(s) differ · " : "") +
      (marked || differing ? "" : "all tiles fine · ") + "updated " +
      new Date(doc.time * 1000).toISOString().slice(11, 19) + " UTC" + (doc.decoding === false ? " · no ffmpeg: no pictures" : "");
    document.body.dataset.updated = String(doc.time);
  }

  async function poll() {
    try {
      const response = await fetch("/monitor.json", { cache: "no-store" });
      if (!response.ok) throw new Error("answered " + response.status);
      const doc = await response.json();
      pollMs = Math.max(500, (doc.poll_seconds || 1) * 1000);
      render(doc);
    } catch (error) {
      summary.className = "summary bad";
      summary.textContent = "monitor unreachable: " + error.message;
    } finally {
      setTimeout(poll, pollMs);
    }
  }

  poll();
})();
