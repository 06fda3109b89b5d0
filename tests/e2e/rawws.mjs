// A bare WebSocket client (the `ws` package) and hand-built MQTT packets, for the checks MQTT.js cannot show:
// the exact CONNACK bytes and the WebSocket Close code and reason the gateway sends.

import WebSocket from 'ws';

import { withTimeout } from './harness.mjs';

function varint(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
}

function str(s) {
  const b = Buffer.isBuffer(s) ? s : Buffer.from(s, 'utf8');
  const len = Buffer.alloc(2);
  len.writeUInt16BE(b.length);
  return Buffer.concat([len, b]);
}

/** An MQTT CONNECT (version 4 = 3.1.1 or 5), clean session, keepalive 60, optional username/password. */
export function connectPacket({ clientId, username, password, version = 4 }) {
  let flags = 0x02;
  if (username !== undefined) flags |= 0x80;
  if (password !== undefined) flags |= 0x40;
  const parts = [str('MQTT'), Buffer.from([version, flags, 0x00, 0x3c])];
  if (version === 5) parts.push(Buffer.from([0x00])); // no properties
  parts.push(str(clientId));
  if (username !== undefined) parts.push(str(username));
  if (password !== undefined) parts.push(str(password));
  const body = Buffer.concat(parts);
  return Buffer.concat([Buffer.from([0x10]), varint(body.length), body]);
}

/**
 * Opens a WebSocket to `url` offering `protocols`; resolves once open (or rejects with the HTTP status on refusal).
 * Returns { ws, protocol, next(ms) -> next binary message, closed -> Promise<{code, reason}> }.
 */
export async function openRaw(url, { protocols = ['mqtt'], headers = {}, ca } = {}) {
  const ws = new WebSocket(url, protocols, { headers, ca, rejectUnauthorized: !!ca });
  const queue = [];
  const waiters = [];
  ws.on('message', (data) => {
    const buf = Buffer.isBuffer(data) ? data : Buffer.concat(data);
    const w = waiters.shift();
    if (w) w(buf); else queue.push(buf);
  });
  const closed = new Promise((resolve) => ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })));
  await withTimeout(new Promise((resolve, reject) => {
    ws.once('open', resolve);
    ws.once('unexpected-response', (_req, res) => reject(Object.assign(new Error(`HTTP ${res.statusCode}`), { status: res.statusCode })));
    ws.once('error', reject);
  }), 10000, `WebSocket open ${url}`);
  return {
    ws,
    protocol: ws.protocol,
    closed,
    next: (ms = 10000) => withTimeout(new Promise((resolve) => {
      const b = queue.shift();
      if (b) resolve(b); else waiters.push(resolve);
    }), ms, 'a WebSocket message'),
  };
}
