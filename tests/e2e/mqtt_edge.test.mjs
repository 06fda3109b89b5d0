// The MQTT-aware edge (README "The verified identity in the MQTT CONNECT", "Topic rules at the edge", "Token refresh
// without reconnecting") with MQTT.js against Mosquitto 2.0:
// - the CONNECT username taken from the token, in the header, cookie and CONNECT-password modes, against a broker
//   that authorizes with `pattern readwrite devices/%u/#`; the client id policy;
// - topic rules enforced by the gateway in front of a broker without ACLs, MQTT 3.1.1 and 5;
// - MQTT 5 re-authentication that keeps a session past its first token's expiry.
// A watcher on the broker's plain MQTT listener sees what really reached the broker.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import mqtt from 'mqtt';

import {
  collect, connect, connectExpectingFailure, end, makeCert, sleep, startGateway, startJwks, startMosquitto, stopAll,
  subscribe, uniqueId, withTimeout,
} from './harness.mjs';

let c;

/** A plain MQTT client on the broker's own listener, subscribed to `devices/#`: every message the broker delivers. */
async function startWatcher(broker) {
  const client = mqtt.connect(`mqtt://127.0.0.1:${broker.mqttPort}`, {
    username: 'watcher', clientId: uniqueId('watcher'), reconnectPeriod: 0, protocolVersion: 4,
  });
  await withTimeout(new Promise((resolve, reject) => {
    client.once('connect', resolve);
    client.once('error', reject);
  }), 10000, 'watcher CONNACK');
  const seen = [];
  client.on('message', (topic, payload) => seen.push({ topic, payload: payload.toString() }));
  await subscribe(client, 'devices/#', { qos: 1 });
  return {
    client,
    seen,
    /** Resolves once a message on `topic` arrived. */
    waitFor: (topic, ms = 10000) => withTimeout((async () => {
      while (!seen.some((m) => m.topic === topic)) await sleep(20);
    })(), ms, `the watcher to see ${topic}`),
    saw: (topic) => seen.some((m) => m.topic === topic),
  };
}

before(async () => {
  const [jwks, tls] = await Promise.all([startJwks(), makeCert()]);
  c = { jwks, tls };
}, { timeout: 60000 });

after(async () => {
  for (const w of [c?.aclWatcher, c?.openWatcher]) if (w) await end(w.client);
  await stopAll();
  await c?.jwks.close();
}, { timeout: 120000 });

/** The SUBACK's return codes for `filters`: MQTT.js rejects a SUBACK with any refused entry, the packet is on the error. */
async function subackCodes(client, filters, opts) {
  const packet = await withTimeout(
    client.subscribeAsync(filters, opts).then((granted) => ({ granted: granted.map((g) => g.qos) }), (e) => e.packet ?? Promise.reject(e)),
    10000, 'SUBACK');
  return [...packet.granted];
}

/** MQTT.js options for a token in `mode`: the Authorization header, the `session` cookie, or the CONNECT password. */
function tokenOpts(mode, token) {
  switch (mode) {
    case 'header': return { wsOptions: { headers: { Authorization: `Bearer ${token}` } } };
    case 'cookie': return { wsOptions: { headers: { Cookie: `session=${token}` } } };
    case 'password': return { password: token };
    default: throw new Error(mode);
  }
}

