// ws-gateway in front of Mosquitto 2.0 (WebSocket listener): the shared broker suite (MQTT 3.1.1), the token in the
// MQTT CONNECT password (3.1.1 and 5), and the gateway's own Close frames (token expiry 1008, drain 1001).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  NOT_AUTHORIZED_V4, NOT_AUTHORIZED_V5, collect, connect, connectExpectingFailure, end, makeCert, rawUpgrade,
  sleep, startGateway, startJwks, startMosquitto, stopAll, subscribe, uniqueId, withTimeout,
} from './harness.mjs';
import { connectPacket, openRaw } from './rawws.mjs';
import { brokerSuite, headerAuth } from './suite.mjs';

let c;

before(async () => {
  const [jwks, tls, broker] = await Promise.all([startJwks(), makeCert(), startMosquitto()]);
  const gw = await startGateway({
    jwks,
    tls,
    // A path in the upstream URL is what the broker is asked for, whatever the client's path.
    upstream: `ws://127.0.0.1:${broker.wsPort}/ws`,
    origins: ['http://127.0.0.1:1'],
    env: { MQTT_CONNECT_AUTH: 'true' },
  });
  c = { jwks, tls, broker, gw, path: '/mqtt', url: gw.url('/mqtt'), mqttOpts: { protocolVersion: 4 } };
}, { timeout: 60000 });

after(async () => {
  await stopAll();
  await c?.jwks.close();
}, { timeout: 120000 });

