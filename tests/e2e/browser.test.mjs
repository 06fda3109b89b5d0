// The example page (examples/browser) in headless Chromium: MQTT.js's browser bundle connects through the gateway to
// Mosquitto with the token in a cookie, in a `bearer.<jwt>` subprotocol, and in the MQTT CONNECT password, and shows
// the message it published when it comes back. One screenshot per mode goes to a temp dir (printed on stderr).
//
// The page is served over HTTPS (https://127.0.0.1:PAGEPORT, the same throwaway certificate as the gateway). Over
// plain http://127.0.0.1:PAGEPORT Chromium does NOT send the cookie with the wss:// upgrade, whatever its SameSite:
// an http page and a wss socket are different sites once the scheme counts, and the cookie is then a blocked
// third-party cookie. The last test shows that pitfall from an http:// copy of the page.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import {
  E2E_DIR, REPO_ROOT, makeCert, makeTempDir, startGateway, startJwks, startMosquitto, stopAll, uniqueId, withTimeout,
} from './harness.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const PAGE_DIR = path.join(REPO_ROOT, 'examples', 'browser');
const MQTT_BUNDLE = path.join(E2E_DIR, 'node_modules', 'mqtt', 'dist', 'mqtt.min.js');
// The gateway is addressed by the same host as the page (127.0.0.1; the certificate covers it), so that the
// cookie set for that host goes along with the WebSocket upgrade.
const HOST = '127.0.0.1';

let c;
let browser;
let pageServer;
let plainPageServer;
// Kept only when asked for (E2E_SCREENSHOT_DIR); otherwise removed with the other temp dirs at exit.
const shotDir = process.env.E2E_SCREENSHOT_DIR || makeTempDir('screenshots');

/**
 * Serves the example page, its script, and MQTT.js's browser bundle from tests/e2e/node_modules, over HTTPS with
 * `tls` ({cert, key} file paths) or plain HTTP without.
 */
function startPageServer(tls) {
  const files = {
    '/': [path.join(PAGE_DIR, 'index.html'), 'text/html; charset=utf-8'],
    '/index.html': [path.join(PAGE_DIR, 'index.html'), 'text/html; charset=utf-8'],
    '/app.js': [path.join(PAGE_DIR, 'app.js'), 'text/javascript; charset=utf-8'],
    '/mqtt.min.js': [MQTT_BUNDLE, 'text/javascript; charset=utf-8'],
  };
  const handler = (req, res) => {
    const entry = files[new URL(req.url, 'http://x').pathname];
    if (!entry) {
      res.writeHead(404).end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': entry[1], 'cache-control': 'no-store' });
    fs.createReadStream(entry[0]).pipe(res);
  };
  const server = tls
    ? https.createServer({ cert: fs.readFileSync(tls.cert), key: fs.readFileSync(tls.key) }, handler)
    : http.createServer(handler);
  return new Promise((resolve) => server.listen(0, HOST, () => resolve(server)));
}

before(async () => {
  assert.ok(fs.existsSync(CHROMIUM), `${CHROMIUM} missing (scripts/e2e.sh installs Debian's chromium)`);
  assert.ok(fs.existsSync(MQTT_BUNDLE), `${MQTT_BUNDLE} missing: run npm ci in tests/e2e`);
  const [jwks, tls, broker] = await Promise.all([startJwks(), makeCert(), startMosquitto()]);
  pageServer = await startPageServer(tls);
  plainPageServer = await startPageServer(null);
  const pageOrigin = `https://${HOST}:${pageServer.address().port}`;
  const plainPageOrigin = `http://${HOST}:${plainPageServer.address().port}`;
  const gw = await startGateway({
    jwks,
    tls,
    upstream: `ws://127.0.0.1:${broker.wsPort}/ws`,
    // Exactly the pages' origins: browsers always send Origin on a WebSocket upgrade.
    origins: [pageOrigin, plainPageOrigin],
    env: { JWT_COOKIE_NAME: 'session', MQTT_CONNECT_AUTH: 'true' },
  });
  browser = await withTimeout(chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync',
    ],
  }), 60000, 'chromium launch');
  c = { jwks, tls, broker, gw, pageOrigin, plainPageOrigin, gwUrl: gw.url('/mqtt', HOST) };
  process.stderr.write(`e2e: browser screenshots go to ${shotDir}\n`);
}, { timeout: 120000 });

after(async () => {
  await browser?.close().catch(() => {});
  await stopAll();
  await c?.jwks.close();
  for (const server of [pageServer, plainPageServer]) {
    server?.closeAllConnections?.();
    await new Promise((resolve) => (server ? server.close(() => resolve()) : resolve()));
  }
}, { timeout: 120000 });

/**
 * Opens the page in a fresh context (cookies from `cookies`), waits until #status is final, takes a screenshot and
 * returns { status, log }.
 */
async function runPage(name, query, { cookies = [], timeout = 20000, origin = c.pageOrigin } = {}) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 900, height: 640 } });
  try {
    if (cookies.length) await context.addCookies(cookies);
    const page = await context.newPage();
    const consoleLines = [];
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
    const url = `${origin}/index.html?${new URLSearchParams({ gw: c.gwUrl, ...query })}`;
    await page.goto(url, { timeout: 15000 });
    await page.waitForFunction(() => {
      const s = document.getElementById('status')?.dataset.state;
      return s === 'received' || s === 'error';
    }, null, { timeout }).catch(() => {});
    // Let the last log lines (the WebSocket close) land before reading.
    await page.waitForTimeout(300);
    const status = await page.textContent('#status');
    const log = await page.$$eval('#log li', (els) => els.map((e) => e.textContent));
    await page.screenshot({ path: path.join(shotDir, `${name}.png`), fullPage: true });
    return { status, log, consoleLines };
  } finally {
    await context.close();
  }
}

