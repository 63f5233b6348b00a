// mux.fetch over HTTP (src/fetch.js `transport`): `'http'` always posts to the gateway's own
// `/v1/chat/completions` with the Mux's token; `'auto'` does so only while the socket cannot
// connect at all. The gateway here is a node:http server on loopback that records what it got;
// the real gateway's endpoint is in ../e2e/http.test.js.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import http from 'node:http'
import OpenAI6 from 'openai6'
import { createFetch } from '../src/fetch.js'
import { closeAll, FakeGateway, fakeTabs, scriptedMux, until } from './fakes.js'

const SSE = 'data: {"id":"chatcmpl-h:1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"over http"},"finish_reason":null}]}\n\n' +
  'data: {"id":"chatcmpl-h:1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' +
  'data: [DONE]\n\n'

/** Every request the fake endpoint got: method, url, headers, body; `closed` once its client hung up. */
const seen = []
let server
let base

before(async () => {
  server = http.createServer((req, res) => {
    let body = ''
    req.on('data', c => { body += c })
    req.on('end', () => {
      const record = { method: req.method, url: req.url, headers: req.headers, body, closed: false }
      seen.push(record)
      res.on('close', () => { record.closed = !res.writableFinished })
      res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'x-request-id': 'h:1' })
      if (JSON.parse(body).messages[0].content === 'hang') {
        res.write(SSE.split('\n\n')[0] + '\n\n')
        return
      }
      res.end(SSE)
    })
  })
  await new Promise(resolve => server.listen(0, '127.0.0.1', resolve))
  base = `127.0.0.1:${server.address().port}`
})
after(() => server.close())

const body = (content = 'hi') => JSON.stringify({ model: 'm', messages: [{ role: 'user', content }], stream: true })
const post = (fetchFn, content, init = {}) =>
  fetchFn('https://app.example/v1/chat/completions', { method: 'POST', headers: { authorization: 'Bearer sdk-placeholder', 'x-stainless-os': 'Linux' }, body: body(content), ...init })

test('transport http: the gateway endpoint beside the socket, the Mux token, the body as is', async () => {
  const gw = new FakeGateway()
  gw.refuse = true
  const [tab] = fakeTabs(1, { gw, shared: false, url: `ws://${base}/v1/ws`, token: async () => 'jwt-from-source' })
  try {
    seen.length = 0
    const res = await post(tab.mux.createFetch({ transport: 'http' }), 'hi')
    assert.equal(res.status, 200)
    assert.equal(res.headers.get('x-request-id'), 'h:1')
    assert.equal(await res.text(), SSE)
    assert.equal(seen.length, 1)
    const [r] = seen
    assert.equal(r.method, 'POST')
    assert.equal(r.url, '/v1/chat/completions')
    assert.equal(r.headers.authorization, 'Bearer jwt-from-source')
    assert.equal(r.headers['x-stainless-os'], 'Linux')
    assert.equal(r.headers['content-type'], 'application/json')
    assert.equal(r.body, body('hi'))
    // Not a chat completion: the fallback or the 404, as over the socket.
    const other = await tab.mux.createFetch({ transport: 'http' })('https://app.example/v1/models')
    assert.equal(other.status, 404)
    assert.equal(seen.length, 1)
  } finally {
    closeAll([tab])
  }
})

test('transport http: openai 6 parses it; an abort closes the request', async () => {
  const mux = { httpUrl: p => new URL(p, `http://${base}/v1/ws`).href, httpToken: async () => 'tok', chat () { throw new Error('not the socket') } }
  const client = new OpenAI6({ baseURL: 'https://app.example/v1', apiKey: 'x', fetch: createFetch(mux, { transport: 'http' }), maxRetries: 0 })
  let text = ''
  for await (const c of await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'hi' }], stream: true })) {
    text += c.choices[0]?.delta?.content ?? ''
  }
  assert.equal(text, 'over http')

  seen.length = 0
  const controller = new AbortController()
  const res = await post(createFetch(mux, { transport: 'http' }), 'hang', { signal: controller.signal })
  const reader = res.body.getReader()
  await reader.read()
  controller.abort()
  await assert.rejects(reader.read())
  await until(() => seen[0]?.closed, { what: 'the server to see the request closed' })

  const aborted = new AbortController()
  aborted.abort()
  await assert.rejects(post(createFetch(mux, { transport: 'http' }), 'hi', { signal: aborted.signal }), { name: 'AbortError' })
})

test('transport auto: HTTP only while the socket cannot connect at all', async () => {
  const gw = new FakeGateway()
  gw.refuse = true
  const [tab] = fakeTabs(1, { gw, shared: false, url: `ws://${base}/v1/ws`, token: 'static-jwt' })
  try {
    await until(() => tab.mux.connection === 'reconnecting', { what: 'a failed first attempt' })
    assert.equal(tab.mux.cannotConnect(), true)
    seen.length = 0
    const res = await post(tab.mux.fetch, 'hi')
    assert.equal(await res.text(), SSE)
    assert.equal(seen.length, 1, 'went over HTTP')
    assert.equal(seen[0].headers.authorization, 'Bearer static-jwt')

    gw.refuse = false
    await until(() => tab.mux.connection === 'open', { timeoutMs: 5000, what: 'the socket to open' })
    assert.equal(tab.mux.cannotConnect(), false)
    seen.length = 0
    const viaSocket = await post(tab.mux.fetch, 'go chunks=2')
    assert.equal(viaSocket.status, 200)
    await viaSocket.text()
    assert.equal(seen.length, 0, 'the socket served it')

    // Once open, a lost socket is a reconnect (streams resume), not a reason for HTTP.
    gw.refuse = true
    for (const s of gw.sockets) s.serverClose?.(1006, '')
    await until(() => tab.mux.connection === 'reconnecting', { what: 'the drop' })
    assert.equal(tab.mux.cannotConnect(), false)
    // `websocket` never uses HTTP, whatever the socket does.
    const socketOnly = scriptedMux(() => [{ type: 'delta', seq: 1, text: 'socket' }, { type: 'done', seq: 2, finish_reason: 'stop' }])
    socketOnly.cannotConnect = () => true
    seen.length = 0
    const res2 = await post(createFetch(socketOnly, { transport: 'websocket' }), 'hi')
    assert.match(await res2.text(), /"content":"socket"/)
    assert.equal(socketOnly.streams.length, 1)
    assert.equal(seen.length, 0)
  } finally {
    closeAll([tab])
  }
})

test('createFetch refuses an unknown transport', () => {
  assert.throws(() => createFetch({}, { transport: 'carrier-pigeon' }), TypeError)
})
