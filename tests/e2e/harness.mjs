// Shared pieces of the end-to-end tests: a JWKS server and token minter, a throwaway TLS certificate, the gateway
// binary, Mosquitto and RabbitMQ (web_mqtt) brokers on private loopback ports, and small MQTT.js helpers.
//
// Every wait has a timeout, and every process started here is registered in `children` so that `stopAll()` (called
// from the test files' `after()` hooks) ends it even when a test failed half-way.

import { spawn, execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import mqtt from 'mqtt';

const execFileP = promisify(execFile);

export const E2E_DIR = path.dirname(fileURLToPath(import.meta.url));
export const REPO_ROOT = path.resolve(E2E_DIR, '..', '..');
export const GATEWAY_BIN = path.resolve(REPO_ROOT, process.env.WS_GATEWAY_BIN || 'target/debug/ws-gateway');
/** Set E2E_VERBOSE=1 to echo the gateway's and brokers' output. */
const VERBOSE = process.env.E2E_VERBOSE === '1';

// ---------------------------------------------------------------------------------------------------------------
// Small utilities

/** Rejects with a message naming `what` when `promise` has not settled within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${typeof what === 'function' ? what() : what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP port that was free on 127.0.0.1 a moment ago (bind to 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Distinct free ports (the probe can hand back the same port twice once it was released). */
export async function freePorts(n) {
  const ports = new Set();
  while (ports.size < n) ports.add(await freePort());
  return [...ports];
}

/** Resolves when a TCP connect to host:port succeeds; polls until `ms` has passed. */
export async function waitForPort(port, ms, what, host = '127.0.0.1', isAlive = () => true) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect({ host, port });
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
      s.setTimeout(1000, () => { s.destroy(); resolve(false); });
    });
    if (ok) return;
    if (!isAlive()) throw new Error(`${what} exited before listening on ${host}:${port}`);
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} on ${host}:${port}`);
    await sleep(100);
  }
}

/** Temp dirs made by this process, removed by `stopAll()` unless E2E_KEEP_TMP=1 (or made with keep). */
const tempDirs = [];

export function makeTempDir(prefix, { keep = false } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `ws-gateway-e2e-${prefix}-`));
  if (!keep) tempDirs.push(dir);
  return dir;
}

export function uniqueId(prefix = 'e2e') {
  return `${prefix}-${crypto.randomBytes(4).toString('hex')}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Child processes

/** Every process we started and have not seen exit. */
const children = new Set();

/**
 * Spawns `cmd` in its own process group, collects its output lines, and registers it for `stopAll()`.
 * Returns { proc, lines, exited (promise of {code, signal}), onLine(fn) }.
 */
export function startProcess(name, cmd, args, opts = {}) {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true, ...opts });
  const lines = [];
  const listeners = [];
  const child = { name, proc, lines, alive: true, stop: null };
  child.exited = new Promise((resolve) => {
    proc.once('exit', (code, signal) => {
      child.alive = false;
      children.delete(child);
      resolve({ code, signal });
    });
    proc.once('error', (err) => {
      child.alive = false;
      children.delete(child);
      lines.push(`[spawn error] ${err.message}`);
      resolve({ code: null, signal: null, error: err });
    });
  });
  for (const stream of [proc.stdout, proc.stderr]) {
    let buf = '';
    stream.setEncoding('utf8');
    stream.on('data', (chunk) => {
      buf += chunk;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        lines.push(line);
        if (VERBOSE) process.stderr.write(`[${name}] ${line}\n`);
        for (const fn of listeners) fn(line);
      }
    });
  }
  child.onLine = (fn) => listeners.push(fn);
  children.add(child);
  return child;
}

