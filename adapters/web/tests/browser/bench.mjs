// The browser half of the bench crate's `browser-echo` and
// `browser-connect` scenarios (bench/src/browser.rs starts the servers and
// this script, and turns what it prints into figures).
//
//     node bench.mjs BASE_URL PLAIN_WS_URL '{"reps":5,"n":20000,"window":64,"connects":30}'
//
// In one page, in the same run: echo loops through the package and
// through a plain browser WebSocket against a plain echo server (no
// session layer: the floor), in JSON and MessagePack, 60 B and 1 KiB
// payloads, with the package's defaults, with batching off and with a 2 ms
// batch window, in blocks whose order rotates; the round trip of one
// message at a time (the latency the defaults' batching could add); the page's script time per
// message from Chrome's own counters (Performance.getMetrics:
// ScriptDuration); and the time from connect() to an open session, and
// from reconnect() to a resumed one. Prints one JSON object.

import { launch } from './harness.mjs';

const [base, plainUrl, configText] = process.argv.slice(2);
const config = JSON.parse(configText ?? '{}');
const reps = config.reps ?? 5;
const n = config.n ?? 20000;
const windowSize = config.window ?? 64;
const connects = config.connects ?? 30;

const browser = await launch();
const page = await (await browser.newContext()).newPage();
page.on('pageerror', (e) => console.error('page error:', e));
await page.goto(`${base}/`);
await page.waitForFunction(() => window.ksReady === true, null, { timeout: 30000 });
const cdp = await page.context().newCDPSession(page);
await cdp.send('Performance.enable');

async function scriptSeconds() {
  const { metrics } = await cdp.send('Performance.getMetrics');
  return metrics.find((m) => m.name === 'ScriptDuration').value;
}

/** In the page: one echo loop; resolves with its duration in ms. */
const echoLoop = async ({ kind, url, codec, size, n, windowSize, batch }) => {
  const pad = 'x'.repeat(Math.max(0, size - (codec === 'json' ? 18 : 14)));
  const encode = codec === 'json' ? (v) => JSON.stringify(v) : (v) => ks.msgpack.encode(v);
  const decode = codec === 'json' ? (d) => JSON.parse(d) : (d) => ks.msgpack.decode(new Uint8Array(d));
  let sent = 0;
  let got = 0;
  let bad = 0;
  if (kind === 'plain') {
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    await new Promise((r) => { ws.onopen = r; });
    const t0 = performance.now();
    const ms = await new Promise((resolve) => {
      const send = () => { sent += 1; ws.send(encode({ n: sent, pad })); };
      ws.onmessage = (e) => {
        got += 1;
        if (decode(e.data).n !== got) bad += 1;
        if (sent < n) send();
        if (got === n) resolve(performance.now() - t0);
      };
      for (let i = 0; i < windowSize; i++) send();
    });
    ws.close();
    return { ms, bad };
  }
  const options = { codecs: codec === 'json' ? ['json'] : ['msgpack', 'json'] };
  if (batch !== undefined) options.batch = batch;
  const c = await ks.connect(url, options);
  await new Promise((r) => c.on('open', r));
  const t0 = performance.now();
  const ms = await new Promise((resolve) => {
    const send = () => { sent += 1; c.post({ n: sent, pad }); };
    c.on('message', (e) => {
      got += 1;
      if (e.data.n !== got) bad += 1;
      if (sent < n) send();
      if (got === n) resolve(performance.now() - t0);
    });
    for (let i = 0; i < windowSize; i++) send();
  });
  await c.close();
  return { ms, bad };
};

