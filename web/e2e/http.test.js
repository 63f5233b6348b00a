// The gateway's own OpenAI-compatible endpoint (`POST /v1/chat/completions`, `GET /v1/models`)
// from Node, against the real gateway binary and mock upstream:
// - the same mock answer encoded by the gateway and by mux.fetch's encoder (src/openai.js,
//   fed the frames a real WebSocket client got for it) are the same bytes, ids and `created`
//   normalised (docs/openai-compat.md);
// - the `openai` 6.x SDK (Node 20) on it: streaming, non-streaming, 429 → RateLimitError,
//   abort mid-stream → the mock counts one aborted request.
// Node 20 has no WebSocket: wsStream() below is a minimal RFC 6455 client over node:http.
import { after, before, test } from 'node:test'
import assert from 'node:assert/strict'
import crypto from 'node:crypto'
import http from 'node:http'
import OpenAI6 from 'openai6'
import { createFetch } from '../src/fetch.js'
import { scriptedMux } from '../test/fakes.js'
import { expectedText, startStack, TIERS_FREE_AT_2_RPM, userNamer, waitFor } from './harness.js'

const MODEL = 'deepseek-v3.2'
const CONFIG = TIERS_FREE_AT_2_RPM

const userFor = userNamer('http')
let stack

before(async () => { stack = await startStack({ config: CONFIG }) })
after(async () => { await stack?.stop() })

async function tokenFor (user, tier = 'pro') {
  const res = await fetch(`${stack.gateway.url}/dev/token?user=${encodeURIComponent(user)}&tier=${tier}`)
  return (await res.json()).token
}

/**
 * Opens one stream on a real WebSocket and resolves with every frame of it a client gets,
 * `queued`/`start` through `done` or `error`.
 */
function wsStream (url, token, open) {
  return new Promise((resolve, reject) => {
    const key = crypto.randomBytes(16).toString('base64')
    const req = http.request(url.replace(/^ws/, 'http'), {
      headers: { connection: 'Upgrade', upgrade: 'websocket', 'sec-websocket-key': key, 'sec-websocket-version': '13', 'sec-websocket-protocol': 'muxgate.v1' },
    })
    req.on('error', reject)
    req.on('response', res => reject(new Error(`no upgrade: HTTP ${res.statusCode}`)))
    req.on('upgrade', (res, socket, head) => {
      const frames = []
      let buf = head
      const send = (obj, opcode = 1) => {
        const payload = Buffer.from(typeof obj === 'string' ? obj : JSON.stringify(obj))
        const mask = crypto.randomBytes(4)
        const len = payload.length
        const header = len < 126 ? Buffer.from([0x80 | opcode, 0x80 | len])
          : len < 65536 ? Buffer.from([0x80 | opcode, 0x80 | 126, len >> 8, len & 255])
            : (() => { const h = Buffer.alloc(10); h[0] = 0x80 | opcode; h[1] = 0x80 | 127; h.writeBigUInt64BE(BigInt(len), 2); return h })()
        socket.write(Buffer.concat([header, mask, payload.map((b, i) => b ^ mask[i % 4])]))
      }
      const finish = (err) => { socket.destroy(); err ? reject(err) : resolve(frames) }
      socket.on('error', finish)
      socket.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk])
        for (;;) {
          if (buf.length < 2) return
          const opcode = buf[0] & 0x0f
          let len = buf[1] & 0x7f
          let at = 2
          if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); at = 4 }
          if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); at = 10 }
          if (buf.length < at + len) return
          const payload = buf.subarray(at, at + len)
          buf = buf.subarray(at + len)
          if (opcode === 9) { send(payload.toString(), 10); continue }
          if (opcode === 8) return finish(new Error('closed before the stream ended'))
          if (opcode !== 1) continue
          const frame = JSON.parse(payload.toString('utf8'))
          if (frame.type === 'welcome') { send({ type: 'open', ...open }); continue }
          if (frame.id !== open.id) continue
          frames.push(frame)
          if (frame.type === 'done' || frame.type === 'error') return finish()
        }
      })
      send({ type: 'hello', token, client: 'http.test/1' })
    })
    req.end()
  })
}

