// The HTTP fallback (PROTOCOL.md, section 1.1) in a page. Pages load
// through the suite server's second proxy, which blocks WebSocket upgrades
// as corporate proxies do (answering them 400, or stripping their
// `Upgrade` header) while plain requests pass: they connect over the
// fallback and exchange messages exactly once, in order, both ways, in
// both codecs, across cuts of every connection the proxy carries. A
// session on the fallback moves to a WebSocket once upgrades pass, and
// back once they are blocked again, with messages in flight, and stays one
// session. The `transports` option holds a page to one transport.

import { test, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });
// Pages load through the proxy: unthrottled, whatever a test left.
beforeEach(async () => { await server.control('fallback-throttle'); });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const range = (n) => Array.from({ length: n }, (_, i) => i + 1);
// The codec each page prefers (JSON is always offered).
const CODECS = ['json', 'msgpack'];
const offer = (codec) => (codec === 'json' ? ['json'] : [codec, 'json']);

/**
 * Connects `page` to `/ws` on the origin it was loaded from (the fallback
 * proxy); once open, has the server push `pushes` messages while the page
 * sends numbered messages (echoed back): `burst` at once if asked, then
 * one every 20 ms until `finish`, so that messages are on their way up
 * however fast the server took the burst. Records every transport change with
 * what was in flight then. Returns the page's first connection.
 */
async function traffic(page, options, pushes, burst) {
  return page.evaluate(async ({ options, pushes, burst }) => {
    const c = await ks.connect('/ws', { backoff: { base: 50, max: 200 }, connectTimeout: 30000, ...options });
    window.c = c;
    window.echoes = [];
    window.pushed = [];
    window.sent = 0;
    window.resumes = 0;
    window.inFlight = () => ({
      up: c.unacknowledged + c.queued, echoes: window.echoes.length, pushed: window.pushed.length, sent: window.sent,
    });
    window.changes = [];
    c.on('transportchange', (e) => window.changes.push({ transport: e.transport, ...window.inFlight() }));
    c.on('open', (e) => { if (e.resumed) window.resumes += 1; });
    c.on('message', (e) => (e.data.s !== undefined ? window.pushed : window.echoes).push(e.data.s ?? e.data.n));
    await new Promise((r) => c.on('open', r));
    const first = { client: c.clientId, session: c.session, transport: c.transport, codec: c.codec };
    const send = () => { window.sent += 1; window.acks.push(c.send({ n: window.sent })); };
    window.acks = [c.send({ op: 'push', count: pushes })];
    if (burst) for (let i = 0; i < burst; i++) send();
    // Held back while the offline queue (100) fills, between connections.
    window.sender = setInterval(() => { if (c.queued < 50) send(); }, 20);
    return first;
  }, { options, pushes, burst });
}

/** Stops the page's sending, and waits for its traffic to be done; what it saw. */
async function finish(page, pushes) {
  return page.evaluate(async (pushes) => {
    clearInterval(window.sender);
    await Promise.all(window.acks);
    while (window.echoes.length < window.sent || window.pushed.length < pushes) await new Promise((r) => setTimeout(r, 20));
    // Anything repeated would come now.
    await new Promise((r) => setTimeout(r, 300));
    const c = window.c;
    return {
      echoes: window.echoes, pushed: window.pushed, sent: window.sent, resumes: window.resumes,
      changes: window.changes, stats: c.stats(), session: c.session, transport: c.transport,
    };
  }, pushes);
}

/** Messages on their way both ways: sent by the page and not acknowledged, and not all received by it. */
const bothWays = (f, pushes) => f.up > 0 && (f.pushed < pushes || f.echoes < f.sent);

/** Every message once, in order, both ways, in one session. */
async function assertOnce(first, r, pushes) {
  const label = first.codec;
  assert.ok(r.sent > 0);
  assert.deepEqual(r.echoes, range(r.sent), `${label}: every echo once, in order`);
  assert.deepEqual(r.pushed, range(pushes), `${label}: every pushed message once, in order`);
  const tally = (await server.tally())[first.client];
  assert.deepEqual(tally, { last: r.sent, received: r.sent, duplicates: 0, outOfOrder: 0 }, `${label}: the server got each once, in order`);
  assert.equal(r.stats.sessionsLost, 0, `${label}: no session lost`);
  assert.equal(r.session, first.session, `${label}: one session throughout`);
  const lives = (await server.sessions())[first.client];
  assert.equal(lives[0], 'opened', `${label}: ${lives}`);
  assert.ok(lives.slice(1).every((l) => l === 'resumed' || l.startsWith('detached')), `${label}: opened once, then only resumed: ${lives}`);
}