// BENCH_PROFILE=1: a CPU profile of one loop through the package, the
// functions with the most samples on stderr (to see where the time goes).
if (process.env.BENCH_PROFILE) {
  await cdp.send('Profiler.enable');
  await cdp.send('Profiler.setSamplingInterval', { interval: 200 });
  await cdp.send('Profiler.start');
  const r = await page.evaluate(echoLoop, { kind: 'ks', url: `${base.replace('http', 'ws')}/ws`, codec: 'json', size: 60, n, windowSize });
  const { profile } = await cdp.send('Profiler.stop');
  const counts = new Map();
  for (const id of profile.samples) counts.set(id, (counts.get(id) ?? 0) + 1);
  const self = new Map();
  for (const node of profile.nodes) {
    const k = `${node.callFrame.functionName || '(anonymous)'} ${node.callFrame.url.split('/').pop()}:${node.callFrame.lineNumber}`;
    self.set(k, (self.get(k) ?? 0) + (counts.get(node.id) ?? 0));
  }
  console.error(`  profile: ${Math.round(n / (r.ms / 1000))} msg/s`);
  for (const [k, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) {
    console.error(`  ${(100 * v / profile.samples.length).toFixed(1).padStart(5)} % ${k}`);
  }
}

const cases = [];
for (const codec of ['json', 'msgpack']) for (const size of [60, 1024]) cases.push({ codec, size });
const echo = {};
for (const c of cases) {
  echo[`${c.codec}-${c.size}`] = {
    plain: [], ours: [], unbatched: [], batched: [],
    plainScriptUs: [], oursScriptUs: [], unbatchedScriptUs: [], batchedScriptUs: [], bad: 0,
  };
}
// Warm both paths once.
for (const kind of ['plain', 'ours']) {
  await page.evaluate(echoLoop, { kind: kind === 'ours' ? 'ks' : 'plain', url: kind === 'ours' ? `${base.replace('http', 'ws')}/ws` : plainUrl, codec: 'json', size: 60, n: 2000, windowSize });
}
for (let rep = 0; rep < reps; rep++) {
  for (const c of cases) {
    const key = `${c.codec}-${c.size}`;
    const kinds = ['plain', 'ours', 'unbatched', 'batched'];
    const order = kinds.map((_, i) => kinds[(i + rep) % kinds.length]);
    for (const kind of order) {
      const before = await scriptSeconds();
      const r = await page.evaluate(echoLoop, {
        kind: kind === 'plain' ? 'plain' : 'ks',
        url: kind === 'plain' ? plainUrl : `${base.replace('http', 'ws')}/ws`,
        batch: { batched: { window: 2 }, unbatched: false }[kind],
        codec: c.codec,
        size: c.size,
        n,
        windowSize,
      });
      const script = (await scriptSeconds()) - before;
      echo[key][kind].push(n / (r.ms / 1000));
      echo[key][`${kind}ScriptUs`].push((script * 1e6) / n);
      echo[key].bad += r.bad;
    }
  }
  console.error(`  browser-echo rep ${rep} (defaults, unbatched, batch 2 ms, plain msg/s): ${Object.entries(echo).map(([k, v]) => `${k} ${Math.round(v.ours.at(-1))} ${Math.round(v.unbatched.at(-1))} ${Math.round(v.batched.at(-1))} ${Math.round(v.plain.at(-1))}`).join(', ')}`);
}

// The round trip of one message at a time, JSON 60 B: per repetition, the
// mean of `latency` round trips in a row, in µs (the page's clock is
// coarsened to 100 µs, too coarse to time one).
const latency = { plain: [], ours: [], unbatched: [] };
for (let rep = 0; rep < (config.latency ? reps : 0); rep++) {
  const kinds = Object.keys(latency);
  for (const kind of kinds.map((_, i) => kinds[(i + rep) % kinds.length])) {
    const r = await page.evaluate(echoLoop, {
      kind: kind === 'plain' ? 'plain' : 'ks',
      url: kind === 'plain' ? plainUrl : `${base.replace('http', 'ws')}/ws`,
      batch: kind === 'unbatched' ? false : undefined,
      codec: 'json',
      size: 60,
      n: config.latency,
      windowSize: 1,
    });
    latency[kind].push((r.ms * 1000) / config.latency);
  }
  console.error(`  browser-latency rep ${rep} (defaults, unbatched, plain µs): ${Math.round(latency.ours.at(-1))} ${Math.round(latency.unbatched.at(-1))} ${Math.round(latency.plain.at(-1))}`);
}

/** In the page: connect and resume times, and a plain socket's open time, in ms. */
const connectTimes = async ({ url, plainUrl, connects }) => {
  const fresh = [];
  const resumed = [];
  const plain = [];
  for (let i = 0; i < connects; i++) {
    let t0 = performance.now();
    const ws = new WebSocket(plainUrl);
    await new Promise((r) => { ws.onopen = r; });
    plain.push(performance.now() - t0);
    ws.close();
    t0 = performance.now();
    const c = await ks.connect(url, { codecs: ['json'] });
    await new Promise((r) => c.on('open', r));
    fresh.push(performance.now() - t0);
    await c.send({ n: 1 });
    t0 = performance.now();
    const back = new Promise((r) => c.on('open', (e) => { if (e.resumed) r(); }));
    c.reconnect();
    await back;
    resumed.push(performance.now() - t0);
    await c.close();
  }
  return { fresh, resumed, plain };
};
const times = await page.evaluate(connectTimes, { url: `${base.replace('http', 'ws')}/ws`, plainUrl, connects });
console.log(JSON.stringify({ echo, latency, connect: times }));
await browser.close();
