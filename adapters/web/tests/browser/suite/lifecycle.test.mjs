// The page's life: a page that goes away ends its session at once unless
// it asked to survive a reload, a reload with unacknowledged messages both
// ways loses nothing, the network going away for 20 s, and a hidden tab
// whose timers the browser holds back.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function lives(srv, client) {
  const all = await (await fetch(srv.url('/control/sessions'))).json();
  return all[client] ?? [];
}

async function until(what, f, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

test('a page that goes away ends its session at once', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const client = await page.evaluate(async (url) => {
    const c = await ks.connect(url);
    await new Promise((r) => c.on('open', r));
    return c.clientId;
  }, server.ws('/ws'));
  await page.goto('about:blank');
  const life = await until('the session to end', async () => {
    const l = await lives(server, client);
    return l.length > 1 ? l : null;
  }, 5000);
  assert.deepEqual(life, ['opened', 'ended ClientClosed'], 'ended by the page, never detached');
  await page.context().close();
});

test('a closed tab ends its session at once', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const client = await page.evaluate(async (url) => {
    const c = await ks.connect(url);
    await new Promise((r) => c.on('open', r));
    return c.clientId;
  }, server.ws('/ws'));
  const context = page.context();
  await page.close({ runBeforeUnload: true });
  const life = await until('the session to end', async () => {
    const l = await lives(server, client);
    return l.length > 1 ? l : null;
  }, 5000);
  assert.deepEqual(life, ['opened', 'ended ClientClosed'], 'ended by the page, not detached by the browser\'s 1001');
  await context.close();
});

test('a reload with unacknowledged messages both ways loses nothing', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const url = server.ws('/ws', server.ports.proxy);
  const before = await page.evaluate(async (url) => {
    const c = await ks.connect(url, { surviveReload: 'suite' });
    await new Promise((r) => c.on('open', r));
    window.c = c;
    return { client: c.clientId, session: c.session };
  }, url);
  // The link goes silent: what is sent now stays unacknowledged.
  await server.control('blackhole');
  await page.evaluate(() => { for (let n = 1; n <= 20; n++) window.c.post({ n }); });
  const push = await fetch(server.url('/control/push?count=20'), { method: 'POST' });
  assert.equal(push.status, 200);
  await sleep(300);
  assert.equal(await page.evaluate(() => window.c.unacknowledged), 20);
  await page.reload();
  await page.waitForFunction(() => window.ksReady === true);
  const after = await page.evaluate(async (url) => {
    const c = await ks.connect(url, { surviveReload: 'suite' });
    const got = [];
    const acked = new Set();
    c.on('acked', (e) => { for (let id = e.first; id <= e.last; id++) acked.add(id); });
    const echoes = [];
    c.on('message', (e) => (e.data.s !== undefined ? got.push(e.data.s) : echoes.push(e.data.n)));
    const restored = c.restored;
    await new Promise((resolve) => {
      const check = () => (got.length >= 20 && echoes.length >= 20 && restored.every((id) => acked.has(id))
        ? resolve() : setTimeout(check, 20));
      check();
    });
    await new Promise((r) => setTimeout(r, 300));
    return { client: c.clientId, session: c.session, got, echoes, restored, lost: c.stats().sessionsLost };
  }, url);
  assert.equal(after.client, before.client);
  assert.equal(after.session, before.session, 'the same session, resumed');
  assert.equal(after.restored.length, 20);
  assert.deepEqual(after.got, Array.from({ length: 20 }, (_, i) => i + 1), 'the server\'s, once each');
  assert.deepEqual(after.echoes, Array.from({ length: 20 }, (_, i) => i + 1), 'the old page\'s, echoed once each');
  assert.equal(after.lost, 0);
  const tally = (await server.tally())[before.client];
  assert.deepEqual(tally, { last: 20, received: 20, duplicates: 0, outOfOrder: 0 });
  const life = await lives(server, before.client);
  assert.deepEqual(life.slice(0, 1), ['opened']);
  assert.ok(life.includes('resumed'), JSON.stringify(life));
  assert.ok(!life.some((l) => l.startsWith('ended')), JSON.stringify(life));
  await page.context().close();
});

