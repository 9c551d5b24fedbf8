// Two pages in one room, and a cut with messages in flight both ways
// through the chaos proxy: every message once, in order, on every side.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const range = (n) => Array.from({ length: n }, (_, i) => i + 1);

test('two pages in one room see each other and each other\'s messages once', { timeout: 60000 }, async () => {
  const [a, b] = await Promise.all([openPage(browser, server.url('/')), openPage(browser, server.url('/'))]);
  const join = (page, name) => page.evaluate(async ({ url, name }) => {
    const c = await ks.connect(url, { codecs: name === 'a' ? ['json'] : ['msgpack', 'json'] });
    window.c = c;
    window.got = [];
    window.presence = [];
    c.on('message', (e) => { if (e.room === 'board') window.got.push(e.data); });
    c.on('presence', (e) => window.presence.push(e));
    await c.join('board');
    return c.clientId;
  }, { url: server.ws('/ws'), name });
  const ida = await join(a, 'a');
  const idb = await join(b, 'b');
  // a sees b arrive; b's snapshot holds both.
  await a.waitForFunction((idb) => window.c.members('board').has(idb), idb);
  await b.waitForFunction((ida) => window.c.members('board').has(ida), ida);
  const publish = (page, from) => page.evaluate(async (from) => {
    await Promise.all(Array.from({ length: 50 }, (_, i) => window.c.publish('board', { from, i: i + 1 })));
  }, from);
  await Promise.all([publish(a, 'a'), publish(b, 'b')]);
  const received = (page) => page.evaluate(async () => {
    while (window.got.length < 50) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 200));
    return window.got;
  });
  const [ga, gb] = await Promise.all([received(a), received(b)]);
  assert.deepEqual(ga.map((m) => [m.from, m.i]), range(50).map((i) => ['b', i]), 'a gets b\'s, once, in order');
  assert.deepEqual(gb.map((m) => [m.from, m.i]), range(50).map((i) => ['a', i]), 'b gets a\'s, once, in order');
  // b leaves: a sees it at once.
  await b.evaluate(() => window.c.close());
  await a.waitForFunction((idb) => !window.c.members('board').has(idb), idb);
  await a.context().close();
  await b.context().close();
});

test('a cut with messages in flight both ways loses and repeats nothing', { timeout: 90000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  // A slow link (16 KB/s each way): a thousand messages each way take
  // seconds to cross, so every cut finds some in flight.
  await fetch(server.url('/control/throttle?bps=16000'), { method: 'POST' });
  await page.evaluate(async (url) => {
    const c = await ks.connect(url, { codecs: ['json'], backoff: { base: 50, max: 200 } });
    await new Promise((r) => c.on('open', r));
    window.c = c;
    window.echoes = [];
    window.pushed = [];
    window.opens = 0;
    c.on('open', () => { window.opens += 1; });
    c.on('message', (e) => (e.data.s !== undefined ? window.pushed : window.echoes).push(e.data.s ?? e.data.n));
    // The server starts pushing 1 000, and the page sends 1 000: both
    // directions in flight while the proxy cuts the connection.
    await c.send({ op: 'push', count: 1000 });
    window.acks = Array.from({ length: 1000 }, (_, i) => c.send({ n: i + 1 }));
  }, server.ws('/ws', server.ports.proxy));
  for (let i = 0; i < 4; i++) {
    await sleep(400);
    await server.control('cut');
  }
  await server.control('throttle');
  const r = await page.evaluate(async () => {
    await Promise.all(window.acks);
    while (window.echoes.length < 1000 || window.pushed.length < 1000) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 300));
    return { echoes: window.echoes, pushed: window.pushed, opens: window.opens, stats: window.c.stats(), client: window.c.clientId };
  });
  assert.ok(r.opens >= 1, `the connection was cut and resumed (${r.opens} resumes)`);
  assert.ok(r.stats.retransmitted > 0, 'the cuts caught messages in flight');
  assert.equal(r.stats.sessionsLost, 0);
  assert.deepEqual(r.echoes, range(1000), 'every echo once, in order');
  assert.deepEqual(r.pushed, range(1000), 'every pushed message once, in order');
  const tally = (await server.tally())[r.client];
  assert.deepEqual(tally, { last: 1000, received: 1000, duplicates: 0, outOfOrder: 0 });
  console.log(`# cut: ${r.opens} resumes, ${r.stats.retransmitted} retransmitted, ${r.stats.duplicates} duplicates dropped`);
  await page.context().close();
});