describe('the verified identity in the CONNECT (Mosquitto with pattern readwrite devices/%u/#)', () => {
  before(async () => {
    // Authorizes by the CONNECT username, as deployed brokers do.
    const broker = await startMosquitto({ acl: 'user watcher\ntopic read devices/#\n\npattern readwrite devices/%u/#\n' });
    c.identityGw = await startGateway({
      jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${broker.wsPort}/ws`,
      args: ['--mqtt-username-claim', 'sub', '--mqtt-client-id-policy', 'prefix-subject'],
    });
    c.aclWatcher = await startWatcher(broker);
  }, { timeout: 60000 });

  for (const mode of ['header', 'cookie', 'password']) {
    test(`mqtt edge: alice's token with username=bob publishes only under devices/alice/ (${mode})`, { timeout: 30000 }, async () => {
      const alice = uniqueId('alice');
      const { client } = await connect(c.identityGw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: 4, clientId: `${alice}-${mode}`, username: 'bob',
        ...tokenOpts(mode, c.jwks.mint({ sub: alice })),
      });
      try {
        const bobs = `devices/bob/${uniqueId(mode)}`;
        const hers = `devices/${alice}/${mode}`;
        // In order on one connection: once hers arrived, bob's was handled before it.
        await withTimeout(client.publishAsync(bobs, 'as bob', { qos: 1 }), 10000, 'PUBACK for bob\'s topic');
        await withTimeout(client.publishAsync(hers, 'as alice', { qos: 1 }), 10000, 'PUBACK for her topic');
        await c.aclWatcher.waitFor(hers);
        assert.ok(!c.aclWatcher.saw(bobs), `the broker delivered ${bobs}: the username was not rewritten`);
      } finally {
        await end(client);
      }
    });
  }

  for (const version of [4, 5]) {
    test(`mqtt edge: a client id outside prefix-subject gets CONNACK client identifier not valid (MQTT ${version === 4 ? '3.1.1' : '5'})`, { timeout: 30000 }, async () => {
      const alice = uniqueId('alice');
      const { error, events } = await connectExpectingFailure(c.identityGw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: version, clientId: 'victim-device', ...tokenOpts('header', c.jwks.mint({ sub: alice })),
      });
      assert.ok(error, JSON.stringify(events));
      assert.equal(error.code, version === 4 ? 2 : 0x85, `${error.message} ${JSON.stringify(events)}`);
      // Her own device ids pass.
      const { client } = await connect(c.identityGw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: version, clientId: `${alice}-phone`, ...tokenOpts('header', c.jwks.mint({ sub: alice })),
      });
      await end(client);
    });
  }
});

describe('topic rules at the edge (a broker without ACLs)', () => {
  before(async () => {
    // No ACLs at all: only the gateway's topic rules stand between a client and any topic.
    const broker = await startMosquitto();
    c.aclGw = await startGateway({
      jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${broker.wsPort}/ws`,
      args: ['--mqtt-publish-acl', 'devices/{sub}/#', '--mqtt-subscribe-acl', 'devices/{sub}/#'],
    });
    c.openWatcher = await startWatcher(broker);
  }, { timeout: 60000 });

  for (const version of [4, 5]) {
    const v = version === 4 ? '3.1.1' : '5';

    test(`mqtt edge: a publish outside devices/{sub}/# is dropped and the session stays up (MQTT ${v})`, { timeout: 30000 }, async () => {
      const alice = uniqueId('alice');
      const { client } = await connect(c.aclGw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: version, clientId: `${alice}-v${version}`,
        ...tokenOpts('header', c.jwks.mint({ sub: alice })),
      });
      try {
        const bobs = `devices/bob/${uniqueId('v' + version)}`;
        const hers = `devices/${alice}/t`;
        client.publish(bobs, 'qos0 to bob', { qos: 0 });
        // QoS 1: the gateway acknowledges the dropped publish itself (MQTT 5: PUBACK 0x87, which MQTT.js reports as an
        // error; 3.1.1 has no negative ack).
        const acked = await withTimeout(client.publishAsync(bobs, 'qos1 to bob', { qos: 1 }).then(() => null, (e) => e), 10000, 'PUBACK for the dropped publish');
        if (version === 5) {
          assert.ok(acked, 'MQTT 5: the dropped QoS 1 publish was acknowledged as a success');
          assert.equal(acked.code, 0x87, acked.message);
        } else {
          assert.equal(acked, null);
        }
        await withTimeout(client.publishAsync(hers, 'hers', { qos: 1 }), 10000, 'PUBACK for her topic');
        await c.openWatcher.waitFor(hers);
        assert.ok(!c.openWatcher.saw(bobs), `the broker got ${bobs}`);
        assert.ok(client.connected, 'the session ended after a dropped publish');
      } finally {
        await end(client);
      }
    });

    test(`mqtt edge: a SUBSCRIBE with an allowed and a denied filter gets the denied entry refused, the other granted (MQTT ${v})`, { timeout: 30000 }, async () => {
      const alice = uniqueId('alice');
      const { client } = await connect(c.aclGw.url('/mqtt'), {
        ca: c.tls.certPem, protocolVersion: version, clientId: `${alice}-sub${version}`,
        ...tokenOpts('header', c.jwks.mint({ sub: alice })),
      });
      try {
        const codes = await subackCodes(client, [`devices/${alice}/#`, 'devices/+/secret'], { qos: 1 });
        assert.deepEqual(codes, [1, version === 4 ? 0x80 : 0x87]);
        // The allowed filter really reached the broker: a message from outside the gateway arrives.
        const got = collect(client, `devices/${alice}/x`, 1);
        c.openWatcher.client.publish(`devices/${alice}/x`, 'for alice', { qos: 1 });
        assert.equal((await got)[0].payload, 'for alice');
      } finally {
        await end(client);
      }
    });
  }

  test('mqtt edge: a subject holding MQTT wildcards cannot widen devices/{sub}/#', { timeout: 30000 }, async () => {
    const { client } = await connect(c.aclGw.url('/mqtt'), {
      ca: c.tls.certPem, protocolVersion: 4, clientId: uniqueId('wild'), ...tokenOpts('header', c.jwks.mint({ sub: '#' })),
    });
    try {
      const bobs = `devices/bob/${uniqueId('wild')}`;
      await withTimeout(client.publishAsync(bobs, 'wildcard subject', { qos: 1 }), 10000, 'PUBACK');
      assert.deepEqual(await subackCodes(client, 'devices/#', { qos: 0 }), [0x80]);
      // A marker through another client shows the broker has handled everything sent before it.
      const marker = `devices/marker/${uniqueId('m')}`;
      c.openWatcher.client.publish(marker, 'm', { qos: 1 });
      await c.openWatcher.waitFor(marker);
      await sleep(200);
      assert.ok(!c.openWatcher.saw(bobs), `the broker got ${bobs} from a subject "#"`);
    } finally {
      await end(client);
    }
  });
});

