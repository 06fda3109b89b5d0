import * as h from './harness.mjs';
import { openRaw, connectPacket } from './rawws.mjs';
const jwks = await h.startJwks(); const tls = await h.makeCert(); const b = await h.startMosquitto();
const gw = await h.startGateway({jwks, tls, upstream:`ws://127.0.0.1:${b.wsPort}/ws`, origins:['http://127.0.0.1:5']});
for (const headers of [{Cookie: `session=${jwks.mint()}`}, {Cookie: `session=${jwks.mint()}`, Origin: 'http://127.0.0.1:5'}, {Authorization: `Bearer ${jwks.mint()}`}]) {
  try {
    const r = await h.rawUpgrade(gw.port, '/mqtt', {...headers, 'Sec-WebSocket-Protocol': 'mqtt'});
    console.log(Object.keys(headers), r.status);
  } catch (e) { console.log('ERR', e.message); }
}
await h.sleep(300);
console.log(gw.child.lines.slice(2).join('\n'));
await h.stopAll(); await jwks.close();
