// Reads MP4 bytes with mp4box.js (GPAC's ISO BMFF parser in JavaScript, a parser this project
// did not write) and prints, as JSON on stdout, what mp4box.js read: for each input, its box tree
// (every box's type and size, and the fields mp4box.js parsed from it), and, when the input opens
// with a moov, each track's samples as mp4box.js extracts them (the trun's sample table resolved
// against the mdat: offset, size, durations, sync flag, and a SHA-256 of the sample's bytes).
//
// Usage: node boxtree.mjs FILE...   ("-" reads standard input)
// Output: {"files": [{"path", "size", "boxes": [...], "tracks": [...], "samples": {"<id>": [...]}}]}
//
// Exits 1, naming the input, when mp4box.js reports an error or a warning while parsing (a box it
// does not know, a box whose fields do not fill its size or overrun it), or when the top-level boxes
// do not cover the input exactly (leftover or missing bytes). 64-bit fields are JavaScript numbers:
// exact up to 2^53, rounded to the nearest double above (an NTP timestamp in prft is one).

import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { createFile, Log, MP4BoxBuffer } from "mp4box";

let problems = [];
// mp4box.js's note to itself when a file holds a second box of a type it keeps one of (a track file
// is a CMAF header followed by many segments, each with its styp and prft): not about the bytes.
const BOOKKEEPING = /^Found multiple boxes of type \S+ but no array exists\. Creating array dynamically\.$/;
Log.warn = (module, message) => BOOKKEEPING.test(message) || problems.push(`${module}: ${message}`);
Log.error = (module, message) => problems.push(`${module}: ${message}`);

// Box fields that are parser state or raw bytes, not fields of the box.
const SKIP = new Set(["boxes", "entries", "start", "hdr_size", "data", "box_name", "has_unparsed_data",
                      "original_size", "uuid", "sizePosition", "subBoxNames", "samples", "sample_groups_info",
                      "samples_duration", "samples_size", "nextSample", "psshs", "sgpds", "sbgps"]);

// A 64-bit field above 2^53 (an NTP timestamp) is a rounded double in mp4box.js: printed as the
// exact integer value of that double (JSON.stringify would print a shorter decimal that is not).
const EXACT = "\u0000exact:";
const exact = (_key, value) =>
  typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)
    ? EXACT + BigInt(value).toString() : value;

function fields(box) {
  const out = {};
  for (const [key, value] of Object.entries(box)) {
    if (SKIP.has(key) || value === undefined || value === null) continue;
    if (typeof value === "number" || typeof value === "string" || typeof value === "boolean") out[key] = value;
    else if (ArrayBuffer.isView(value)) out[key] = Array.from(value);
    else if (Array.isArray(value) && value.every((v) => ["number", "string"].includes(typeof v))) out[key] = value;
  }
  return out;
}

function tree(box) {
  const node = { type: box.type, size: box.size, ...fields(box) };
  const children = [...(box.boxes ?? []), ...(box.entries ?? [])];
  if (children.length) node.boxes = children.map(tree);
  return node;
}

function parse(path, bytes) {
  problems = [];
  const file = createFile(true);
  const samples = {};
  file.onError = (module, message) => problems.push(`${module}: ${message}`);
  file.onReady = (info) => {
    for (const track of info.tracks) {
      samples[track.id] = [];
      file.setExtractionOptions(track.id, null, { nbSamples: Number.MAX_SAFE_INTEGER });
    }
    file.start();
  };
  file.onSamples = (id, _user, got) => {
    for (const s of got) {
      samples[id].push({ number: s.number, dts: s.dts, cts: s.cts, duration: s.duration, size: s.size,
                         is_sync: s.is_sync, offset: s.offset,
                         sha256: createHash("sha256").update(s.data).digest("hex") });
    }
  };
  const buffer = MP4BoxBuffer.fromArrayBuffer(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length), 0);
  file.appendBuffer(buffer, true);
  file.flush();
  let end = 0;
  for (const box of file.boxes) {
    if (box.start !== end) problems.push(`the box ${box.type} starts at ${box.start}, not at ${end}`);
    end = box.start + box.size;
  }
  if (end !== bytes.length) problems.push(`the boxes cover ${end} of the ${bytes.length} bytes`);
  if (problems.length) throw new Error(`${path}: mp4box.js: ${problems.join("; ")}`);
  const tracks = file.moov ? file.getInfo().tracks.map((t) => ({ id: t.id, timescale: t.timescale, codec: t.codec,
                                                                 nb_samples: t.nb_samples, bitrate: t.bitrate })) : [];
  return { path, size: bytes.length, boxes: file.boxes.map(tree), tracks, samples };
}

const paths = process.argv.slice(2);
if (!paths.length) {
  process.stderr.write("usage: node boxtree.mjs FILE... (- for standard input)\n");
  process.exit(2);
}
try {
  const files = paths.map((path) => parse(path, readFileSync(path === "-" ? 0 : path)));
  const json = JSON.stringify({ mp4box: "mp4box.js", files }, exact).replace(/"\\u0000exact:([0-9]+)"/g, "$1");
  process.stdout.write(json + "\n");
} catch (error) {
  process.stderr.write(`${error.message}\n`);
  process.exit(1);
}