/** The gateway's answer to `body`: status, the headers the spec fixes, the body text. */
async function viaGateway (token, body) {
  const res = await fetch(`${stack.gateway.url}/v1/chat/completions`, {
    method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: JSON.stringify(body),
  })
  return { status: res.status, headers: fixedHeaders(res.headers), body: await res.text() }
}

/** mux.fetch's answer to `body` when its stream gets `frames`. */
async function viaShim (frames, body) {
  const fetchFn = createFetch(scriptedMux(() => frames))
  const res = await fetchFn('http://shim.invalid/v1/chat/completions', { method: 'POST', body: JSON.stringify(body) })
  return { status: res.status, headers: fixedHeaders(res.headers), body: await res.text() }
}

function fixedHeaders (headers) {
  const out = {}
  for (const name of ['content-type', 'cache-control', 'x-request-id', 'x-should-retry', 'retry-after', 'retry-after-ms']) {
    const v = headers.get(name)
    if (v !== null) out[name] = name === 'x-request-id' ? '<id>' : v
  }
  return out
}

/** The stream id and `created` are each writer's own: the spec lets them differ. */
const normalise = text => text
  .replace(/"chatcmpl-[A-Za-z0-9._:-]+"/g, '"chatcmpl-<id>"')
  .replace(/"created":\d+/g, '"created":0')
  // the mock numbers its tool-call ids by request (`call_<request>_<index>`)
  .replace(/"call_\d+_(\d+)"/g, '"call_<n>_$1"')

/** One request, both ways, compared; returns the gateway's answer. */
async function sameBytes (user, body) {
  const token = await tokenFor(user)
  // The same mapping mux.fetch makes: model and messages open the stream, the rest are params.
  const params = { ...body }
  for (const key of ['model', 'messages', 'stream', 'stream_options']) delete params[key]
  const open = { id: `cmp-${crypto.randomBytes(4).toString('hex')}`, model: body.model, messages: body.messages, params }
  const frames = await wsStream(`${stack.gateway.url.replace(/^http/, 'ws')}/v1/ws`, token, open)
  const gateway = await viaGateway(token, body)
  const shim = await viaShim(frames, body)
  assert.equal(normalise(gateway.body), normalise(shim.body), `frames: ${JSON.stringify(frames)}`)
  assert.equal(gateway.status, shim.status)
  assert.deepEqual(gateway.headers, shim.headers)
  return gateway
}

const ask = (content, extra = {}) => ({ model: MODEL, messages: [{ role: 'user', content }], ...extra })

test('the same mock answer: the gateway endpoint and mux.fetch write the same bytes', { timeout: 60_000 }, async () => {
  const user = userFor('cmp')
  const prompt = 'compare the two writers [[mock chunks=6]]'
  const streamed = await sameBytes(user, ask(prompt, { stream: true, stream_options: { include_usage: true } }))
  assert.equal(streamed.status, 200)
  assert.match(streamed.body, /"usage":\{"prompt_tokens":/)
  assert.ok(streamed.body.endsWith('data: [DONE]\n\n'))
  await sameBytes(user, ask(prompt, { stream: true }))
  const whole = await sameBytes(user, ask(prompt))
  assert.equal(JSON.parse(whole.body).choices[0].message.content, expectedText(prompt, 6))
  // A failure after the first event: the error event, then the end.
  const cut = await sameBytes(user, ask('cut short [[mock chunks=6 cut=2]]', { stream: true }))
  assert.match(cut.body, /event: error\ndata: \{"error":/)
  // An unknown model is refused before any stream runs: a 400 in both.
  const refused = await sameBytes(user, ask('x', { model: '' }))
  assert.equal(refused.status, 400)
})

test('the same bytes for tool calls, reasoning and refusals', { timeout: 60_000 }, async () => {
  const user = userFor('cmp-parts')
  const token = await tokenFor(user)
  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }]
  const probe = await wsStream(`${stack.gateway.url.replace(/^http/, 'ws')}/v1/ws`, token,
    { id: 'probe', model: MODEL, messages: [{ role: 'user', content: 'probe [[mock tools=2 reasoning=2]]' }], params: { tools } })
  assert.ok(probe.some(f => Array.isArray(f.tool_calls)), `the gateway relays no tool calls: ${JSON.stringify(probe.at(-1))}`)
  for (const stream of [true, false]) {
    await sameBytes(user, ask('weather in Paris [[mock tools=2 reasoning=3 chunks=2]]', { stream, tools, stream_options: stream ? { include_usage: true } : undefined }))
    await sameBytes(user, ask('no [[mock refusal=1]]', { stream }))
  }
})