/** Signals the process group of `child` (falls back to the process itself). */
function signalChild(child, sig) {
  if (!child.alive) return;
  try {
    process.kill(-child.proc.pid, sig);
  } catch {
    try { child.proc.kill(sig); } catch { /* already gone */ }
  }
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves with the exit status. */
export async function terminate(child, graceMs = 10000) {
  if (!child.alive) return child.exited;
  signalChild(child, 'SIGTERM');
  try {
    return await withTimeout(child.exited, graceMs, `${child.name} to exit after SIGTERM`);
  } catch {
    signalChild(child, 'SIGKILL');
    return withTimeout(child.exited, 5000, `${child.name} to exit after SIGKILL`);
  }
}

/** Stops every process still registered: their own stop() first (brokers), then SIGTERM/SIGKILL. */
export async function stopAll() {
  const list = [...children].reverse();
  for (const child of list) {
    try {
      if (child.stop) await child.stop();
      else await terminate(child);
    } catch (err) {
      process.stderr.write(`e2e: stopping ${child.name}: ${err.message}\n`);
      signalChild(child, 'SIGKILL');
    }
  }
  if (process.env.E2E_KEEP_TMP !== '1') {
    for (const dir of tempDirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
  }
}

// Last resort if the test process itself is torn down.
process.once('exit', () => {
  for (const child of children) signalChild(child, 'SIGKILL');
});

/** The last `n` output lines of a child, for assertion messages. */
export function tail(child, n = 30) {
  return child.lines.slice(-n).join('\n');
}

// ---------------------------------------------------------------------------------------------------------------
// JWKS server and tokens

export const ISSUER = 'https://issuer.e2e.test/';
export const AUDIENCE = 'ws-gateway-e2e';

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/**
 * Generates an RSA key pair, serves its public half as a JWKS on 127.0.0.1:0 and returns
 * { url, kid, mint(claims?, opts?), close() }. `mint` signs RS256 tokens; `opts.key`/`opts.kid` sign with another key.
 */
export async function startJwks() {
  const { publicKey, privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = uniqueId('kid');
  const jwk = { ...publicKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' };
  const body = JSON.stringify({ keys: [jwk] });
  let hits = 0;
  const server = http.createServer((req, res) => {
    if (req.url === '/jwks.json') {
      hits += 1;
      res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'max-age=300' });
      res.end(body);
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();

  function mint(claims = {}, opts = {}) {
    const now = Math.floor(Date.now() / 1000);
    const header = { alg: 'RS256', typ: 'JWT', kid: opts.kid ?? kid };
    const payload = { iss: ISSUER, aud: AUDIENCE, sub: 'e2e-user', iat: now, exp: now + 600, ...claims };
    const signingInput = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(payload))}`;
    const sig = crypto.sign('sha256', Buffer.from(signingInput), opts.key ?? privateKey);
    return `${signingInput}.${b64url(sig)}`;
  }

  return {
    url: `http://127.0.0.1:${port}/jwks.json`,
    kid,
    /** The public key as SPKI PEM (for brokers configured with static signing keys). */
    publicPem: publicKey.export({ type: 'spki', format: 'pem' }),
    mint,
    /** A token signed by a key that is not in the JWKS (same kid): a bad signature. */
    mintForged(claims = {}) {
      const other = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
      return mint(claims, { key: other });
    },
    hits: () => hits,
    close: () => new Promise((resolve) => { server.closeAllConnections?.(); server.close(() => resolve()); }),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// TLS certificate

/** The load generator next to the gateway binary: it makes the test certificates (`ws-loadgen pki`). */
export const LOADGEN_BIN = path.resolve(
  process.env.WS_LOADGEN_BIN || path.join(path.dirname(GATEWAY_BIN), 'ws-loadgen'));

/** A self-signed P-256 certificate for localhost and 127.0.0.1: { dir, cert, key, certPem }. */
export async function makeCert() {
  const dir = makeTempDir('tls');
  if (!fs.existsSync(LOADGEN_BIN)) {
    throw new Error(`load generator ${LOADGEN_BIN} not found: build it (cargo build --workspace) or set WS_LOADGEN_BIN`);
  }
  await withTimeout(execFileP(LOADGEN_BIN, ['pki', '--out', dir, '--self-signed', '--jwt', 'none']),
    20000, 'ws-loadgen pki');
  const cert = path.join(dir, 'server.pem');
  const key = path.join(dir, 'server.key');
  return { dir, cert, key, certPem: fs.readFileSync(cert, 'utf8') };
}

// ---------------------------------------------------------------------------------------------------------------
// The gateway

/**
 * Starts the gateway on 127.0.0.1:0 (listener and admin), waits for its `started` line and for /readyz to answer 200.
 * opts: { jwks, tls, upstream, origins: [..], routeFile, env, args }.
 * Returns { child, port, admin, url(host, path), events(), stop() }.
 */
export async function startGateway(opts) {
  if (!fs.existsSync(GATEWAY_BIN)) {
    throw new Error(`gateway binary ${GATEWAY_BIN} not found: build it (cargo build) or set WS_GATEWAY_BIN`);
  }
  const args = [
    '--listen', '127.0.0.1:0',
    '--admin-listen', '127.0.0.1:0',
    '--tls-cert', opts.tls.cert,
    '--tls-key', opts.tls.key,
    '--jwks-url', opts.jwks.url,
    '--jwt-expected-issuer', ISSUER,
    '--jwt-expected-audience', AUDIENCE,
  ];
  if (opts.upstream) args.push('--upstream-ws-url', opts.upstream);
  if (opts.routeFile) args.push('--route-file', opts.routeFile);
  if (opts.origins?.length) args.push('--ws-allowed-origins', opts.origins.join(','));
  args.push(...(opts.args ?? []));

  const env = { ...process.env, ...(opts.env ?? {}) };
  // The gateway reads settings from the environment too: keep an outer shell's values from leaking in.
  for (const k of ['LISTEN_ADDR', 'ADMIN_LISTEN_ADDR', 'UPSTREAM_WS_URL', 'ROUTE_FILE', 'WS_ALLOWED_ORIGINS',
    'JWT_COOKIE_NAME', 'JWT_QUERY_PARAM', 'MQTT_CONNECT_AUTH', 'WS_GATEWAY_CONFIG']) {
    if (!(opts.env && k in opts.env)) delete env[k];
  }
  env.RUST_LOG ??= 'info';

  const child = startProcess('gateway', GATEWAY_BIN, args, { env, cwd: REPO_ROOT });
  const started = await withTimeout(new Promise((resolve, reject) => {
    const check = (line) => {
      try {
        const ev = JSON.parse(line);
        if (ev.event === 'started') resolve(ev);
      } catch { /* not JSON */ }
    };
    child.lines.forEach(check);
    child.onLine(check);
    child.exited.then(({ code, signal }) => reject(new Error(`gateway exited (${code ?? signal}) before starting:\n${tail(child)}`)));
  }), 15000, 'gateway "started" log line').catch((err) => { throw new Error(`${err.message}\n${tail(child)}`); });

  const port = Number(String(started.listen).split(':').pop());
  const admin = started.admin;
  if (!port) throw new Error(`gateway "started" line has no usable listen port: ${JSON.stringify(started)}`);

  // Readiness: /readyz answers 200 once the JWKS is loaded.
  const deadline = Date.now() + 15000;
  for (;;) {
    const status = await httpStatus(`http://${admin}/readyz`).catch(() => 0);
    if (status === 200) break;
    if (!child.alive) throw new Error(`gateway exited while waiting for /readyz:\n${tail(child)}`);
    if (Date.now() > deadline) throw new Error(`gateway /readyz not 200 after 15 s (last ${status}):\n${tail(child)}`);
    await sleep(100);
  }

  const gw = {
    child,
    port,
    admin,
    /** wss:// URL of the gateway for `host` (localhost or 127.0.0.1) and `path`. */
    url: (p = '/mqtt', host = 'localhost') => `wss://${host}:${port}${p}`,
    /** The JSON log lines parsed so far. */
    events: () => child.lines.flatMap((l) => { try { return [JSON.parse(l)]; } catch { return []; } }),
    /** SIGTERM (the gateway drains), then the exit status. */
    stop: () => terminate(child, 40000),
  };
  child.stop = gw.stop;
  return gw;
}

/** Status code of a plain GET, with a 5 s timeout. */
export function httpStatus(url) {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: 5000 }, (res) => { res.resume(); resolve(res.statusCode); });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', reject);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Mosquitto

/**
 * Starts Mosquitto 2.0 with a WebSocket listener and a plain MQTT listener on private loopback ports.
 * With `acl` (the text of a Mosquitto ACL file), the broker authorizes by it: `%u` patterns use the CONNECT username.
 * Returns { wsPort, mqttPort, child, stop() }.
 */
export async function startMosquitto({ acl } = {}) {
  const bin = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto'].find((p) => fs.existsSync(p));
  if (!bin) throw new Error('mosquitto is not installed (scripts/e2e.sh installs it)');
  const dir = makeTempDir('mosquitto');
  fs.chmodSync(dir, 0o755);
  const [wsPort, mqttPort] = await freePorts(2);
  const conf = path.join(dir, 'mosquitto.conf');
  const aclLines = [];
  if (acl !== undefined) {
    const aclFile = path.join(dir, 'acl');
    fs.writeFileSync(aclFile, acl);
    aclLines.push(`acl_file ${aclFile}`);
  }
  fs.writeFileSync(conf, [
    // Stay root (no TLS files to read as another user) and keep nothing on disk.
    'user root',
    'persistence false',
    'log_dest stdout',
    'log_type error',
    'log_type warning',
    'log_type notice',
    'log_type information',
    'connection_messages true',
    'per_listener_settings false',
    'allow_anonymous true',
    ...aclLines,
    `listener ${mqttPort} 127.0.0.1`,
    'protocol mqtt',
    // Without socket_domain ipv4, 2.0.11 ignores the address of a websockets listener and binds every interface.
    `listener ${wsPort} 127.0.0.1`,
    'protocol websockets',
    'socket_domain ipv4',
    '',
  ].join('\n'));
  const child = startProcess('mosquitto', bin, ['-c', conf]);
  await waitForPort(wsPort, 15000, 'mosquitto websockets listener', '127.0.0.1', () => child.alive)
    .catch((err) => { throw new Error(`${err.message}\n${tail(child)}`); });
  await waitForPort(mqttPort, 5000, 'mosquitto mqtt listener', '127.0.0.1', () => child.alive);
  child.stop = () => terminate(child, 10000);
  return { wsPort, mqttPort, child, dir, stop: child.stop };
}

// ---------------------------------------------------------------------------------------------------------------
// RabbitMQ with rabbitmq_web_mqtt

const RABBIT_BIN = '/usr/lib/rabbitmq/bin';

/**
 * Starts a private RabbitMQ 3.10 node (temp HOME, data and logs; epmd, AMQP, distribution, MQTT and Web MQTT on
 * private loopback ports) with rabbitmq_web_mqtt enabled. Web MQTT serves path /ws, MQTT 3.1.1 only.
 * With `oauth2: { resourceServerId, kid, publicPem }` it also enables rabbitmq_auth_backend_oauth2 as the first
 * authentication backend (the internal one second, so anonymous MQTT clients still log in as guest): an MQTT CONNECT
 * whose password is a JWT signed by that key, with `aud` = resourceServerId and scopes `<id>.read:*\/*` etc., logs in
 * as the token's subject.
 * Returns { wsPort, mqttPort, child, env, startupMs, stop() }.
 */
export async function startRabbit({ oauth2 } = {}) {
  if (!fs.existsSync(path.join(RABBIT_BIN, 'rabbitmq-server'))) {
    throw new Error('rabbitmq-server is not installed (scripts/e2e.sh installs it)');
  }
  const t0 = Date.now();
  const dir = makeTempDir('rabbitmq');
  const [epmdPort, amqpPort, distPort, mqttPort, wsPort] = await freePorts(5);
  const node = `${uniqueId('e2e')}@localhost`;
  const conf = path.join(dir, 'rabbitmq.conf');
  fs.writeFileSync(conf, [
    `listeners.tcp.default = 127.0.0.1:${amqpPort}`,
    `mqtt.listeners.tcp.default = 127.0.0.1:${mqttPort}`,
    'mqtt.allow_anonymous = true',
    `web_mqtt.tcp.ip = 127.0.0.1`,
    `web_mqtt.tcp.port = ${wsPort}`,
    'loopback_users = none',
    'log.console = true',
    'log.console.level = info',
    'log.file = false',
    ...(oauth2 ? [
      'auth_backends.1 = rabbit_auth_backend_oauth2',
      'auth_backends.2 = rabbit_auth_backend_internal',
      `auth_oauth2.resource_server_id = ${oauth2.resourceServerId}`,
      `auth_oauth2.signing_keys.${oauth2.kid} = ${path.join(dir, 'oauth2-signing-key.pem')}`,
      `auth_oauth2.default_key = ${oauth2.kid}`,
    ] : []),
    '',
  ].join('\n'));
  if (oauth2) fs.writeFileSync(path.join(dir, 'oauth2-signing-key.pem'), oauth2.publicPem);
  const env = {
    ...process.env,
    HOME: dir,
    RABBITMQ_NODENAME: node,
    RABBITMQ_CONFIG_FILE: conf,
    RABBITMQ_ENABLED_PLUGINS_FILE: path.join(dir, 'enabled_plugins'),
    RABBITMQ_MNESIA_BASE: path.join(dir, 'mnesia'),
    RABBITMQ_LOG_BASE: path.join(dir, 'log'),
    RABBITMQ_DIST_PORT: String(distPort),
    ERL_EPMD_ADDRESS: '127.0.0.1',
    ERL_EPMD_PORT: String(epmdPort),
  };
  delete env.RABBITMQ_CONF_ENV_FILE;
  // Our own epmd, in the foreground as a child of this process (erl would otherwise daemonize one that nobody
  // reaps): loopback only, on a private port, so a system epmd on 4369 neither matters nor gets touched.
  const epmd = startProcess('epmd', 'epmd', ['-port', String(epmdPort), '-address', '127.0.0.1']);
  await waitForPort(epmdPort, 10000, 'epmd', '127.0.0.1', () => epmd.alive);
  const plugins = ['rabbitmq_web_mqtt', ...(oauth2 ? ['rabbitmq_auth_backend_oauth2'] : [])];
  await withTimeout(execFileP(path.join(RABBIT_BIN, 'rabbitmq-plugins'), ['--offline', 'enable', ...plugins],
    { env }), 60000, `rabbitmq-plugins enable ${plugins.join(' ')}`);

  const child = startProcess('rabbitmq', path.join(RABBIT_BIN, 'rabbitmq-server'), [], { env, cwd: dir });
  let stopped = false;
  const stop = async () => {
    if (stopped) return child.exited;
    stopped = true;
    if (child.alive) {
      await withTimeout(execFileP(path.join(RABBIT_BIN, 'rabbitmqctl'), ['stop'], { env }), 60000, 'rabbitmqctl stop')
        .catch((err) => process.stderr.write(`e2e: rabbitmqctl stop: ${err.message}\n`));
      await withTimeout(child.exited, 30000, 'rabbitmq to exit').catch(() => terminate(child, 10000));
    }
    // Our private epmd (on epmdPort) outlives the node: `epmd -kill` asks it to exit, SIGTERM if it does not.
    await withTimeout(execFileP('epmd', ['-kill'], { env }), 10000, 'epmd -kill').catch(() => {});
    await withTimeout(epmd.exited, 5000, 'epmd to exit').catch(() => terminate(epmd, 5000));
    return child.exited;
  };
  child.stop = stop;
  try {
    await waitForPort(wsPort, 120000, 'rabbitmq web_mqtt listener', '127.0.0.1', () => child.alive);
  } catch (err) {
    await stop().catch(() => {});
    throw new Error(`${err.message}\n${tail(child, 60)}`);
  }
  return { wsPort, mqttPort, amqpPort, child, env, dir, node, startupMs: Date.now() - t0, stop };
}

// ---------------------------------------------------------------------------------------------------------------
// Routes file

export function writeRouteFile(routes) {
  const dir = makeTempDir('routes');
  const file = path.join(dir, 'routes.yaml');
  const yaml = routes.map((r) => [
    `- prefix: ${r.prefix}`,
    `  upstream: ${r.upstream}`,
    `  copySubProtocol: ${r.copySubProtocol ?? true}`,
    `  preserveQuery: ${r.preserveQuery ?? false}`,
  ].join('\n')).join('\n') + '\n';
  fs.writeFileSync(file, yaml);
  return file;
}

// ---------------------------------------------------------------------------------------------------------------
// MQTT.js helpers

/**
 * Connects an MQTT.js client and resolves on CONNACK success; rejects on 'error', on a close before CONNACK, or after
 * `ms`. The client never reconnects by itself (reconnectPeriod 0).
 */
export function connect(url, opts = {}, ms = 15000) {
  const client = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: ms, clean: true, ...opts });
  let streamError = null;
  client.stream?.on?.('error', (err) => { streamError ??= err; });
  const ready = new Promise((resolve, reject) => {
    const onConnect = (connack) => { cleanup(); resolve({ client, connack }); };
    const onError = (err) => { cleanup(); client.end(true); reject(err); };
    const onClose = () => {
      cleanup();
      client.end(true);
      reject(new Error(`connection closed before CONNACK${streamError ? ` (${streamError.message})` : ''}`));
    };
    const cleanup = () => {
      client.off('connect', onConnect);
      client.off('error', onError);
      client.off('close', onClose);
    };
    client.once('connect', onConnect);
    client.once('error', onError);
    client.once('close', onClose);
  });
  return withTimeout(ready, ms + 1000, `MQTT connect to ${url}`).catch((err) => {
    client.end(true);
    throw err;
  });
}

/** Like `connect`, but resolves with what failed: { error?, closedBeforeConnack, events }. Never resolves on success. */
export function connectExpectingFailure(url, opts = {}, ms = 15000) {
  const client = mqtt.connect(url, { reconnectPeriod: 0, connectTimeout: ms, clean: true, ...opts });
  const events = [];
  let streamError = null;
  return withTimeout(new Promise((resolve, reject) => {
    // MQTT.js does not re-emit every transport error (an HTTP 401/403 answer to the upgrade only closes the client),
    // so listen on its stream too.
    client.stream?.on?.('error', (err) => { streamError ??= err; events.push(`stream-error:${err.message}`); });
    client.on('connect', () => { client.end(true); reject(new Error('connected, but the connection was expected to be refused')); });
    client.on('error', (error) => {
      events.push(`error:${error.code ?? ''}:${error.message}`);
      client.end(true);
      resolve({ error, streamError, events });
    });
    client.on('close', () => {
      events.push('close');
      setTimeout(() => { client.end(true); resolve({ error: streamError, streamError, events }); }, 200);
    });
  }), ms + 1000, `MQTT connect to ${url} to fail`);
}

/** Subscribes and resolves with the SUBACK grants. */
export function subscribe(client, topic, opts = { qos: 0 }) {
  return withTimeout(client.subscribeAsync(topic, opts), 10000, `SUBSCRIBE ${topic}`);
}

/** Collects `count` messages on `topic` (in arrival order), with a timeout. */
export function collect(client, topic, count, ms = 15000) {
  const got = [];
  return withTimeout(new Promise((resolve) => {
    const onMessage = (t, payload, packet) => {
      if (t !== topic) return;
      got.push({ payload: payload.toString(), packet });
      if (got.length >= count) {
        client.off('message', onMessage);
        resolve(got);
      }
    };
    client.on('message', onMessage);
  }), ms, () => `${count} messages on ${topic} (got ${got.length})`);
}

/** Resolves when `client` emits `event`. */
export function once(emitter, event, ms, what) {
  return withTimeout(new Promise((resolve) => emitter.once(event, (...a) => resolve(a))), ms, what ?? `event ${event}`);
}

/** Ends a client cleanly, with a timeout; never throws. */
export async function end(client) {
  if (!client) return;
  await withTimeout(client.endAsync(), 5000, 'client end').catch(() => client.end(true));
}

/** MQTT.js reports a refused CONNACK as an error with `code` = the return code (3.1.1) or reason code (5). */
export const NOT_AUTHORIZED_V4 = 5;
export const NOT_AUTHORIZED_V5 = 0x87;

/**
 * A raw WebSocket upgrade over TLS (no MQTT): resolves with { status, headers } of the gateway's answer.
 * `headers` are sent as given; the Origin is only sent when listed.
 */
export async function rawUpgrade(port, pathname, headers = {}, host = 'localhost') {
  const https = await import('node:https');
  return withTimeout(new Promise((resolve, reject) => {
    const req = https.request({
      host: '127.0.0.1',
      servername: host === '127.0.0.1' ? undefined : host,
      port,
      path: pathname,
      method: 'GET',
      rejectUnauthorized: false,
      headers: {
        Host: `${host}:${port}`,
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': crypto.randomBytes(16).toString('base64'),
        ...headers,
      },
    });
    req.on('upgrade', (res, socket) => { socket.destroy(); resolve({ status: res.statusCode, headers: res.headers }); });
    req.on('response', (res) => { res.resume(); resolve({ status: res.statusCode, headers: res.headers }); });
    req.on('error', reject);
    req.end();
  }), 10000, `raw upgrade ${pathname}`);
}