for (const [mode, how] of [['refuse', 'answered 400'], ['strip', 'stripped of their Upgrade header']]) {
  test(`upgrades ${how} on the way: the fallback carries the session, every message once across cuts`, { timeout: 120000 }, async () => {
    await server.control(`fallback-${mode}`);
    const count = 1000;
    const pages = await Promise.all(CODECS.map(() => openPage(browser, server.fallbackUrl('/'))));
    // A slow link: a cut finds messages in flight.
    await server.control('fallback-throttle?bps=16000');
    const firsts = await Promise.all(pages.map((page, i) => traffic(page, { codecs: offer(CODECS[i]) }, count, count)));
    for (const [i, first] of firsts.entries()) {
      assert.equal(first.codec, CODECS[i]);
      assert.equal(first.transport, 'http', `${first.codec}: the fallback carries the first connection`);
    }
    // Three times: once both pages are open (again), a cut of every
    // connection the proxy carries, with what was in flight then. A cut
    // can end nothing: a request still in the proxy when its connection
    // is cut has not reached the server, and Chromium sends it again on a
    // new connection by itself, as it does for any request that failed
    // on a kept-alive connection before its answer began. Such a cut is
    // repeated (at most five times) until every page resumed.
    const cuts = [];
    for (let i = 1; i <= 3; i++) {
      await Promise.all(pages.map((page) => page.waitForFunction(
        (resumes) => window.c.state === 'open' && window.resumes >= resumes, i - 1, { timeout: 30000, polling: 10 })));
      await sleep(300);
      cuts.push(await Promise.all(pages.map((page) => page.evaluate(() => window.inFlight()))));
      for (let tries = 1; ; tries++) {
        await server.control('fallback-cut');
        const resumed = await Promise.all(pages.map((page) => page.waitForFunction(
          (resumes) => window.resumes >= resumes, i, { timeout: 5000, polling: 10 }).then(() => true, () => false)));
        if (resumed.every((r) => r)) break;
        const seen = await Promise.all(pages.map((page) => page.evaluate(() => ({ state: window.c.state, resumes: window.resumes, ...window.inFlight() }))));
        console.log(`# ${mode}: cut ${i}, try ${tries}: not every page resumed: ${JSON.stringify(seen)}`);
        assert.ok(tries < 5, `${mode}: five cuts and not every page resumed: ${JSON.stringify(seen)}`);
      }
    }
    await server.control('fallback-throttle');
    const results = await Promise.all(pages.map((page) => finish(page, count)));
    for (const [i, r] of results.entries()) {
      const first = firsts[i];
      console.log(`# ${mode}, ${first.codec}: ${r.resumes} resumes, ${r.stats.retransmitted} retransmitted, ${r.stats.duplicates} duplicates dropped`);
      assert.ok(cuts.every((c) => bothWays(c[i], count)), `${first.codec}: every cut found messages in flight both ways: ${JSON.stringify(cuts.map((c) => c[i]))}`);
      assert.ok(r.resumes >= 3, `${first.codec}: cut and resumed each time (${r.resumes} resumes)`);
      assert.ok(r.stats.retransmitted > 0, `${first.codec}: the cuts caught messages in flight`);
      assert.equal(r.transport, 'http');
      assert.ok(r.changes.every((c) => c.transport !== 'websocket'), `${first.codec}: never carried by a WebSocket`);
      await assertOnce(first, r, count);
    }
    await Promise.all(pages.map((page) => page.context().close()));
  });
}

