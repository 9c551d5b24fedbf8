// Echo, exactly once, in both codecs: a page sends numbered messages, the
// server echoes each, and both sides see every number once, in order.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launch, openPage } from '../harness.mjs';

let server;
let browser;
before(async () => { server = await startServer(); browser = await launch(); });
after(async () => { await browser?.close(); server?.stop(); });

for (const codec of ['json', 'msgpack']) {
  test(`echo exactly once, ${codec}`, { timeout: 60000 }, async () => {
    const page = await openPage(browser, server.url('/'));
    const result = await page.evaluate(async ({ url, codec }) => {
      const client = await ks.connect(url, { codecs: codec === 'json' ? ['json'] : ['msgpack', 'json'] });
      await new Promise((resolve) => client.on('open', resolve));
      const N = 500;
      const seen = [];
      const done = new Promise((resolve) => {
        client.on('message', (e) => { seen.push(e.data.n); if (seen.length === N) resolve(); });
      });
      const acks = [];
      for (let n = 1; n <= N; n++) acks.push(client.send({ n, text: 'é'.repeat(n % 7) }));
      const ids = await Promise.all(acks);
      await done;
      const open = client.codec;
      const stats = client.stats();
      await client.close();
      return { seen, ids, codec: open, stats, state: client.state };
    }, { url: server.ws('/ws'), codec });
    assert.equal(result.codec, codec);
    assert.deepEqual(result.seen, Array.from({ length: 500 }, (_, i) => i + 1));
    assert.deepEqual(result.ids, Array.from({ length: 500 }, (_, i) => i + 1));
    assert.equal(result.stats.duplicates, 0);
    assert.equal(result.state, 'closed');
    const tally = await server.tally();
    const mine = Object.values(tally).find((t) => t.received === 500 && t.last === 500);
    assert.ok(mine, `the server received 1..500 once: ${JSON.stringify(tally)}`);
    assert.equal(mine.duplicates, 0);
    assert.equal(mine.outOfOrder, 0);
    await page.context().close();
  });
}
