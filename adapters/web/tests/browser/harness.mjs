// The browser suite's harness: starts the suite server (the Rust example
// `suite_server`, built by test.sh), launches headless Chromium through
// playwright-core, and opens pages that have the package loaded.
//
// Owns processes and browsers for the tests, and stops them; it never
// asserts anything itself.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const SERVER = process.env.SUITE_SERVER;

/** Starts a suite server; `env` adds variables (SUITE_SESSION_GRACE_MS, ...). */
export async function startServer(env = {}) {
  if (!SERVER) throw new Error('SUITE_SERVER is not set: run the suite through adapters/web/test.sh');
  const child = spawn(SERVER, [], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`suite server exited with ${code}`)));
    lines.once('line', resolve);
  });
  const ports = JSON.parse(first);
  const at = (port) => (path = '/') => `http://127.0.0.1:${port}${path}`;
  const server = {
    ports,
    url: at(ports.main),
    proxyUrl: at(ports.proxy),
    /** Through the proxy whose handling of upgrades `fallback-refuse`, `fallback-strip` and `fallback-pass` set. */
    fallbackUrl: at(ports.fallback),
    foreignUrl: at(ports.foreign),
    ws: (path = '/ws', port = ports.main) => `ws://127.0.0.1:${port}${path}`,
    async control(name) {
      const r = await fetch(server.url(`/control/${name}`), { method: 'POST' });
      if (!r.ok) throw new Error(`control ${name}: ${r.status}`);
    },
    async tally() {
      return (await fetch(server.url('/control/tally'))).json();
    },
    /** What happened to each client's sessions: client id -> [`opened`, `detached 1006`, `resumed`, ...]. */
    async sessions() {
      return (await fetch(server.url('/control/sessions'))).json();
    },
    stop() {
      child.kill('SIGTERM');
    },
  };
  return server;
}

/**
 * Launches headless Chromium with the flags this machine needs (without the
 * network ones it stalls on a closed network). playwright-core gives every
 * launch a fresh profile directory (`--user-data-dir`) of its own.
 */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
}

/** A new page (in its own context unless one is given) with the package loaded from `url`. */
export async function openPage(browser, url, context) {
  const ctx = context ?? await browser.newContext();
  const page = await ctx.newPage();
  page.on('pageerror', (e) => console.error('page error:', e));
  // Failed socket attempts are expected in these tests, and their URLs are long.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('WebSocket connection to')) console.error('page console:', m.text());
  });
  await page.goto(url);
  await page.waitForFunction(() => window.ksReady === true, null, { timeout: 20000 });
  return page;
}
