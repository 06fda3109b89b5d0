// The broker-independent MQTT-through-the-gateway tests, run once against Mosquitto and once against RabbitMQ.
//
// `ctx()` returns { gw, jwks, tls, url, mqttOpts } once the file's before() hook has started everything:
//   url       the gateway URL the clients use (wss://localhost:PORT/...)
//   mqttOpts  extra MQTT.js options for this broker (protocolVersion)

import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { test } from 'node:test';

import {
  collect, connect, connectExpectingFailure, end, once, rawUpgrade, subscribe, uniqueId, withTimeout,
} from './harness.mjs';

/** MQTT.js options carrying the token in `Authorization: Bearer` and trusting the throwaway certificate. */
export function headerAuth(c, token = c.jwks.mint()) {
  return { ca: c.tls.certPem, wsOptions: { headers: { Authorization: `Bearer ${token}` } }, ...c.mqttOpts };
}

/** A deterministic payload for message `i`: sizes from 1 byte to a few KiB, every byte value, a checksum inside. */
function payloadFor(runId, i) {
  const body = Buffer.alloc(1 + ((i * 97) % 4096));
  for (let j = 0; j < body.length; j += 1) body[j] = (i * 31 + j * 7) & 0xff;
  const head = Buffer.from(`${runId}#${String(i).padStart(3, '0')}#${crypto.createHash('sha256').update(body).digest('hex')}#`);
  return Buffer.concat([head, body]);
}

