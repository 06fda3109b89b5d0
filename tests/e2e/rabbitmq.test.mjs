// ws-gateway in front of RabbitMQ 3.10 with rabbitmq_web_mqtt (path /ws, MQTT 3.1.1 only): the shared broker suite
// through a routes file (/mqtt → ws://…/ws), and the fallback upstream without a path (the client's path is forwarded).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  AUDIENCE, NOT_AUTHORIZED_V4, collect, connect, connectExpectingFailure, end, makeCert, rawUpgrade, startGateway, startJwks, startRabbit, stopAll, subscribe, uniqueId,
  withTimeout, writeRouteFile,
} from './harness.mjs';
import { connectPacket, openRaw } from './rawws.mjs';
import { brokerSuite, headerAuth } from './suite.mjs';

let c;

before(async () => {
  const jwks = await startJwks();
  const [tls, broker] = await Promise.all([
    makeCert(),
    // The broker checks the same JWTs itself (rabbitmq_auth_backend_oauth2, the gateway's audience as its resource
    // server id) when they arrive as the MQTT CONNECT password.
    startRabbit({ oauth2: { resourceServerId: AUDIENCE, kid: jwks.kid, publicPem: jwks.publicPem } }),
  ]);
  process.stderr.write(`e2e: RabbitMQ ${broker.node} ready in ${broker.startupMs} ms\n`);
  const routeFile = writeRouteFile([
    { prefix: '/mqtt', upstream: `ws://127.0.0.1:${broker.wsPort}/ws`, copySubProtocol: true, preserveQuery: false },
  ]);
  const gw = await startGateway({
    jwks,
    tls,
    routeFile,
    // Fallback for paths no route matches; without a path, the client's path is what RabbitMQ is asked for.
    upstream: `ws://127.0.0.1:${broker.wsPort}`,
    origins: ['http://127.0.0.1:1'],
  });
  c = { jwks, tls, broker, gw, path: '/mqtt', url: gw.url('/mqtt'), mqttOpts: { protocolVersion: 4 } };
}, { timeout: 180000 });

after(async () => {
  await stopAll();
  await c?.jwks.close();
}, { timeout: 180000 });

describe('rabbitmq', () => {
  brokerSuite('rabbitmq', () => c);

  test('rabbitmq: the fallback upstream without a path forwards the client path (/ws works, /elsewhere is 502)', { timeout: 30000 }, async () => {
    const { client } = await connect(c.gw.url('/ws'), { ...headerAuth(c), clientId: uniqueId('fallback') });
    try {
      const topic = `e2e/${uniqueId('fb')}`;
      await subscribe(client, topic);
      const got = collect(client, topic, 1);
      client.publish(topic, 'via /ws');
      assert.equal((await got)[0].payload, 'via /ws');
    } finally {
      await end(client);
    }
    // RabbitMQ's Web MQTT listener serves only /ws: anything else fails upstream, which the gateway answers with 502.
    const raw = await rawUpgrade(c.gw.port, '/elsewhere', { Authorization: `Bearer ${c.jwks.mint()}`, 'Sec-WebSocket-Protocol': 'mqtt' });
    assert.equal(raw.status, 502);
  });

  describe('token in the MQTT CONNECT password, checked again by RabbitMQ\'s OAuth 2 backend', () => {
    const scopes = `${AUDIENCE}.read:*/* ${AUDIENCE}.write:*/* ${AUDIENCE}.configure:*/* ${AUDIENCE}.read:*/*/* ${AUDIENCE}.write:*/*/*`;

    test('rabbitmq: the gateway forwards the CONNECT unchanged and RabbitMQ logs the client in from the same JWT (OAuth 2 backend)', { timeout: 30000 }, async () => {
      const { client } = await connect(c.url, {
        ca: c.tls.certPem, protocolVersion: 4, clientId: uniqueId('oauth'), username: 'ignored', password: c.jwks.mint({ sub: uniqueId('oauth-user'), scope: scopes }),
      });
      try {
        const topic = `e2e/${uniqueId('oauth')}`;
        await subscribe(client, topic, { qos: 1 });
        const got = collect(client, topic, 1);
        client.publish(topic, 'via oauth2', { qos: 1 });
        // The user name "ignored" exists nowhere: only the OAuth 2 backend, from the JWT in the password, can have
        // logged this client in (the internal backend, second in the chain, would refuse it).
        assert.equal((await got)[0].payload, 'via oauth2');
      } finally {
        await end(client);
      }
    });

    test('rabbitmq: with the username taken from the token (--mqtt-username-claim sub) and the password kept, the re-encoded CONNECT still logs in through the OAuth 2 backend', { timeout: 30000 }, async () => {
      const gw = await startGateway({
        jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${c.broker.wsPort}/ws`,
        args: ['--mqtt-username-claim', 'sub', '--mqtt-password-forward', 'keep'],
      });
      // The OAuth 2 backend logs the client in from the password alone: the round trip shows the rewritten CONNECT
      // (new username, lengths recomputed) is one RabbitMQ parses, with the token still in it.
      const { client } = await connect(gw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: 4, clientId: uniqueId('kept'), username: 'ignored', password: c.jwks.mint({ sub: uniqueId('kept'), scope: scopes }),
      });
      try {
        const topic = `e2e/${uniqueId('kept')}`;
        await subscribe(client, topic, { qos: 1 });
        const got = collect(client, topic, 1);
        client.publish(topic, 'password kept', { qos: 1 });
        assert.equal((await got)[0].payload, 'password kept');
      } finally {
        await end(client);
        await gw.stop();
      }
    });

    test('rabbitmq: a JWT the gateway accepts but without RabbitMQ scopes is refused by the broker (Close 1002, no CONNACK)', { timeout: 30000 }, async () => {
      const password = c.jwks.mint({ scope: 'unrelated' });
      // MQTT.js: the connection just closes, with no CONNACK and so no error code.
      const { error, events } = await connectExpectingFailure(c.url, {
        ca: c.tls.certPem, protocolVersion: 4, clientId: uniqueId('noscope'), username: 'ignored', password,
      });
      assert.ok(events.includes('close'), JSON.stringify(events));
      assert.ok(!error || [4, NOT_AUTHORIZED_V4].includes(error.code), `${error?.message} ${JSON.stringify(events)}`);
      // On the wire: RabbitMQ 3.10's Web MQTT answers a refused login with WebSocket Close 1002 "unauthorized" and
      // no CONNACK; the gateway relays that Close unchanged.
      const raw = await openRaw(c.url, { ca: c.tls.certPem });
      raw.ws.send(connectPacket({ clientId: uniqueId('noscope'), username: 'ignored', password }));
      const closed = await withTimeout(raw.closed, 10000, 'Close from RabbitMQ');
      assert.deepEqual(closed, { code: 1002, reason: 'unauthorized' });
    });
  });
});