const sessionCookie = (value) => ({
  name: 'session',
  value,
  domain: HOST,
  path: '/',
  httpOnly: true,
  // What a login endpoint on the gateway's host would set. Lax suffices: the https page and the wss socket are
  // same-site (a cookie is not scoped by port).
  secure: true,
  sameSite: 'Lax',
});

describe('browser (Chromium + MQTT.js bundle)', () => {
  test('browser: token in a cookie (session=<jwt>) — the message comes back', { timeout: 60000 }, async () => {
    const msg = `cookie ${uniqueId('m')}`;
    const r = await runPage('cookie', { mode: 'cookie', msg }, { cookies: [sessionCookie(c.jwks.mint({ sub: 'browser-cookie' }))] });
    assert.equal(r.status, `received:${msg}`, `page log:\n${r.log.join('\n')}\n${r.consoleLines.join('\n')}`);
  });

  test('browser: token as a "bearer.<jwt>" subprotocol beside "mqtt" — the message comes back', { timeout: 60000 }, async () => {
    const msg = `subprotocol ${uniqueId('m')}`;
    const r = await runPage('subprotocol', { mode: 'subprotocol', token: c.jwks.mint({ sub: 'browser-subprotocol' }), msg });
    assert.equal(r.status, `received:${msg}`, `page log:\n${r.log.join('\n')}\n${r.consoleLines.join('\n')}`);
    assert.ok(r.log.some((l) => l.includes('subprotocol "mqtt"')), `the broker's "mqtt" was selected:\n${r.log.join('\n')}`);
  });

  test('browser: token as the MQTT CONNECT password — the message comes back', { timeout: 60000 }, async () => {
    const msg = `password ${uniqueId('m')}`;
    const r = await runPage('password', { mode: 'password', token: c.jwks.mint({ sub: 'browser-password' }), msg });
    assert.equal(r.status, `received:${msg}`, `page log:\n${r.log.join('\n')}\n${r.consoleLines.join('\n')}`);
  });

  test('browser: an empty subprotocol token — the upgrade is refused (401) and the page sees close 1006', { timeout: 60000 }, async () => {
    // Subprotocol mode with an empty token offers "mqtt" and "bearer.", which is no token: the upgrade is 401 only
    // because nothing else carries one. (Plain cookie mode without a cookie would be taken over by the CONNECT
    // password path instead.)
    const r = await runPage('no-token', { mode: 'subprotocol', token: '' });
    assert.match(r.status, /^error:/, r.log.join('\n'));
    assert.ok(r.log.some((l) => /websocket close 1006/.test(l)), `page log:\n${r.log.join('\n')}`);
    const refused = c.gw.events().filter((e) => e.event === 'rejected' && e.status === 401);
    assert.ok(refused.length > 0, 'the gateway logged a 401');
  });

  test('browser: a bad CONNECT password — CONNACK not authorized (5), then close 1008', { timeout: 60000 }, async () => {
    const r = await runPage('bad-password', { mode: 'password', token: c.jwks.mintForged() });
    assert.match(r.status, /^error:5 /, `page log:\n${r.log.join('\n')}`);
    assert.ok(r.log.some((l) => /websocket close 1008/.test(l)), `page log:\n${r.log.join('\n')}`);
  });

  test('browser: a page from another origin is refused (403) even with a valid cookie', { timeout: 60000 }, async () => {
    // Same page, served on "localhost" instead of 127.0.0.1: Origin http://localhost:PORT is not allowed.
    const context = await browser.newContext({ ignoreHTTPSErrors: true });
    try {
      await context.addCookies([sessionCookie(c.jwks.mint())]);
      const page = await context.newPage();
      const other = c.pageOrigin.replace('127.0.0.1', 'localhost'); // https://localhost:PAGEPORT
      await page.goto(`${other}/index.html?${new URLSearchParams({ gw: c.gwUrl, mode: 'cookie' })}`, { timeout: 15000 });
      await page.waitForFunction(() => document.getElementById('status')?.dataset.state === 'error', null, { timeout: 20000 });
      const log = await page.$$eval('#log li', (els) => els.map((e) => e.textContent));
      assert.ok(log.some((l) => /websocket close 1006/.test(l)), log.join('\n'));
      const forbidden = c.gw.events().filter((e) => e.event === 'rejected' && e.status === 403);
      assert.ok(forbidden.length > 0, 'the gateway logged a 403');
    } finally {
      await context.close();
    }
  });
  test('browser: from an http:// page the cookie is NOT sent with the wss:// upgrade (cross-scheme pitfall)', { timeout: 60000 }, async () => {
    // Same cookie as the cookie test, even SameSite=None; Secure, but the page is http://: Chromium treats the
    // upgrade as cross-site and withholds the cookie, so the upgrade carries no token. The gateway then takes the
    // MQTT CONNECT password path and refuses the password-less CONNECT (CONNACK 5), or answers 401 without it.
    const r = await runPage('http-page-cookie', { mode: 'cookie' }, {
      origin: c.plainPageOrigin,
      cookies: [{ ...sessionCookie(c.jwks.mint({ sub: 'browser-http-page' })), sameSite: 'None' }],
    });
    assert.match(r.status, /^error:/, `page log:\n${r.log.join('\n')}`);
    const cookieSessions = c.gw.events().filter((e) => e.event === 'session_end' && e.subject === 'browser-http-page');
    assert.equal(cookieSessions.length, 0, 'no session was authenticated by the cookie');
  });
});
