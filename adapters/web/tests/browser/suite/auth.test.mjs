// Credentials a page can send (a cookie, a ticket fetched before every
// attempt) and refusals a page can see: in-band rejects, so a refused page
// stops or waits as told instead of backing off through every attempt.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

/** In the page: connects, and resolves with the first settled state (open, failed, reconnecting). */
const settle = async ({ url, options }) => {
  const client = await ks.connect(url, options ?? {});
  const started = performance.now();
  const outcome = await new Promise((resolve) => {
    client.on('statechange', (e) => {
      if (['open', 'failed', 'reconnecting'].includes(e.state)) {
        resolve({ state: e.state, failure: e.failure ?? null, cause: e.cause ?? null, at: e.at ?? null });
      }
    });
  });
  outcome.ms = performance.now() - started;
  outcome.connects = client.stats().connects;
  outcome.now = performance.now();
  window.client = client;
  return outcome;
};

test('a cookie authenticates the page', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const result = await page.evaluate(async (url) => {
    await fetch('/login?user=alice');
    const client = await ks.connect(url);
    await new Promise((resolve) => client.on('open', resolve));
    const snapshot = new Promise((resolve) => client.on('presence', (e) => resolve(e)));
    await client.join('lobby');
    return (await snapshot).joined;
  }, server.ws('/ws-auth'));
  assert.deepEqual(result.map((m) => m.identity), ['alice']);
  await page.context().close();
});

test('a page without credentials fails at once, not after ten attempts', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const r = await page.evaluate(settle, { url: server.ws('/ws-auth') });
  assert.equal(r.state, 'failed');
  assert.equal(r.failure.type, 'unauthorized');
  assert.equal(r.connects, 1);
  assert.ok(r.ms < 3000, `${r.ms} ms`);
  await page.context().close();
});

test('a banned page stops at the first attempt', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const r = await page.evaluate(settle, { url: server.ws('/ws-ban') });
  assert.equal(r.state, 'failed');
  assert.equal(r.failure.type, 'forbidden');
  assert.equal(r.connects, 1);
  await page.context().close();
});

test('a busy server has the page wait out its hint', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const r = await page.evaluate(settle, { url: server.ws('/ws-busy') });
  assert.equal(r.state, 'reconnecting');
  assert.equal(r.cause.type, 'rejected');
  assert.equal(r.cause.code, 4429);
  // The server's hint is 10 s; the backoff alone would be about 1 s.
  assert.ok(r.at - r.now >= 9000, `next attempt in ${r.at - r.now} ms`);
  await page.evaluate(() => window.client.close());
  await page.context().close();
});

test('a ticket is fetched before every attempt', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.url('/'));
  const r = await page.evaluate(async (url) => {
    let fetched = 0;
    const client = await ks.connect(url, {
      tokenParam: 'ticket',
      token: async () => { fetched += 1; return (await fetch('/ticket')).text(); },
    });
    const opens = [];
    await new Promise((resolve) => client.on('open', (e) => { opens.push(e.resumed); if (opens.length === 2) resolve(); else client.reconnect(); }));
    await client.send({ n: 1 });
    await client.close();
    return { fetched, opens };
  }, server.ws('/ws-ticket'));
  // Tickets are single-use: the second connection needed a fresh one.
  assert.equal(r.fetched, 2);
  assert.deepEqual(r.opens, [false, true]);
  await page.context().close();
});

test('a page of a foreign origin is refused', { timeout: 60000 }, async () => {
  const page = await openPage(browser, server.foreignUrl('/'));
  const r = await page.evaluate(settle, { url: server.ws('/ws') });
  assert.equal(r.state, 'failed');
  assert.equal(r.failure.type, 'forbidden');
  assert.equal(r.connects, 1);
  await page.context().close();
});
