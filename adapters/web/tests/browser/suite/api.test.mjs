// The rest of the API a page uses: requests, latest values (sent and
// received), datagrams, refusals, and numbers beyond 2^53 in both codecs.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

for (const codec of ['json', 'msgpack']) {
  test(`requests, latest values, datagrams, refusals and big numbers, ${codec}`, { timeout: 60000 }, async () => {
    const page = await openPage(browser, server.url('/'));
    const r = await page.evaluate(async ({ url, codec }) => {
      const c = await ks.connect(url, { codecs: codec === 'json' ? ['json'] : ['msgpack', 'json'] });
      await new Promise((resolve) => c.on('open', resolve));
      const out = {};
      // A request is answered (the server returns its payload).
      out.answer = await c.request({ q: 'ping', list: [1, 2, 3] }, { timeout: 5000 });
      // Numbers beyond 2^53 travel exactly, both ways.
      const big = 2n ** 60n + 1n;
      const echoed = new Promise((resolve) => c.on('message', (e) => { if (e.data.big !== undefined) resolve(e.data); }));
      await c.send({ big, small: 7, neg: -(2n ** 62n) });
      const back = await echoed;
      out.big = [typeof back.big, String(back.big), String(back.neg), back.small];
      // Latest values: many updates, far fewer messages, the last one always.
      const latest = [];
      c.on('message', (e) => { if (e.data.x !== undefined) latest.push(e.data.x); });
      for (let x = 1; x <= 200; x++) c.sendLatest('cursor', { x });
      await new Promise((resolve) => {
        const check = () => (latest.at(-1) === 200 ? resolve() : setTimeout(check, 10));
        check();
      });
      await new Promise((resolve) => setTimeout(resolve, 100));
      out.latest = latest;
      // A room's latest values from the server: each once, in order,
      // ending with the newest.
      const ticks = [];
      const lastTick = new Promise((resolve) => c.on('latest', (e) => {
        if (e.key !== 'tick') return;
        ticks.push(e.data.s);
        if (e.data.s === 500) resolve(e.room);
      }));
      await c.send({ op: 'board', count: 500 });
      out.board = (await lastTick).startsWith('board-');
      out.ticks = ticks;
      // A datagram comes back (no ordering or delivery promised: one).
      const dg = new Promise((resolve) => c.on('datagram', (e) => resolve([...e.data])));
      c.sendDatagram(new Uint8Array([1, 2, 3, 250]));
      out.datagram = await dg;
      // Publishing to a room not joined is refused, by type.
      try {
        await c.publish('nowhere', { hi: 1 });
        out.refused = null;
      } catch (e) {
        out.refused = [e.name, e.kind, e.code, e.op];
      }
      // A request that times out says so.
      try {
        await c.request({ q: 'slow' }, { timeout: 0 });
        out.timeout = null;
      } catch (e) {
        out.timeout = [e.name, e.kind];
      }
      await c.close();
      return out;
    }, { url: server.ws('/ws'), codec });
    assert.deepEqual(r.answer, { q: 'ping', list: [1, 2, 3] });
    assert.deepEqual(r.big, ['bigint', String(2n ** 60n + 1n), String(-(2n ** 62n)), 7]);
    assert.equal(r.latest.at(-1), 200);
    assert.ok(r.latest.length < 50, `coalesced: ${r.latest.length} messages for 200 updates`);
    assert.deepEqual(r.latest, [...r.latest].sort((a, b) => a - b), 'in order');
    assert.equal(r.board, true);
    assert.equal(r.ticks.at(-1), 500);
    assert.ok(r.ticks.every((s, i) => i === 0 || s > r.ticks[i - 1]), 'each once, in order');
    assert.deepEqual(r.datagram, [1, 2, 3, 250]);
    assert.deepEqual(r.refused, ['RefusedError', 'refused', 'not_member', 'publish']);
    assert.deepEqual(r.timeout, ['RequestError', 'timed_out']);
    await page.context().close();
  });
}
