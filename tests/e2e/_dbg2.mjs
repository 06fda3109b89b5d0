import * as h from './harness.mjs';
import { chromium } from 'playwright-core';
import http from 'node:http';
import net from 'node:net';
// A bare TCP server that prints the WebSocket upgrade request head.
const heads = [];
const tcp = net.createServer(s => { s.once('data', d => { heads.push(d.toString().split('\r\n').filter(l => /^(GET|Cookie|Origin)/i.test(l)).map(l=>l.slice(0,60)).join(' | ')); s.destroy(); }); });
await new Promise(r => tcp.listen(0, '127.0.0.1', r));
const tport = tcp.address().port;
const srv = http.createServer((q, r) => { r.writeHead(200, {'content-type':'text/html'}); r.end('<html><body>x</body></html>'); });
await new Promise(r => srv.listen(0, '127.0.0.1', r));
const pport = srv.address().port;
const persistent = process.env.P === '1';
const args = ['--no-sandbox','--disable-gpu','--disable-quic','--no-first-run','--disable-background-networking','--disable-component-update','--disable-sync'];
let ctx, browser;
if (persistent) ctx = await chromium.launchPersistentContext(h.makeTempDir('ud'), {executablePath:'/usr/bin/chromium', args});
else { browser = await chromium.launch({executablePath:'/usr/bin/chromium', args}); ctx = await browser.newContext(); }
await ctx.addCookies([{name:'session', value:'abc', url:`http://127.0.0.1:${tport}`, sameSite: process.env.SS || 'Lax'}]);
const page = await ctx.newPage();
await page.goto(`http://127.0.0.1:${pport}/`);
const res = await page.evaluate((u) => new Promise(res => { const w = new WebSocket(u, ['mqtt']); w.onopen = () => { res('open'); w.close(); }; w.onclose = e => res('close ' + e.code); }), `ws://127.0.0.1:${tport}/mqtt`);
console.log(res, heads);
await ctx.close(); await browser?.close(); tcp.close(); srv.close();