export function brokerSuite(name, ctx) {
  test(`${name}: 50 messages published through the gateway arrive intact and in order`, { timeout: 60000 }, async () => {
    const c = ctx();
    const topic = `e2e/${uniqueId('order')}`;
    const runId = uniqueId('run');
    const { client: sub } = await connect(c.url, { ...headerAuth(c), clientId: uniqueId('sub') });
    const { client: pub } = await connect(c.url, { ...headerAuth(c), clientId: uniqueId('pub') });
    try {
      await subscribe(sub, topic, { qos: 1 });
      const received = collect(sub, topic, 50, 30000);
      const sent = [];
      for (let i = 0; i < 50; i += 1) {
        const p = payloadFor(runId, i);
        sent.push(p);
        // QoS 1 keeps the broker from dropping any under load; MQTT guarantees per-publisher order on one topic.
        pub.publish(topic, p, { qos: 1 });
      }
      const got = await received;
      assert.equal(got.length, 50);
      for (let i = 0; i < 50; i += 1) {
        assert.ok(Buffer.compare(got[i].packet.payload, sent[i]) === 0,
          `message ${i} differs: got ${got[i].payload.slice(0, 40)}…, expected ${sent[i].toString().slice(0, 40)}…`);
      }
    } finally {
      await end(pub);
      await end(sub);
    }
  });

  test(`${name}: a QoS 1 PUBLISH is acknowledged (PUBACK) and delivered at QoS 1`, { timeout: 30000 }, async () => {
    const c = ctx();
    const topic = `e2e/${uniqueId('qos1')}`;
    const { client: sub } = await connect(c.url, { ...headerAuth(c), clientId: uniqueId('sub') });
    const { client: pub } = await connect(c.url, { ...headerAuth(c), clientId: uniqueId('pub') });
    try {
      const granted = await subscribe(sub, topic, { qos: 1 });
      assert.equal(granted[0].qos, 1, `SUBACK granted ${JSON.stringify(granted)}`);
      const received = collect(sub, topic, 1);
      // publishAsync resolves only when the PUBACK for this packet id came back through the gateway.
      const packet = await withTimeout(pub.publishAsync(topic, 'acked', { qos: 1 }), 10000, 'PUBACK');
      assert.equal(packet?.qos, 1);
      assert.ok(packet.messageId > 0, 'the PUBLISH carried a packet id');
      const [msg] = await received;
      assert.equal(msg.payload, 'acked');
      assert.equal(msg.packet.qos, 1);
    } finally {
      await end(pub);
      await end(sub);
    }
  });

  test(`${name}: an abrupt client disconnect fires its Will at another subscriber`, { timeout: 30000 }, async () => {
    const c = ctx();
    const willTopic = `e2e/${uniqueId('will')}`;
    const { client: watcher } = await connect(c.url, { ...headerAuth(c), clientId: uniqueId('watch') });
    let victim;
    try {
      await subscribe(watcher, willTopic, { qos: 1 });
      ({ client: victim } = await connect(c.url, {
        ...headerAuth(c),
        clientId: uniqueId('victim'),
        will: { topic: willTopic, payload: Buffer.from('victim went away'), qos: 1, retain: false },
      }));
      const will = collect(watcher, willTopic, 1, 15000);
      // Destroying MQTT.js's stream terminates the WebSocket's TCP socket: no MQTT DISCONNECT, no Close frame.
      victim.stream.destroy();
      const [msg] = await will;
      assert.equal(msg.payload, 'victim went away');
    } finally {
      victim?.end(true);
      await end(watcher);
    }
  });

  test(`${name}: a broker-side close reaches the client (same clientId connects again)`, { timeout: 30000 }, async () => {
    const c = ctx();
    const clientId = uniqueId('dup');
    const { client: first } = await connect(c.url, { ...headerAuth(c), clientId });
    let second;
    try {
      const closed = once(first, 'close', 15000, "first client's 'close' after the broker dropped it");
      ({ client: second } = await connect(c.url, { ...headerAuth(c), clientId }));
      await closed;
      assert.equal(first.connected, false);
      // The second session is the live one: it still round-trips a message.
      const topic = `e2e/${uniqueId('dup')}`;
      await subscribe(second, topic);
      const got = collect(second, topic, 1);
      second.publish(topic, 'still here');
      assert.equal((await got)[0].payload, 'still here');
    } finally {
      first.end(true);
      await end(second);
    }
  });

  test(`${name}: a bad token in Authorization is refused with 401 before any MQTT`, { timeout: 30000 }, async () => {
    const c = ctx();
    for (const [label, token] of [
      ['forged signature', c.jwks.mintForged()],
      ['expired', c.jwks.mint({ exp: Math.floor(Date.now() / 1000) - 3600, iat: Math.floor(Date.now() / 1000) - 7200 })],
      ['wrong audience', c.jwks.mint({ aud: 'someone-else' })],
      ['not a JWT', 'not.a.jwt'],
    ]) {
      const { error } = await connectExpectingFailure(c.url, { ...headerAuth(c, token), clientId: uniqueId('bad') });
      assert.ok(error, `${label}: expected an error`);
      assert.match(error.message, /401/, `${label}: ${error.message}`);
      const raw = await rawUpgrade(c.gw.port, c.path, { Authorization: `Bearer ${token}`, 'Sec-WebSocket-Protocol': 'mqtt' });
      assert.equal(raw.status, 401, label);
      assert.match(raw.headers['www-authenticate'] ?? '', /^Bearer\b.*error="invalid_token"/, `${label}: ${JSON.stringify(raw.headers)}`);
    }
  });

  test(`${name}: the token as the access_token query parameter also works`, { timeout: 30000 }, async () => {
    const c = ctx();
    const url = `${c.url}?access_token=${encodeURIComponent(c.jwks.mint())}`;
    const { client } = await connect(url, { ca: c.tls.certPem, clientId: uniqueId('q'), ...c.mqttOpts });
    try {
      const topic = `e2e/${uniqueId('q')}`;
      await subscribe(client, topic);
      const got = collect(client, topic, 1);
      client.publish(topic, 'query');
      assert.equal((await got)[0].payload, 'query');
    } finally {
      await end(client);
    }
  });

  test(`${name}: an Origin not in --ws-allowed-origins is refused with 403`, { timeout: 30000 }, async () => {
    const c = ctx();
    const raw = await rawUpgrade(c.gw.port, c.path, {
      Authorization: `Bearer ${c.jwks.mint()}`, 'Sec-WebSocket-Protocol': 'mqtt', Origin: 'https://evil.example',
    });
    assert.equal(raw.status, 403);
    const opts = headerAuth(c);
    opts.wsOptions.headers.Origin = 'https://evil.example';
    const { error } = await connectExpectingFailure(c.url, { ...opts, clientId: uniqueId('origin') });
    assert.match(error?.message ?? '', /403/);
  });
}
