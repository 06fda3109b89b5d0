// MQTT.js in the browser through ws-gateway. Query parameters:
//   gw     the gateway's WebSocket URL, e.g. wss://127.0.0.1:8443/mqtt (required)
//   mode   where the JWT travels: cookie (default) | subprotocol | password
//   token  the JWT for the subprotocol and password modes (a real app gets it from its login flow; in cookie mode
//          the browser sends the HttpOnly cookie by itself and the page never sees the token)
//   topic  topic to use (default: a random one); msg: the payload (default "hello from the browser")
//   v      MQTT protocol version, 4 (3.1.1, default) or 5
/* global mqtt */
(function () {
  'use strict';

  const params = new URLSearchParams(location.search);
  const gw = params.get('gw');
  const mode = params.get('mode') || 'cookie';
  const token = params.get('token') || '';
  const topic = params.get('topic') || `demo/browser-${Math.random().toString(16).slice(2, 10)}`;
  const msg = params.get('msg') || 'hello from the browser';
  const version = Number(params.get('v') || 4);

  const $ = (id) => document.getElementById(id);
  const setStatus = (text, state) => {
    $('status').textContent = text;
    $('status').dataset.state = state || 'busy';
  };
  const log = (text) => {
    const li = document.createElement('li');
    li.textContent = `${new Date().toISOString().slice(11, 23)} ${text}`;
    $('log').appendChild(li);
  };

  $('gateway').textContent = gw || '(missing ?gw=)';
  $('mode').textContent = mode;
  $('topic').textContent = topic;
  if (!gw) {
    setStatus('error:no gateway URL (?gw=wss://host:port/path)', 'error');
    return;
  }

  const options = {
    protocolVersion: version,
    clientId: `browser-${Math.random().toString(16).slice(2, 10)}`,
    clean: true,
    reconnectPeriod: 0, // fail instead of retrying forever
    connectTimeout: 10000,
    // MQTT.js asks for the subprotocol `mqtt`; this hook opens the socket itself so the page can add the token as a
    // second offered subprotocol and see the WebSocket close code (which MQTT.js does not report).
    createWebsocket(url, protocols) {
      const offered = mode === 'subprotocol' ? [...protocols, `bearer.${token}`] : protocols;
      const ws = new WebSocket(url, offered);
      ws.addEventListener('open', () => log(`websocket open, subprotocol "${ws.protocol}"`));
      ws.addEventListener('close', (e) => log(`websocket close ${e.code}${e.reason ? ` "${e.reason}"` : ''}`));
      return ws;
    },
  };
  if (mode === 'password') {
    options.username = 'browser'; // free: the gateway verifies only the password
    options.password = token;
  }

  log(`connecting to ${gw} (token in ${mode})`);
  setStatus('connecting');
  const client = mqtt.connect(gw, options);
  let received = false;

  client.on('connect', () => {
    log('CONNACK: connected');
    setStatus('connected');
    client.subscribe(topic, { qos: 1 }, (err, granted) => {
      if (err) {
        setStatus(`error:subscribe ${err.message}`, 'error');
        return;
      }
      log(`SUBACK: ${JSON.stringify(granted.map((g) => g.qos))}`);
      client.publish(topic, msg, { qos: 1 }, (perr) => {
        if (perr) setStatus(`error:publish ${perr.message}`, 'error');
        else log('PUBACK');
      });
    });
  });
  client.on('message', (t, payload) => {
    received = true;
    log(`message on ${t}: ${payload.toString()}`);
    setStatus(`received:${payload.toString()}`, 'received');
    client.end();
  });
  client.on('error', (err) => {
    // A refused CONNACK: err.code is 5 (3.1.1) or 135 = 0x87 (5), "not authorized".
    log(`error${err.code !== undefined ? ` code ${err.code}` : ''}: ${err.message}`);
    setStatus(`error:${err.code !== undefined ? `${err.code} ` : ''}${err.message}`, 'error');
  });
  client.on('close', () => {
    log('MQTT connection closed');
    if (!received && $('status').dataset.state !== 'error') setStatus('error:closed', 'error');
  });
})();
