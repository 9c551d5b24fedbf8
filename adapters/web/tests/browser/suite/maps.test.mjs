// Synced maps in the browser (PROTOCOL.md, section 3.6), in both codecs:
// two pages share a room's maps (the snapshot on join, a page's own write
// read back at once and reaching the other page, the server's writes,
// deletes, a JSON null that is not a deletion, a refused write that reads
// as the server's again), and a page whose connection drops and comes back
// with writes made meanwhile: resynced, each write taken once.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

/**
 * Connects the page's client (`window.c`) with `codec`, records its map
 * events (`window.changes`, `window.synced`, `window.refused`) and gives
 * the page a helper that waits for a condition (`window.until`).
 */
function connect(page, url, codec, options = {}) {
  return page.evaluate(async ({ url, codec, options }) => {
    window.until = async (what, f, ms = 15000) => {
      const end = performance.now() + ms;
      while (!f()) {
        if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    // Values as the test runner compares them (bigints as strings).
    window.plain = (v) => JSON.parse(JSON.stringify(v, (k, x) => (typeof x === 'bigint' ? `${x}n` : x)) ?? 'null');
    const c = await ks.connect(url, { codecs: codec === 'json' ? ['json'] : ['msgpack', 'json'], ...options });
    window.c = c;
    window.changes = [];
    window.synced = [];
    window.refused = [];
    window.opens = [];
    c.on('mapchanged', (e) => window.changes.push([e.room, e.map, e.key, e.data, e.deleted]));
    c.on('mapsynced', (e) => window.synced.push([e.room, e.map]));
    c.on('refused', (e) => window.refused.push([e.id, e.room, e.op, e.code]));
    c.on('open', (e) => window.opens.push(e));
    await new Promise((r) => c.on('open', r));
    return c.codec;
  }, { url, codec, options });
}

/** Joins `room` and waits until both of its maps are in step. */
function joinSynced(page, room) {
  return page.evaluate(async (room) => {
    await window.c.join(room);
    await window.until('the snapshots', () => ['app', 'locked', 'stamped'].every((m) => window.c.mapSynced(room, m)));
  }, room);
}

/** The server's copy of a map, and how many members' writes of each key it took. */
function serverMap(page, room, map) {
  return page.evaluate(async ({ room, map }) => window.plain(await window.c.request({ op: 'mapread', room, map })), { room, map });
}

function entries(page, room, map) {
  return page.evaluate(({ room, map }) => window.plain(Object.fromEntries(window.c.mapEntries(room, map))), { room, map });
}

for (const codec of ['json', 'msgpack']) {
  test(`two pages share a synced map: snapshot, writes, deletes, refusals, ${codec}`, { timeout: 60000 }, async () => {
    const room = `settings-${codec}`;
    const [a, b] = await Promise.all([openPage(browser, server.url('/')), openPage(browser, server.url('/'))]);
    assert.equal(await connect(a, server.ws('/ws'), codec), codec);
    assert.equal(await connect(b, server.ws('/ws'), codec), codec);
    // The server opens the room's maps before anyone joins.
    assert.equal(await a.evaluate((room) => window.c.request({ op: 'mapopen', room }), room), true);

    // Not a member yet: refused at once, by type.
    const early = await a.evaluate(async (room) => {
      try {
        await window.c.mapSet(room, 'app', 'theme', 'blue');
        return null;
      } catch (e) {
        return [e.name, e.kind, window.c.mapGet(room, 'app', 'theme') === undefined];
      }
    }, room);
    assert.deepEqual(early, ['SendError', 'not_member', true]);

    // Each page's snapshot: the server's entries, then the map is in step.
    await Promise.all([joinSynced(a, room), joinSynced(b, room)]);
    for (const page of [a, b]) {
      assert.deepEqual(await entries(page, room, 'app'), { theme: 'dark' });
      assert.deepEqual(await entries(page, room, 'locked'), { mode: 'strict' });
      const seen = await page.evaluate(() => ({ changes: window.plain(window.changes), synced: window.synced }));
      assert.deepEqual(seen.changes.filter((c) => c[0] === room).sort(), [
        [room, 'app', 'theme', 'dark', false],
        [room, 'locked', 'mode', 'strict', false],
        [room, 'stamped', 'at', 'server', false],
      ]);
      assert.deepEqual(seen.synced.filter((s) => s[0] === room).sort(), [[room, 'app'], [room, 'locked'], [room, 'stamped']]);
    }

    // a's writes read back at once (an event says so before the call
    // returns), resolve once acknowledged, and reach b.
    const big = String(2n ** 60n + 1n);
    const written = await a.evaluate(async ({ room, big }) => {
      const c = window.c;
      window.changes.length = 0;
      const writes = [
        c.mapSet(room, 'app', 'volume', 0.8),
        c.mapSet(room, 'app', 'layout', { panes: [1, 'two', null], big: BigInt(big) }),
        c.mapSet(room, 'app', 'nothing', null),
      ];
      const atOnce = {
        volume: c.mapGet(room, 'app', 'volume'),
        layout: window.plain(c.mapGet(room, 'app', 'layout')),
        nothing: c.mapGet(room, 'app', 'nothing'),
        events: window.plain(window.changes),
      };
      const ids = await Promise.all(writes);
      return { atOnce, ids, promiseIds: writes.map((p) => p.id) };
    }, { room, big });
    assert.equal(written.atOnce.volume, 0.8);
    assert.deepEqual(written.atOnce.layout, { panes: [1, 'two', null], big: `${big}n` });
    assert.equal(written.atOnce.nothing, null, 'a JSON null is a value, not nothing');
    assert.deepEqual(written.atOnce.events, [
      [room, 'app', 'volume', 0.8, false],
      [room, 'app', 'layout', { panes: [1, 'two', null], big: `${big}n` }, false],
      [room, 'app', 'nothing', null, false],
    ]);
    assert.deepEqual(written.ids, written.promiseIds);
    assert.ok(written.ids.every((id) => id > 0));
    const atB = await b.evaluate(async (room) => {
      await window.until('a\'s writes', () => window.c.mapGet(room, 'app', 'layout') !== undefined
        && window.c.mapGet(room, 'app', 'volume') === 0.8 && window.c.mapGet(room, 'app', 'nothing') === null);
      return {
        entries: window.plain(Object.fromEntries(window.c.mapEntries(room, 'app'))),
        nothing: window.changes.filter((c) => c[2] === 'nothing').map(([, , , data, deleted]) => [data, deleted]),
        bigint: typeof window.c.mapGet(room, 'app', 'layout').big,
      };
    }, room);
    assert.deepEqual(atB.entries, { layout: { panes: [1, 'two', null], big: `${big}n` }, nothing: null, theme: 'dark', volume: 0.8 });
    assert.deepEqual(atB.nothing, [[null, false]]);
    assert.equal(atB.bigint, 'bigint', 'integers beyond 2^53 stay exact');

    // The server's write reaches both.
    assert.equal(await a.evaluate((room) => window.c.request({ op: 'mapset', room, map: 'app', key: 'theme', value: 'light' }), room), true);
    for (const page of [a, b]) {
      await page.evaluate((room) => window.until('the server\'s write', () => window.c.mapGet(room, 'app', 'theme') === 'light'), room);
    }

    // b deletes a key (gone at once on b), and the server deletes another:
    // both pages see each as deleted, distinct from a null value.
    await b.evaluate(async (room) => {
      const p = window.c.mapDelete(room, 'app', 'volume');
      if (window.c.mapGet(room, 'app', 'volume') !== undefined) throw new Error('not deleted at once');
      await p;
    }, room);
    assert.equal(await b.evaluate((room) => window.c.request({ op: 'mapdelete', room, map: 'app', key: 'nothing' }), room), true);
    for (const page of [a, b]) {
      const deleted = await page.evaluate(async (room) => {
        await window.until('the deletes', () => !window.c.mapEntries(room, 'app').has('volume')
          && !window.c.mapEntries(room, 'app').has('nothing'));
        return window.changes.filter((c) => c[4]).map(([, , key, data, deleted]) => [key, data === undefined, deleted]);
      }, room);
      assert.deepEqual(deleted, [['volume', true, true], ['nothing', true, true]]);
      assert.equal(await page.evaluate((room) => window.c.mapGet(room, 'app', 'volume'), room), undefined);
    }

    // A write to the map only the server writes: read back at once, then
    // refused (op mset, by id), and the key reads as the server's again.
    const refused = await a.evaluate(async (room) => {
      const c = window.c;
      window.changes.length = 0;
      const p = c.mapSet(room, 'locked', 'mode', 'loose');
      const atOnce = c.mapGet(room, 'locked', 'mode');
      let error = null;
      try {
        await p;
      } catch (e) {
        error = [e.name, e.kind, e.op, e.code, e.id === p.id, e.room];
      }
      return {
        atOnce,
        error,
        after: c.mapGet(room, 'locked', 'mode'),
        events: window.changes.map(([, map, key, data]) => [map, key, data]),
        refused: window.refused.filter((r) => r[0] === p.id).map(([, r, op, code]) => [r, op, code]),
      };
    }, room);
    assert.equal(refused.atOnce, 'loose');
    assert.deepEqual(refused.error, ['RefusedError', 'refused', 'mset', 'read_only', true, room]);
    assert.equal(refused.after, 'strict');
    assert.deepEqual(refused.events, [['locked', 'mode', 'loose'], ['locked', 'mode', 'strict']]);
    assert.deepEqual(refused.refused, [[room, 'mset', 'read_only']]);

    // In a map whose writers stamp their writes, a's write, made after
    // the server's, wins: the page's wall clock stamps it.
    await a.evaluate((room) => window.c.mapSet(room, 'stamped', 'at', 'page'), room);
    assert.deepEqual((await serverMap(a, room, 'stamped')).entries, { at: 'page' });
    await b.evaluate((room) => window.until('a\'s stamped write', () => window.c.mapGet(room, 'stamped', 'at') === 'page'), room);

    // Every side ends with the server's map; b never saw the refused value.
    const want = await serverMap(a, room, 'app');
    assert.deepEqual(want.entries, { layout: { panes: [1, 'two', null], big: `${big}n` }, theme: 'light' });
    assert.deepEqual(want.writes, { layout: 1, nothing: 1, volume: 2 });
    for (const page of [a, b]) {
      assert.deepEqual(await entries(page, room, 'app'), want.entries);
      assert.deepEqual(await entries(page, room, 'locked'), { mode: 'strict' });
    }
    const bSawLoose = await b.evaluate(() => window.changes.some((c) => c[3] === 'loose'));
    assert.equal(bSawLoose, false);
    await a.context().close();
    await b.context().close();
  });

  test(`a page whose connection drops resyncs and its writes meanwhile are taken once, ${codec}`, { timeout: 60000 }, async () => {
    const room = `offline-${codec}`;
    const [a, b] = await Promise.all([openPage(browser, server.url('/')), openPage(browser, server.url('/'))]);
    // a goes through the chaos proxy and retries quickly, without a limit.
    await connect(a, server.ws('/ws', server.ports.proxy), codec, { backoff: { base: 50, max: 200, maxAttempts: null } });
    await connect(b, server.ws('/ws'), codec);
    assert.equal(await b.evaluate((room) => window.c.request({ op: 'mapopen', room }), room), true);
    await Promise.all([joinSynced(a, room), joinSynced(b, room)]);
    const session = await a.evaluate(() => window.c.session);

    // The link goes silent: a's first writes leave and are not acknowledged.
    await server.control('blackhole');
    await a.evaluate((room) => {
      window.writes = [];
      for (let i = 1; i <= 5; i++) window.writes.push(window.c.mapSet(room, 'app', `inflight.${i}`, i));
    }, room);
    // Then the connection drops, and the server accepts none for now: a's
    // next writes wait in its queue.
    await server.control('refuse?on=1');
    await server.control('cut');
    const offline = await a.evaluate(async (room) => {
      const c = window.c;
      await window.until('the drop', () => c.state === 'reconnecting');
      window.synced.length = 0;
      for (let i = 1; i <= 5; i++) window.writes.push(c.mapSet(room, 'app', `offline.${i}`, { i }));
      window.writes.push(c.mapSet(room, 'app', 'shared', 'a, offline'));
      window.writes.push(c.mapDelete(room, 'app', 'theme'));
      return { state: c.state, queued: c.queued, reads: window.plain(Object.fromEntries(c.mapEntries(room, 'app'))) };
    }, room);
    assert.notEqual(offline.state, 'open');
    assert.ok(offline.queued >= 7, `queued while offline: ${offline.queued}`);
    assert.deepEqual(Object.keys(offline.reads).sort(), [
      'inflight.1', 'inflight.2', 'inflight.3', 'inflight.4', 'inflight.5',
      'offline.1', 'offline.2', 'offline.3', 'offline.4', 'offline.5', 'shared',
    ], 'a reads its own writes while offline (theme deleted)');
    // Meanwhile b and the server write: a hears of it when it is back.
    await b.evaluate(async (room) => {
      await window.c.mapSet(room, 'app', 'shared', 'b, online');
      await window.c.mapSet(room, 'app', 'fromb', 1);
      await window.c.request({ op: 'mapset', room, map: 'app', key: 'fromserver', value: [1, 2] });
    }, room);
    await new Promise((r) => setTimeout(r, 300));
    await server.control('refuse');

    const back = await a.evaluate(async (room) => {
      const c = window.c;
      await Promise.all(window.writes);
      await window.until('the snapshot', () => window.synced.some(([r, m]) => r === room && m === 'app') && c.mapSynced(room, 'app'));
      const open = window.opens.at(-1);
      return {
        resumed: open.resumed,
        session: c.session,
        lost: c.stats().sessionsLost,
        reads: window.plain(Object.fromEntries(c.mapEntries(room, 'app'))),
      };
    }, room);
    assert.equal(back.resumed, true);
    assert.equal(back.session, session, 'the same session, resumed');
    assert.equal(back.lost, 0);

    // The server took each write once; a's offline write of the shared
    // key came last, so it wins; every page reads what the server holds.
    const want = await serverMap(b, room, 'app');
    const expected = { fromb: 1, fromserver: [1, 2], shared: 'a, offline' };
    for (let i = 1; i <= 5; i++) {
      expected[`inflight.${i}`] = i;
      expected[`offline.${i}`] = { i };
    }
    assert.deepEqual(want.entries, expected);
    const writes = { fromb: 1, shared: 2, theme: 1 };
    for (let i = 1; i <= 5; i++) {
      writes[`inflight.${i}`] = 1;
      writes[`offline.${i}`] = 1;
    }
    assert.deepEqual(want.writes, writes, 'each write taken once');
    assert.deepEqual(back.reads, expected);
    await b.evaluate((room) => window.until('a\'s writes', () => window.c.mapGet(room, 'app', 'offline.5') !== undefined
      && window.c.mapGet(room, 'app', 'shared') === 'a, offline'), room);
    assert.deepEqual(await entries(b, room, 'app'), expected);
    await a.context().close();
    await b.context().close();
  });
}