describe('MQTT 5 re-authentication', () => {
  before(async () => {
    const broker = await startMosquitto();
    c.reauthGw = await startGateway({
      jwks: c.jwks, tls: c.tls, upstream: `ws://127.0.0.1:${broker.wsPort}/ws`, args: ['--jwt-leeway-seconds', '0'],
    });
  }, { timeout: 60000 });

  const reauth = (client, token) => client._sendPacket({
    cmd: 'auth', reasonCode: 0x19, properties: { authenticationMethod: 'jwt', authenticationData: Buffer.from(token) },
  });

  test('mqtt edge: an AUTH with a fresh token keeps the session past the first token\'s expiry', { timeout: 30000 }, async () => {
    const sub = uniqueId('refresh');
    const now = Math.floor(Date.now() / 1000);
    const { client } = await connect(c.reauthGw.url('/mqtt'), {
      ca: c.tls.certPem, protocolVersion: 5, clientId: `${sub}-1`, properties: { authenticationMethod: 'jwt' },
      ...tokenOpts('header', c.jwks.mint({ sub, exp: now + 3 })),
    });
    try {
      const answered = new Promise((resolve) => client.handleAuth = (packet, cb) => { resolve(packet); cb(); });
      reauth(client, c.jwks.mint({ sub, exp: now + 600 }));
      const packet = await withTimeout(answered, 5000, 'AUTH answer from the gateway');
      assert.equal(packet.reasonCode, 0);
      await sleep(Math.max(0, (now + 4) * 1000 - Date.now()));
      assert.ok(client.connected, 'the session ended at the first token\'s expiry');
      const topic = `devices/${sub}/after`;
      await subscribe(client, topic, { qos: 1 });
      const got = collect(client, topic, 1);
      await withTimeout(client.publishAsync(topic, 'still here', { qos: 1 }), 10000, 'PUBACK after the first expiry');
      assert.equal((await got)[0].payload, 'still here');
    } finally {
      await end(client);
    }
  });

  test('mqtt edge: a refresh with another subject\'s token gets DISCONNECT not authorized (0x87) and Close', { timeout: 30000 }, async () => {
    const sub = uniqueId('refresh');
    const { client } = await connect(c.reauthGw.url('/mqtt'), {
      ca: c.tls.certPem, protocolVersion: 5, clientId: `${sub}-2`, properties: { authenticationMethod: 'jwt' },
      ...tokenOpts('header', c.jwks.mint({ sub })),
    });
    try {
      const disconnect = new Promise((resolve) => client.once('disconnect', resolve));
      const closed = new Promise((resolve) => client.once('close', resolve));
      reauth(client, c.jwks.mint({ sub: 'mallory' }));
      const packet = await withTimeout(disconnect, 5000, 'DISCONNECT from the gateway');
      assert.equal(packet.reasonCode, 0x87);
      await withTimeout(closed, 5000, 'the connection to close');
    } finally {
      client.end(true);
    }
  });
});