describe('mosquitto', () => {
  brokerSuite('mosquitto', () => c);

  test('mosquitto: the same suite holds for MQTT 5 (a PUBLISH round trip and QoS 1)', { timeout: 30000 }, async () => {
    const topic = `e2e/${uniqueId('v5')}`;
    const { client, connack } = await connect(c.url, { ...headerAuth(c), protocolVersion: 5, clientId: uniqueId('v5') });
    try {
      assert.equal(connack.reasonCode ?? 0, 0);
      await subscribe(client, topic, { qos: 1 });
      const got = collect(client, topic, 1);
      await withTimeout(client.publishAsync(topic, 'five', { qos: 1 }), 10000, 'PUBACK (v5)');
      assert.equal((await got)[0].payload, 'five');
    } finally {
      await end(client);
    }
  });

  describe('token in the MQTT CONNECT password (no token on the upgrade)', () => {
    const passwordOpts = (version, password) => ({
      ca: c.tls.certPem, protocolVersion: version, username: 'any-user', password, clientId: uniqueId(`pw${version}`),
    });

    for (const version of [4, 5]) {
      test(`mosquitto: a valid JWT as the CONNECT password is accepted (MQTT ${version === 4 ? '3.1.1' : '5'})`, { timeout: 30000 }, async () => {
        const { client } = await connect(c.url, passwordOpts(version, c.jwks.mint()));
        try {
          const topic = `e2e/${uniqueId('pw')}`;
          await subscribe(client, topic, { qos: 1 });
          const got = collect(client, topic, 1);
          await withTimeout(client.publishAsync(topic, `password v${version}`, { qos: 1 }), 10000, 'PUBACK');
          assert.equal((await got)[0].payload, `password v${version}`);
        } finally {
          await end(client);
        }
      });

      const expected = version === 4 ? NOT_AUTHORIZED_V4 : NOT_AUTHORIZED_V5;
      test(`mosquitto: an invalid or missing CONNECT password gets CONNACK not authorized (${expected}) (MQTT ${version === 4 ? '3.1.1' : '5'})`, { timeout: 30000 }, async () => {
        for (const [label, password] of [['forged', c.jwks.mintForged()], ['garbage', 'hunter2'], ['missing', undefined]]) {
          const opts = passwordOpts(version, password);
          if (password === undefined) delete opts.password;
          const { error, events } = await connectExpectingFailure(c.url, opts);
          assert.ok(error, `${label}: MQTT.js saw no error, only ${JSON.stringify(events)}`);
          assert.equal(error.code, expected, `${label}: ${error.message} (events ${JSON.stringify(events)})`);
        }
      });
    }

    test('mosquitto: the refusal is CONNACK bytes then WebSocket Close 1008, and the broker never sees the client', { timeout: 30000 }, async () => {
      for (const version of [4, 5]) {
        const clientId = uniqueId(`raw${version}`);
        const raw = await openRaw(c.url, { ca: c.tls.certPem, protocols: ['mqtt'] });
        assert.equal(raw.protocol, 'mqtt');
        raw.ws.send(connectPacket({ clientId, username: 'u', password: c.jwks.mintForged(), version }));
        const connack = await raw.next();
        if (version === 4) {
          assert.deepEqual([...connack], [0x20, 0x02, 0x00, NOT_AUTHORIZED_V4]);
        } else {
          assert.equal(connack[0], 0x20);
          assert.equal(connack[3], NOT_AUTHORIZED_V5, `v5 CONNACK ${connack.toString('hex')}`);
        }
        const { code } = await withTimeout(raw.closed, 10000, 'Close after the refusing CONNACK');
        assert.equal(code, 1008);
        await sleep(200);
        assert.ok(!c.broker.child.lines.some((l) => l.includes(clientId)),
          `mosquitto logged the refused client ${clientId}:\n${c.broker.child.lines.filter((l) => l.includes(clientId)).join('\n')}`);
      }
    });

    test('mosquitto: without a token and without the mqtt subprotocol the upgrade is still 401', { timeout: 15000 }, async () => {
      const raw = await rawUpgrade(c.gw.port, '/mqtt', { 'Sec-WebSocket-Protocol': 'chat' });
      assert.equal(raw.status, 401);
      assert.match(raw.headers['www-authenticate'] ?? '', /error="invalid_token"/);
    });
  });

  describe("the gateway's own Close frames", () => {
    test('mosquitto: a token that expires mid-session ends it with Close 1008 "token expired"', { timeout: 30000 }, async () => {
      const gw = await startGateway({
        jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${c.broker.wsPort}/ws`, args: ['--jwt-leeway-seconds', '0'],
      });
      const token = c.jwks.mint({ exp: Math.floor(Date.now() / 1000) + 3 });
      const raw = await openRaw(gw.url('/mqtt'), { ca: c.tls.certPem, headers: { Authorization: `Bearer ${token}` } });
      raw.ws.send(connectPacket({ clientId: uniqueId('exp') }));
      assert.deepEqual([...(await raw.next())], [0x20, 0x02, 0x00, 0x00]);
      const { code, reason } = await withTimeout(raw.closed, 15000, 'Close at token expiry');
      assert.equal(code, 1008);
      assert.match(reason, /expired/);
      const status = await gw.stop();
      assert.equal(status.code, 0);
    });

    test('mosquitto: SIGTERM drains a live session with Close 1001 and the gateway exits 0', { timeout: 60000 }, async () => {
      const gw = await startGateway({
        jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${c.broker.wsPort}/ws`, args: ['--graceful-drain-timeout-seconds', '2', '--drain-spread-seconds', '0'],
      });
      const raw = await openRaw(gw.url('/mqtt'), { ca: c.tls.certPem, headers: { Authorization: `Bearer ${c.jwks.mint()}` } });
      raw.ws.send(connectPacket({ clientId: uniqueId('drain') }));
      assert.deepEqual([...(await raw.next())], [0x20, 0x02, 0x00, 0x00]);
      const t0 = Date.now();
      const stopping = gw.stop();
      // Draining: readiness goes 503 and new upgrades are no longer accepted, the open session carries on until the
      // drain deadline (2 s here), then gets Close 1001.
      const { code } = await withTimeout(raw.closed, 40000, 'Close on drain');
      assert.equal(code, 1001);
      assert.ok(Date.now() - t0 >= 1500, `closed after ${Date.now() - t0} ms, before the 2 s drain deadline`);
      const status = await stopping;
      assert.equal(status.code, 0, `gateway exit ${JSON.stringify(status)}`);
    });
  });
});