test('a session moves from the fallback to a WebSocket once upgrades pass, and back once they are blocked', { timeout: 120000 }, async () => {
  await server.control('fallback-refuse');
  // The page sends all along, the server pushes a burst, over a slow
  // link: messages are in flight both ways at each move.
  const pushes = 500;
  const pages = await Promise.all(CODECS.map(() => openPage(browser, server.fallbackUrl('/'))));
  await server.control('fallback-throttle?bps=16000');
  // A block remembered for a second: a probe within a second of it.
  const firsts = await Promise.all(pages.map((page, i) => traffic(page, { codecs: offer(CODECS[i]), fallbackMemory: 1000 }, pushes)));
  for (const first of firsts) assert.equal(first.transport, 'http', `${first.codec}: upgrades are refused`);
  await server.control('fallback-pass');
  const on = (transport) => Promise.all(pages.map((page) => page.waitForFunction(
    (t) => window.c.transport === t, transport, { timeout: 30000, polling: 10 })));
  await on('websocket');
  await sleep(300);
  await server.control('fallback-refuse');
  await server.control('fallback-cut');
  await on('http');
  await sleep(300);
  await server.control('fallback-throttle');
  const results = await Promise.all(pages.map((page) => finish(page, pushes)));
  for (const [i, r] of results.entries()) {
    const first = firsts[i];
    console.log(`# moves, ${first.codec}: ${r.resumes} resumes, ${r.stats.retransmitted} retransmitted, ${r.stats.duplicates} duplicates dropped`);
    const moves = r.changes.filter((c) => c.transport !== null);
    assert.deepEqual(moves.map((c) => c.transport), ['http', 'websocket', 'http'], `${first.codec}: ${JSON.stringify(r.changes)}`);
    for (const move of moves.slice(1)) {
      assert.ok(bothWays(move, pushes), `${first.codec}: messages in flight both ways as it moved to ${move.transport}: ${JSON.stringify(move)}`);
    }
    assert.equal(r.transport, 'http');
    await assertOnce(first, r, pushes);
  }
  await Promise.all(pages.map((page) => page.context().close()));
});

test('transports: "websocket" never falls back, "http" never tries a WebSocket, "auto" takes one that passes', { timeout: 60000 }, async () => {
  await server.control('fallback-refuse');
  const page = await openPage(browser, server.fallbackUrl('/'));
  const ws = await page.evaluate(async () => {
    const c = await ks.connect('/ws', { transports: 'websocket', backoff: { base: 50, max: 200 } });
    await new Promise((r) => setTimeout(r, 1500));
    const seen = { state: c.state, transport: c.transport, session: c.session };
    await c.close();
    return seen;
  });
  assert.notEqual(ws.state, 'open', 'no connection while upgrades are refused');
  assert.equal(ws.transport, null);
  assert.equal(ws.session, null);

  await server.control('fallback-pass');
  const connect = (options) => page.evaluate(async (options) => {
    const c = await ks.connect('/ws', options);
    const changes = [];
    c.on('transportchange', (e) => changes.push(e.transport));
    await new Promise((r) => c.on('open', r));
    const echo = await c.request({ hello: 'there' });
    // Several times the block's memory: no probe moves a page held to HTTP.
    await new Promise((r) => setTimeout(r, 1000));
    const during = c.transport;
    await c.close();
    return { during, transport: c.transport, changes, echo, client: c.clientId };
  }, options);
  const http = await connect({ transports: 'http', fallbackMemory: 100 });
  assert.equal(http.during, 'http');
  assert.deepEqual(http.changes, ['http', null], 'carried by the fallback from open to close');
  assert.equal(http.transport, null);
  assert.deepEqual(http.echo, { hello: 'there' });
  // The close record reached the server: the session ended, never detached.
  assert.deepEqual((await server.sessions())[http.client], ['opened', 'ended ClientClosed']);

  const auto = await connect({});
  assert.equal(auto.during, 'websocket');
  assert.deepEqual(auto.changes, ['websocket', null], 'a WebSocket where upgrades pass');
  assert.deepEqual(auto.echo, { hello: 'there' });
  await page.context().close();
});

test('a page on the fallback that reloads resumes its session there', { timeout: 60000 }, async () => {
  await server.control('fallback-refuse');
  const page = await openPage(browser, server.fallbackUrl('/'));
  const connect = () => page.evaluate(async () => {
    const c = await ks.connect('/ws', { surviveReload: 'fallback' });
    await new Promise((r) => c.on('open', r));
    window.c = c;
    window.echoes = [];
    c.on('message', (e) => window.echoes.push(e.data.n));
    return { client: c.clientId, session: c.session, transport: c.transport };
  });
  const before = await connect();
  assert.equal(before.transport, 'http');
  await page.evaluate(() => { for (let n = 1; n <= 20; n++) window.c.post({ n }); });
  await page.reload();
  await page.waitForFunction(() => window.ksReady === true);
  const after = await connect();
  assert.equal(after.transport, 'http');
  assert.equal(after.client, before.client);
  assert.equal(after.session, before.session, 'the same session, resumed');
  await page.waitForFunction(() => window.c.unacknowledged === 0 && window.c.queued === 0);
  const tally = (await server.tally())[before.client];
  assert.deepEqual(tally, { last: 20, received: 20, duplicates: 0, outOfOrder: 0 });
  const lives = (await server.sessions())[before.client];
  assert.deepEqual(lives.slice(0, 1), ['opened']);
  assert.ok(lives.includes('resumed') && !lives.some((l) => l.startsWith('ended')), JSON.stringify(lives));
  await page.context().close();
});