test('20 s offline: attempts do not count, and the page reconnects as the network returns', { timeout: 90000 }, async () => {
  const context = await browser.newContext();
  const page = await openPage(browser, server.url('/'), context);
  await page.evaluate(async (url) => {
    const c = await ks.connect(url, { backoff: { base: 100, max: 400, maxAttempts: 3 } });
    window.attempts = 0;
    await new Promise((r) => c.on('open', r));
    window.c = c;
    window.got = [];
    window.states = [];
    c.on('message', (e) => window.got.push(e.data.n));
    c.on('statechange', (e) => window.states.push([e.state, performance.now()]));
  }, server.ws('/ws', server.ports.proxy));
  // The network goes: the browser opens no new connection, and the one
  // open dies with it (Chrome's emulation leaves open sockets alone, so
  // the proxy cuts it).
  await context.setOffline(true);
  await server.control('cut');
  await page.evaluate(() => { for (let n = 1; n <= 30; n++) window.c.post({ n }); });
  await sleep(20000);
  const offline = await page.evaluate(() => ({ state: window.c.state, connects: window.c.stats().connects }));
  assert.notEqual(offline.state, 'failed', 'offline attempts are not held against the server');
  assert.notEqual(offline.state, 'open');
  assert.ok(offline.connects > 5, `it kept trying: ${offline.connects} attempts`);
  const back = await page.evaluate(() => performance.now());
  await context.setOffline(false);
  await sleep(300);
  const attempts = await page.evaluate(() => window.c.stats().connects);
  const r = await page.evaluate(async () => {
    await new Promise((resolve) => {
      const check = () => (window.got.length >= 30 ? resolve() : setTimeout(check, 20));
      check();
    });
    const open = window.states.filter(([s]) => s === 'open').map(([, t]) => t);
    return { got: window.got, open, connects: window.c.stats().connects, lost: window.c.stats().sessionsLost };
  });
  assert.deepEqual(r.got, Array.from({ length: 30 }, (_, i) => i + 1), 'sent offline, echoed once each');
  const reopened = r.open.find((t) => t > back);
  const trail = await page.evaluate((back) => window.states.filter(([, t]) => t > back - 1000).map(([s, t]) => `${s}@${Math.round(t - back)}`), back);
  // The driver starts an attempt as the network returns (Chrome itself
  // may hold the socket back for a few seconds after a run of failures).
  assert.ok(attempts > offline.connects, `an attempt within 300 ms: ${offline.connects} then ${attempts}: ${trail}`);
  assert.ok(reopened !== undefined && reopened - back < 10000, `open again ${reopened - back} ms after: ${trail}`);
  assert.equal(r.lost, 0);
  console.log(`# offline: ${offline.connects} attempts while offline (${offline.state}), reopened ${Math.round(reopened - back)} ms after: ${trail}`);
  await context.close();
});

test('a hidden tab whose timers run once a minute keeps its session (scaled: 30 s at 1/20)', { timeout: 90000 }, async () => {
  // The suite's heartbeat scaled by 1/20: the server pings every 1 s and
  // closes after 1.5 s of silence (20 s and 30 s for real); the page's
  // timers fire on 3 s boundaries (Chrome's once a minute for a hidden
  // tab); the tab stays "hidden" for 30 s (10 minutes).
  const hb = await startServer({ SUITE_PING_MS: '1000' });
  try {
    const page = await openPage(browser, hb.url('/'));
    const r = await page.evaluate(async (url) => {
      const THROTTLE = 3000;
      const clock = {
        setTimeout: (f, ms) => {
          const at = performance.now() + ms;
          return setTimeout(f, Math.ceil(at / THROTTLE) * THROTTLE - performance.now());
        },
        clearTimeout: (t) => clearTimeout(t),
      };
      const run = async (serverPings) => {
        const c = await ks.connect(url, { clock, serverPings, codecs: ['json'] });
        await new Promise((r) => c.on('open', r));
        return c;
      };
      const pinged = await run(true);
      const control = await run(false);
      await new Promise((r) => setTimeout(r, 30000));
      const echoes = [];
      pinged.on('message', (e) => echoes.push(e.data.n));
      await Promise.all([1, 2, 3].map((n) => pinged.send({ n })));
      await new Promise((r) => setTimeout(r, 200));
      return {
        pinged: { ...pinged.stats(), state: pinged.state },
        control: { ...control.stats(), state: control.state },
        echoes,
      };
    }, hb.ws('/ws'));
    assert.equal(r.pinged.connects, 1, `pinged: never reconnected: ${JSON.stringify(r.pinged)}`);
    assert.equal(r.pinged.sessionsLost, 0);
    assert.equal(r.pinged.state, 'open');
    assert.deepEqual(r.echoes, [1, 2, 3]);
    // Without server pings the same page loses its connection over and over.
    assert.ok(r.control.connects > 3, `control: ${JSON.stringify(r.control)}`);
    console.log(`# hidden tab: pinged ${r.pinged.connects} connection, control ${r.control.connects} connections`);
  } finally {
    hb.stop();
  }
});