test('openai 6.x (Node 20) on the endpoint: streaming, non-streaming, request ids', { timeout: 60_000 }, async () => {
  const user = userFor('sdk6')
  const client = new OpenAI6({ baseURL: `${stack.gateway.url}/v1`, apiKey: await tokenFor(user), maxRetries: 0 })
  const prompt = 'stream it to node [[mock chunks=7]]'
  const { data: stream, request_id: requestId } = await client.chat.completions
    .create({ model: MODEL, messages: [{ role: 'user', content: prompt }], stream: true, stream_options: { include_usage: true } })
    .withResponse()
  let text = ''
  let usage = null
  let finish = null
  const ids = new Set()
  for await (const chunk of stream) {
    ids.add(chunk.id)
    text += chunk.choices[0]?.delta?.content ?? ''
    finish = chunk.choices[0]?.finish_reason ?? finish
    if (chunk.usage) usage = chunk.usage
  }
  assert.equal(text, expectedText(prompt, 7))
  assert.equal(finish, 'stop')
  assert.equal(usage.completion_tokens, 7)
  assert.deepEqual([...ids], [`chatcmpl-${requestId}`])

  const whole = await client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: prompt }] })
  assert.equal(whole.choices[0].message.content, expectedText(prompt, 7))
  assert.equal(whole.id, `chatcmpl-${whole._request_id}`)
  assert.equal(whole.usage.completion_tokens, 7)

  const models = await client.models.list()
  assert.ok(models.data.some(m => m.id === MODEL), JSON.stringify(models.data))
})

test('openai 6.x: the third call of a user at user_rpm = 2 is a RateLimitError', { timeout: 60_000 }, async () => {
  const user = userFor('rpm')
  const client = new OpenAI6({ baseURL: `${stack.gateway.url}/v1`, apiKey: await tokenFor(user, 'free'), maxRetries: 0 })
  const call = () => client.chat.completions.create({ model: MODEL, messages: [{ role: 'user', content: 'hi [[mock chunks=1]]' }] })
  await call()
  await call()
  const err = await call().then(() => null, e => e)
  assert.ok(err instanceof OpenAI6.RateLimitError, String(err))
  assert.equal(err.status, 429)
  assert.ok(Number(err.headers.get('retry-after-ms')) > 0)
  assert.equal(err.headers.get('x-should-retry'), 'true')
  assert.equal(err.error.muxgate_code, 'rate_limited')
})

test('openai 6.x: aborting mid-stream cancels the upstream request', { timeout: 60_000 }, async () => {
  const user = userFor('abort')
  const client = new OpenAI6({ baseURL: `${stack.gateway.url}/v1`, apiKey: await tokenFor(user), maxRetries: 0 })
  const before = (await stack.mock.stats()).aborted
  const controller = new AbortController()
  const stream = await client.chat.completions.create(
    { model: MODEL, messages: [{ role: 'user', content: 'a long one [[mock chunks=400 delay_ms=50]]' }], stream: true },
    { signal: controller.signal })
  let got = 0
  const err = await (async () => {
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta?.content) got++
      if (got === 2) controller.abort()
    }
  })().then(() => null, e => e)
  // openai's Stream ends its loop quietly on its own signal's abort; an abort error would do too.
  assert.ok(err === null || err instanceof OpenAI6.APIUserAbortError, String(err))
  assert.equal(got, 2)
  await waitFor(async () => {
    const s = await stack.mock.stats()
    return s.aborted === before + 1 && s.in_flight === 0
  }, { what: 'the mock to count one aborted request' })
})
