// ws-gateway in front of RabbitMQ 3.10 with rabbitmq_web_mqtt (path /ws, MQTT 3.1.1 only): the shared broker suite
// through a routes file (/mqtt → ws://…/ws), and the fallback upstream without a path (the client's path is forwarded).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  collect, connect, end, makeCert, rawUpgrade, startGateway, startJwks, startRabbit, stopAll, subscribe, uniqueId,
  writeRouteFile,
} from './harness.mjs';
import { brokerSuite, headerAuth } from './suite.mjs';

let c;

before(async () => {
  const [jwks, tls, broker] = await Promise.all([startJwks(), makeCert(), startRabbit()]);
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
});
