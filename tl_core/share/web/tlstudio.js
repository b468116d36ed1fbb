/* TL Studio in the browser: window.tlstudio.ready and window.tlstudio.predict(img).
 *
 * Needs, loaded before this file: ort/ort.wasm.min.js (onnxruntime-web), ort/ort-wasm.js (its WebAssembly,
 * base64) and model.js (the run's ONNX graph, base64, and its meta). Works from file:// (nothing is fetched).
 *
 * Preprocessing is the engine's (tl_core/models/preprocess.py, tl_core/data/images.py), step for step:
 *   1. decode; EXIF orientation applied by the browser; no colour-profile conversion (like Pillow);
 *      transparency composited on white with Pillow's alpha_composite integer arithmetic;
 *   2. resize so the shorter side is meta.preprocess.resize (torchvision's sizes), with Pillow's resampling
 *      (same filters, same fixed-point coefficients and rounding: Pillow's Resample.c);
 *   3. centre crop to input_size (torchvision's rounding);
 *   4. float32: x * (1 / (255 std)) + (-mean / std), each step rounded to float32 like PyTorch.
 * The browser's canvas keeps colours premultiplied by alpha, so a semi-transparent pixel may be one level off
 * (opaque pixels are exact).
 */
(function () {
  "use strict";
  const MODEL = window.TLSTUDIO_MODEL, RT = window.TLSTUDIO_ORT_WASM;
  const meta = MODEL ? MODEL.meta : null;

  function bytesOfBase64(s) {
    if (Uint8Array.fromBase64) return Uint8Array.fromBase64(s);
    const bin = atob(s), out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  }

  // ---- Pillow's resampling filters (src/libImaging/Resample.c) ----
  function sinc(x) { if (x === 0.0) return 1.0; x = x * Math.PI; return Math.sin(x) / x; }
  const FILTERS = {
    box: [0.5, (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0)],
    bilinear: [1.0, (x) => { if (x < 0.0) x = -x; return x < 1.0 ? 1.0 - x : 0.0; }],
    hamming: [1.0, (x) => {
      if (x < 0.0) x = -x; if (x === 0.0) return 1.0; if (x >= 1.0) return 0.0;
      x = x * Math.PI; return Math.sin(x) / x * (0.54 + 0.46 * Math.cos(x));
    }],
    bicubic: [2.0, (x) => {
      const a = -0.5; if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    }],
    lanczos: [3.0, (x) => (-3.0 <= x && x < 3.0 ? sinc(x) * sinc(x / 3) : 0.0)],
  };
  const PRECISION_BITS = 32 - 8 - 2;

  /* Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output index, [xmin, count, int coefficients]. */
  function coeffs(inSize, outSize, filter) {
    const [fsupport, f] = filter;
    const scale = inSize / outSize;
    const filterscale = scale < 1.0 ? 1.0 : scale;
    const support = fsupport * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2), kk = new Float64Array(outSize * ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const ss = 1.0 / filterscale;
      let xmin = Math.trunc(center - support + 0.5); if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5); if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) { const w = f((x + xmin - center + 0.5) * ss); kk[xx * ksize + x] = w; ww += w; }
      for (let x = 0; x < xmax; x++) if (ww !== 0.0) kk[xx * ksize + x] /= ww;
      bounds[xx * 2] = xmin; bounds[xx * 2 + 1] = xmax;
    }
    const ik = new Float64Array(kk.length);  // integers, exact in float64
    for (let i = 0; i < kk.length; i++) {
      const v = kk[i] * (1 << PRECISION_BITS);
      ik[i] = kk[i] < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
    }
    return { bounds, k: ik, ksize };
  }

  function clip8(v) {
    if (v >= (1 << PRECISION_BITS) * 256) return 255;
    if (v <= 0) return 0;
    return (v / (1 << PRECISION_BITS)) | 0;  // v > 0 and < 2^30: a floor, as C's >> PRECISION_BITS
  }

  /* Resize an RGB (3 bytes a pixel) image as Pillow's Image.resize(size, filter): horizontal pass on the rows the
   * vertical pass needs, then the vertical pass, each rounding to 8 bits. */
  function resample(src, w, h, nw, nh, interpolation) {
    if (interpolation === "nearest") {  // Pillow's affine nearest: source index floor((x + 0.5) * scale)
      const out = new Uint8Array(nw * nh * 3), sx = w / nw, sy = h / nh;
      for (let y = 0; y < nh; y++) {
        const yi = Math.min(h - 1, Math.trunc((y + 0.5) * sy));
        for (let x = 0; x < nw; x++) {
          const xi = Math.min(w - 1, Math.trunc((x + 0.5) * sx)), o = (y * nw + x) * 3, i = (yi * w + xi) * 3;
          out[o] = src[i]; out[o + 1] = src[i + 1]; out[o + 2] = src[i + 2];
        }
      }
      return out;
    }
    const filter = FILTERS[interpolation] || FILTERS.bicubic;
    const half = 1 << (PRECISION_BITS - 1);
    let img = src, iw = w, ih = h;
    const needH = nw !== w, needV = nh !== h;
    const V = needV ? coeffs(h, nh, filter) : null;
    if (needH) {
      const H = coeffs(w, nw, filter);
      let y0 = 0, y1 = h;
      if (V) { y0 = V.bounds[0]; y1 = V.bounds[nh * 2 - 2] + V.bounds[nh * 2 - 1]; }
      const tmp = new Uint8Array(nw * (y1 - y0) * 3);
      for (let y = y0; y < y1; y++) {
        const row = y * w * 3, orow = (y - y0) * nw * 3;
        for (let xx = 0; xx < nw; xx++) {
          const xmin = H.bounds[xx * 2], n = H.bounds[xx * 2 + 1], kb = xx * H.ksize;
          let s0 = half, s1 = half, s2 = half;
          for (let x = 0; x < n; x++) {
            const kv = H.k[kb + x], i = row + (x + xmin) * 3;
            s0 += img[i] * kv; s1 += img[i + 1] * kv; s2 += img[i + 2] * kv;
          }
          const o = orow + xx * 3;
          tmp[o] = clip8(s0); tmp[o + 1] = clip8(s1); tmp[o + 2] = clip8(s2);
        }
      }
      img = tmp; iw = nw; ih = y1 - y0;
      if (V) for (let i = 0; i < nh; i++) V.bounds[i * 2] -= y0;
    }
    if (!needV) return img;
    const out = new Uint8Array(iw * nh * 3);
    for (let yy = 0; yy < nh; yy++) {
      const ymin = V.bounds[yy * 2], n = V.bounds[yy * 2 + 1], kb = yy * V.ksize;
      for (let xx = 0; xx < iw; xx++) {
        let s0 = half, s1 = half, s2 = half;
        for (let y = 0; y < n; y++) {
          const kv = V.k[kb + y], i = ((y + ymin) * iw + xx) * 3;
          s0 += img[i] * kv; s1 += img[i + 1] * kv; s2 += img[i + 2] * kv;
        }
        const o = (yy * iw + xx) * 3;
        out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2);
      }
    }
    return out;
  }

  /* RGBA (not premultiplied) -> RGB composited on white, as Pillow's alpha_composite(white, im). */
  function rgbOnWhite(rgba, n) {
    const out = new Uint8Array(n * 3);
    for (let p = 0; p < n; p++) {
      const a = rgba[p * 4 + 3], o = p * 3, i = p * 4;
      if (a === 255) { out[o] = rgba[i]; out[o + 1] = rgba[i + 1]; out[o + 2] = rgba[i + 2]; continue; }
      if (a === 0) { out[o] = out[o + 1] = out[o + 2] = 255; continue; }
      const coef1 = Math.floor((a * 255 * 255 * 128) / (255 * 255)), coef2 = 255 * 128 - coef1;
      for (let c = 0; c < 3; c++) {
        const t = rgba[i + c] * coef1 + 255 * coef2 + (0x80 << 7);
        out[o + c] = (((t >> 8) + t) >> 8) >> 7;
      }
    }
    return out;
  }

  function pyRound(x) {  // Python's round(): halves to even
    const f = Math.floor(x), d = x - f;
    if (d > 0.5) return f + 1; if (d < 0.5) return f;
    return f % 2 === 0 ? f : f + 1;
  }

  let canvas = null, ctx = null;
  function context2d(w, h) {
    if (!canvas) {
      canvas = typeof OffscreenCanvas !== "undefined" ? new OffscreenCanvas(w, h) : document.createElement("canvas");
      ctx = canvas.getContext("2d", { willReadFrequently: true });
    }
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.clearRect(0, 0, w, h);
    return ctx;
  }

  /* The RGBA pixels of an <img>, canvas, <video>, ImageBitmap, ImageData, File or Blob: {data, width, height}. */
  async function rgbaOf(src) {
    if (typeof ImageData !== "undefined" && src instanceof ImageData) return src;
    if (typeof HTMLImageElement !== "undefined" && src instanceof HTMLImageElement) {
      if (!src.complete || !src.naturalWidth) await src.decode();
    }
    let bitmap = null, w, h;
    if (typeof Blob !== "undefined" && src instanceof Blob ||
        typeof HTMLImageElement !== "undefined" && src instanceof HTMLImageElement) {
      bitmap = await createImageBitmap(src, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
      w = bitmap.width; h = bitmap.height;
    } else if (typeof HTMLVideoElement !== "undefined" && src instanceof HTMLVideoElement) {
      w = src.videoWidth; h = src.videoHeight;
    } else {
      w = src.width; h = src.height;
    }
    if (!w || !h) throw new Error("tlstudio.predict: the image has no pixels yet (not loaded, or the camera is not started).");
    const c = context2d(w, h);
    c.drawImage(bitmap || src, 0, 0);
    if (bitmap) bitmap.close();
    try {
      return c.getImageData(0, 0, w, h, { colorSpace: "srgb" });
    } catch (e) {
      if (e.name !== "SecurityError") throw e;
      throw new Error("tlstudio.predict: the browser does not let a page read an image from another origin (an " +
                      "<img> with another file:// address counts as one); pass the File or Blob, or serve both " +
                      "from the same web server.");
    }
  }

  /* The normalised CHW float32 input of an image, exactly as the engine computes it. */
  async function preprocess(src) {
    const P = meta.preprocess, S = P.input_size;
    const im = await rgbaOf(src);
    const w = im.width, h = im.height;
    let rgb = rgbOnWhite(im.data, w * h);
    let nw, nh;
    if (w <= h) { nw = P.resize; nh = Math.trunc(P.resize * h / w); } else { nh = P.resize; nw = Math.trunc(P.resize * w / h); }
    if (nw !== w || nh !== h) rgb = resample(rgb, w, h, nw, nh, P.interpolation);
    const top = pyRound((nh - S) / 2.0), left = pyRound((nw - S) / 2.0);
    const x = new Float32Array(3 * S * S), f = Math.fround;
    for (let c = 0; c < 3; c++) {
      const scale = f(1.0 / (255.0 * P.std[c])), shift = f(-P.mean[c] / P.std[c]), plane = c * S * S;
      for (let y = 0; y < S; y++) {
        const yy = y + top;
        for (let xx = 0; xx < S; xx++) {
          const X = xx + left;
          const v = (yy >= 0 && yy < nh && X >= 0 && X < nw) ? rgb[(yy * nw + X) * 3 + c] : 0;  // torchvision pads with 0
          x[plane + y * S + xx] = f(f(v * scale) + shift);
        }
      }
    }
    return x;
  }

  function reasonOf(c, s, t) {
    const C = c !== null && c > t, St = s !== null && s > t;
    return C && St ? "both" : C ? "content" : St ? "style" : null;
  }

  /* One row shaped like a `tl-core predict --json` row from the graph's outputs for one image. */
  function rowOf(out) {
    const classes = meta.classes, p = Array.from(out.probs.data), k = Math.max(1, meta.top_k || 3);
    const order = p.map((v, i) => i).sort((a, b) => p[b] - p[a] || a - b);  // stable, like numpy's argsort(-p)
    const top = order.slice(0, k).map((i) => ({ label: classes[i], confidence: p[i] }));
    let row;
    if (meta.multi_label) {
      const th = meta.thresholds || classes.map(() => 0.5);
      const chosen = order.filter((i) => p[i] >= th[i]).map((i) => ({ label: classes[i], p: p[i] }));
      const probs = {}; classes.forEach((c, i) => { probs[c] = p[i]; });
      row = { label: chosen.map((c) => c.label).sort().join(";"), confidence: p[order[0]], labels: chosen, probs,
              top_k: top };
    } else {
      row = { label: classes[order[0]], confidence: p[order[0]], top_k: top };
    }
    const os = meta.open_set;
    if (!os || !out.ood_score) {
      return Object.assign(row, { unknown: null, ood_score: null, ood_reason: null, ood_distances: null });
    }
    const score = out.ood_score.data[0], c = out.ood_content.data[0];
    const s = os.version >= 2 ? out.ood_style.data[0] : null;
    const unknown = score > os.threshold, t = os.version >= 2 ? os.threshold : 1.0;
    const r6 = (v) => Math.round(v * 1e6) / 1e6;
    return Object.assign(row, { unknown, ood_score: r6(score), ood_reason: unknown ? reasonOf(c, s, t) : null,
                                ood_distances: { content: r6(c), style: s === null ? null : r6(s) } });
  }

  let session = null;
  const ready = (async () => {
    if (!MODEL || !RT || typeof ort === "undefined") {
      throw new Error("TL Studio: model.js, ort/ort.wasm.min.js and ort/ort-wasm.js must be loaded before tlstudio.js.");
    }
    ort.env.wasm.numThreads = 1;  // no SharedArrayBuffer needed: runs from file:// and any static host
    ort.env.wasm.proxy = false;
    ort.env.wasm.wasmBinary = bytesOfBase64(RT.wasm);
    ort.env.wasm.wasmPaths = { mjs: URL.createObjectURL(new Blob([RT.mjs], { type: "text/javascript" })) };
    session = await ort.InferenceSession.create(bytesOfBase64(MODEL.onnx),
                                                { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    return meta;
  })();

  let queue = Promise.resolve();
  /* Classify one image: a promise of {label, confidence, top_k, unknown, ood_score, ood_reason, ood_distances}. */
  function predict(img) {
    const run = queue.then(async () => {  // one inference at a time (the session is not re-entrant)
      await ready;
      const S = meta.preprocess.input_size;
      const x = await preprocess(img);
      const out = await session.run({ input: new ort.Tensor("float32", x, [1, 3, S, S]) });
      return rowOf(out);
    });
    queue = run.catch(() => {});
    return run;
  }

  /* Draw a row of predict() into element el as one bar per class of top_k (name, bar, percentage; styled by the
     page's .bar, .name, .track, .fill and .pct rules), after a warning (class .unknown) when row.unknown, whose
     text is unknownText(row). The exported page and the app's Live component both draw with it. */
  function drawBars(el, row, unknownText) {
    el.textContent = "";
    if (row.unknown) {
      const w = document.createElement("div");
      w.className = "unknown";
      w.textContent = unknownText(row);
      el.appendChild(w);
    }
    for (const t of row.top_k) {
      const b = document.createElement("div");
      b.className = "bar";
      b.innerHTML = '<span class="name"></span><span class="track"><span class="fill" style="display:block"></span></span><span class="pct"></span>';
      b.querySelector(".name").textContent = t.label;
      b.querySelector(".fill").style.width = (100 * t.confidence).toFixed(1) + "%";
      b.querySelector(".pct").textContent = (100 * t.confidence).toFixed(1) + "%";
      el.appendChild(b);
    }
  }

  window.tlstudio = { ready, predict, preprocess, drawBars, meta, version: "tl-studio-webpage/1",
                      runtime: RT ? "onnxruntime-web " + RT.version : null };
})();
