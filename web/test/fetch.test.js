// mux.fetch (src/fetch.js) in node: request forms, when the status is decided, errors as
// HTTP, abort paths, and the real SDKs (openai 7 and 6, the AI SDK) parsing what it answers.
// The mux here is a stand-in whose `chat()` returns a real ChatStream fed scripted frames; the
// real gateway and Chromium are in ../e2e/sdk.test.js.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import OpenAI from 'openai'
import OpenAI6 from 'openai6'
import { createOpenAI } from '@ai-sdk/openai'
import { createOpenAICompatible } from '@ai-sdk/openai-compatible'
import { DirectChatTransport, ToolLoopAgent, generateText, jsonSchema, stepCountIs, streamText, tool } from 'ai'
import { createFetch } from '../src/fetch.js'
import { closeAll, FakeGateway, fakeAnswer, fakeTabs, scriptedMux, settled, until } from './fakes.js'

const URL_ = 'http://127.0.0.1:9/v1/chat/completions'
const USAGE = { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 }
const ask = (extra = {}) => ({ model: 'm', messages: [{ role: 'user', content: 'hi' }], ...extra })
const post = (body, init = {}) => ({ method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...init })

/** `start`, one delta per text, `done` with USAGE. */
function textAnswer (...texts) {
  return () => [{ type: 'queued', position: 1 }, { type: 'start', model: 'm' },
    ...texts.map((text, i) => ({ type: 'delta', seq: i + 1, text })),
    { type: 'done', seq: texts.length + 1, finish_reason: 'stop', usage: USAGE }]
}

/** Two tool calls (fragments split mid-JSON), as the mock's `tools=2` answers; prose after a tool message. */
function toolAnswer (request) {
  const last = request.messages.at(-1)
  if (last.role === 'tool') return textAnswer(`The tool said ${last.content}`)()
  const tools = request.params?.tools ?? []
  const name = i => tools.length ? tools[i % tools.length].function.name : `tool_${i}`
  return [{ type: 'start', model: 'm' },
    { type: 'delta', seq: 1, text: '', tool_calls: [{ index: 0, id: 'call_1_0', type: 'function', function: { name: name(0), arguments: '' } }] },
    { type: 'delta', seq: 2, text: '', tool_calls: [{ index: 0, function: { arguments: '{"city":"Pa' } }, { index: 1, id: 'call_1_1', type: 'function', function: { name: name(1), arguments: '{"city"' } }] },
    { type: 'delta', seq: 3, text: '', tool_calls: [{ index: 0, function: { arguments: 'ris"}' } }, { index: 1, function: { arguments: ':"Tokyo"}' } }] },
    { type: 'done', seq: 4, finish_reason: 'tool_calls', usage: USAGE }]
}

const gate = () => {
  let open
  const pause = new Promise(resolve => { open = resolve })
  return { pause, open }
}

test('every input form fetch accepts: string, URL, Request; headers as Headers, object or pairs; body as string, bytes, Blob or stream', async () => {
  const mux = scriptedMux(textAnswer('Hel', 'lo'))
  const fetch = createFetch(mux)
  const body = JSON.stringify(ask({ temperature: 0.5 }))
  const forms = [
    [URL_, post(ask({ temperature: 0.5 }))],
    [new URL(URL_), { method: 'POST', headers: new Headers({ 'content-type': 'application/json' }), body }],
    [new Request(URL_, { method: 'POST', headers: [['content-type', 'application/json']], body })],
    [new Request(URL_, { method: 'GET' }), { method: 'POST', body: new TextEncoder().encode(body) }],
    [`${URL_}?api-version=1`, { method: 'post', body: new Blob([body]) }],
    [URL_, { method: 'POST', body: new Blob([body]).stream(), duplex: 'half' }],
  ]
  for (const [input, init] of forms) {
    const res = await fetch(input, init)
    assert.equal(res.status, 200)
    assert.equal(res.headers.get('content-type'), 'application/json')
    assert.equal((await res.json()).choices[0].message.content, 'Hello')
  }
  assert.equal(mux.streams.length, forms.length)
  for (const { request } of mux.streams) {
    assert.deepEqual(request, { model: 'm', messages: [{ role: 'user', content: 'hi' }], params: { temperature: 0.5 } })
  }
  // what fetch refuses, this refuses the same way
  await assert.rejects(fetch(URL_, { method: 'POST', body: new Blob([body]).stream() }), TypeError)
  await assert.rejects(fetch('not a url', post(ask())), TypeError)
})

test('model, messages, stream and stream_options are the framing; every other key goes upstream as params', async () => {
  const mux = scriptedMux(textAnswer('Hel', 'lo'))
  const res = await createFetch(mux)(URL_, post(ask({ stream: true, stream_options: { include_usage: true }, tools: [], user: 'x', n: 1 })))
  await res.text()
  assert.deepEqual(mux.streams[0].request.params, { tools: [], user: 'x', n: 1 })
})

test('a bad body is a 400 in OpenAI\'s error shape; nothing is opened', async () => {
  const mux = scriptedMux(textAnswer('Hel', 'lo'))
  const fetch = createFetch(mux)
  for (const [body, says] of [['{', /not JSON/], ['[]', /JSON object/], [JSON.stringify({ messages: [] }), /model/],
    [JSON.stringify({ model: 'm', messages: [] }), /messages/], [JSON.stringify(ask({ stream: 'yes' })), /stream/]]) {
    const res = await fetch(URL_, { method: 'POST', body })
    assert.equal(res.status, 400)
    const { error } = await res.json()
    assert.match(error.message, says)
    assert.equal(error.type, 'invalid_request_error')
    assert.equal(error.code, 'bad_request')
  }
  assert.equal(mux.streams.length, 0)
})

test('anything but POST …/chat/completions: the fallback, or a 404 that names what to use instead', async () => {
  const mux = scriptedMux(textAnswer('Hel', 'lo'))
  const models = await createFetch(mux)('http://127.0.0.1:9/v1/models')
  assert.equal(models.status, 404)
  assert.match((await models.json()).error.message, /GET \/v1\/models: mux.fetch serves POST …\/chat\/completions only/)
  const responses = await createFetch(mux)('http://127.0.0.1:9/v1/responses', post(ask()))
  assert.equal(responses.status, 404)
  assert.match((await responses.json()).error.message, /not the Responses API.*provider\.chat\(model\)/)
  const seen = []
  const fallback = async (request) => { seen.push(`${request.method} ${request.url}`); return new Response('{"data":[]}') }
  const fetch = createFetch(mux, { fallback })
  assert.deepEqual(await (await fetch('http://127.0.0.1:9/v1/models')).json(), { data: [] })
  await fetch(`${URL_}/abc`, { method: 'DELETE' })
  await fetch(URL_)
  assert.deepEqual(seen, ['GET http://127.0.0.1:9/v1/models', `DELETE ${URL_}/abc`, `GET ${URL_}`])
  assert.equal(mux.streams.length, 0)
  assert.throws(() => createFetch(mux, { fallback: 'yes' }), TypeError)
})

test('streaming: no status while queued or starting; 200 at the first delta with the stream id; the body ends at [DONE]', async () => {
  const g = gate()
  const mux = scriptedMux(() => [{ type: 'queued', position: 2 }, { type: 'start', model: 'm' }, { pause: g.pause },
    { type: 'delta', seq: 1, text: 'Hi' }, { type: 'done', seq: 2, finish_reason: 'stop', usage: USAGE }])
  let answered = false
  const pending = createFetch(mux)(URL_, post(ask({ stream: true }))).then((res) => { answered = true; return res })
  await until(() => mux.streams[0]?.stream.model === 'm', { what: 'start' })
  await new Promise(resolve => setTimeout(resolve, 20))
  assert.equal(answered, false)
  g.open()
  const res = await pending
  assert.equal(res.status, 200)
  assert.equal(res.headers.get('content-type'), 'text/event-stream; charset=utf-8')
  assert.equal(res.headers.get('x-request-id'), 't:1')
  const text = await res.text()
  assert.match(text, /^data: \{"id":"chatcmpl-t:1","object":"chat.completion.chunk","created":\d+,"model":"m","choices":\[\{"index":0,"delta":\{"role":"assistant","content":"Hi"\},"finish_reason":null\}\]\}\n\n/)
  assert.ok(text.endsWith('"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'), text)
  const created = Number(/"created":(\d+)/.exec(text)[1])
  assert.ok(Math.abs(created - Date.now() / 1000) < 5)
})

test('an error before the first delta is the HTTP status, with retry hints; after it, an error event ends the body', async () => {
  const early = scriptedMux(() => [{ type: 'queued', position: 1 }, { type: 'error', code: 'rate_limited', message: 'slow down', retry_after_ms: 1500 }])
  const res = await createFetch(early)(URL_, post(ask({ stream: true })))
  assert.equal(res.status, 429)
  assert.equal(res.headers.get('retry-after-ms'), '1500')
  assert.equal(res.headers.get('retry-after'), '2')
  assert.equal(res.headers.get('x-should-retry'), 'true')
  assert.equal(res.headers.get('x-request-id'), 't:1')
  assert.deepEqual((await res.json()).error, { message: 'slow down', type: 'rate_limit_error', param: null, code: 'rate_limited', muxgate_code: 'rate_limited' })

  const late = scriptedMux(() => [{ type: 'delta', seq: 1, text: 'Hi' },
    { type: 'error', code: 'upstream_error', message: 'upstream went away', status: 502 }])
  const mid = await createFetch(late)(URL_, post(ask({ stream: true })))
  assert.equal(mid.status, 200)
  const body = await mid.text()
  assert.ok(body.endsWith('event: error\ndata: {"error":{"message":"upstream went away","type":"upstream_error","param":null,"code":"upstream_error","muxgate_code":"upstream_error"}}\n\n'), body)
  assert.ok(!body.includes('[DONE]'))
})

test('a stream lost before any byte is a network error (TypeError), as fetch gives for a dropped connection', async () => {
  for (const code of ['closed', 'tab_gone', 'not_found', 'buffer_full']) {
    const mux = scriptedMux(() => [{ type: 'error', code, message: 'gone' }])
    await assert.rejects(createFetch(mux)(URL_, post(ask({ stream: true }))), (err) => {
      assert.equal(err.name, 'TypeError')
      assert.equal(err.message, 'Failed to fetch')
      assert.equal(err.cause.code, code)
      return true
    })
  }
  // after the first byte, the body errors as a network error would
  const mux = scriptedMux(() => [{ type: 'delta', seq: 1, text: 'Hi' }, { type: 'error', code: 'tab_gone', message: 'gone' }])
  const res = await createFetch(mux)(URL_, post(ask({ stream: true })))
  await assert.rejects(res.text(), TypeError)
})

test('abort before the response: rejects with the signal\'s reason and cancels the stream; an aborted signal opens nothing', async () => {
  const g = gate()
  const mux = scriptedMux(() => [{ type: 'start', model: 'm' }, { pause: g.pause }])
  const fetch = createFetch(mux)
  const ac = new AbortController()
  const pending = fetch(URL_, post(ask({ stream: true }), { signal: ac.signal }))
  await until(() => mux.streams[0]?.stream.model === 'm', { what: 'start' })
  const reason = new Error('user left')
  ac.abort(reason)
  await assert.rejects(pending, err => err === reason)
  assert.equal(mux.streams[0].stream.cancelledLocally, true)

  const later = new AbortController()
  const nonStreaming = fetch(URL_, post(ask(), { signal: later.signal }))
  setTimeout(() => later.abort(), 30)
  await assert.rejects(nonStreaming, { name: 'AbortError' })
  assert.equal(mux.streams[1].stream.cancelledLocally, true)

  await assert.rejects(fetch(URL_, post(ask(), { signal: AbortSignal.abort() })), { name: 'AbortError' })
  assert.equal(mux.streams.length, 2)
  g.open()
})

test('abort after the response errors the body with the reason; cancelling the body cancels the stream', async () => {
  const g = gate()
  const mux = scriptedMux(() => [{ type: 'delta', seq: 1, text: 'Hi' }, { pause: g.pause }, { type: 'delta', seq: 2, text: 'never' }])
  const fetch = createFetch(mux)
  const ac = new AbortController()
  const res = await fetch(URL_, post(ask({ stream: true }), { signal: ac.signal }))
  const reader = res.body.getReader()
  assert.match(new TextDecoder().decode((await reader.read()).value), /"content":"Hi"/)
  ac.abort()
  await assert.rejects(reader.read(), { name: 'AbortError' })
  assert.equal(mux.streams[0].stream.cancelledLocally, true)

  const res2 = await fetch(URL_, post(ask({ stream: true })))
  await res2.body.cancel()
  assert.equal(mux.streams[1].stream.cancelledLocally, true)
  g.open()
})

test('non-streaming: one chat.completion with the tool calls merged', async () => {
  const mux = scriptedMux(toolAnswer)
  const res = await createFetch(mux)(URL_, post(ask()))
  assert.equal(res.headers.get('x-request-id'), 't:1')
  const body = await res.json()
  assert.deepEqual(body.choices, [{
    index: 0,
    message: {
      role: 'assistant', content: null, refusal: null,
      tool_calls: [
        { id: 'call_1_0', type: 'function', function: { name: 'tool_0', arguments: '{"city":"Paris"}' } },
        { id: 'call_1_1', type: 'function', function: { name: 'tool_1', arguments: '{"city":"Tokyo"}' } },
      ],
    },
    finish_reason: 'tool_calls',
  }])
  assert.deepEqual(body.usage, USAGE)
})

for (const [name, SDK] of [['openai 7', OpenAI], ['openai 6', OpenAI6]]) {
  const client = (mux, opts = {}) => new SDK({ baseURL: 'http://127.0.0.1:9/v1', apiKey: 'muxgate', fetch: createFetch(mux), ...opts })

  test(`${name}: create({stream, include_usage}) text, usage chunk, requestID; non-streaming`, async () => {
    const c = client(scriptedMux(textAnswer('Hel', 'lo', ' there')))
    const { data, request_id: requestId } = await c.chat.completions.create(ask({ stream: true, stream_options: { include_usage: true } })).withResponse()
    let text = ''
    let usage = null
    for await (const chunk of data) {
      text += chunk.choices[0]?.delta?.content ?? ''
      if (chunk.usage) usage = chunk.usage
    }
    assert.equal(text, 'Hello there')
    assert.deepEqual(usage, USAGE)
    assert.equal(requestId, 't:1')
    const done = await c.chat.completions.create(ask())
    assert.equal(done.choices[0].message.content, 'Hello there')
    assert.equal(done._request_id, 't:2')
  })

  test(`${name}: RateLimitError with retry-after-ms; BadRequestError with the upstream's code; a mid-stream error throws from the loop`, async () => {
    const mux = scriptedMux((request, n) => n === 1
      ? [{ type: 'error', code: 'rate_limited', message: 'slow down', retry_after_ms: 800 }]
      : n === 2
        ? [{ type: 'error', code: 'upstream_error', message: 'too long', status: 400, upstream: { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' } }]
        : [{ type: 'delta', seq: 1, text: 'Hi' }, { type: 'error', code: 'upstream_timeout', message: 'the upstream went silent' }])
    const c = client(mux, { maxRetries: 0 })
    await assert.rejects(c.chat.completions.create(ask({ stream: true })), (err) => {
      assert.equal(err.constructor.name, 'RateLimitError')
      assert.equal(err.status, 429)
      assert.equal(err.headers.get('retry-after-ms'), '800')
      return true
    })
    await assert.rejects(c.chat.completions.create(ask()), (err) => {
      assert.equal(err.constructor.name, 'BadRequestError')
      assert.equal(err.code, 'context_length_exceeded')
      assert.equal(err.param, 'messages')
      return true
    })
    const stream = await c.chat.completions.create(ask({ stream: true }))
    let text = ''
    await assert.rejects((async () => { for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '' })(),
      (err) => { assert.match(err.message, /went silent/); assert.equal(err.code, 'upstream_timeout'); return true })
    assert.equal(text, 'Hi')
  })

  test(`${name}: a lost stream is retried by the SDK as a connection error`, async () => {
    const mux = scriptedMux((request, n) => n === 1 ? [{ type: 'error', code: 'tab_gone', message: 'gone' }] : textAnswer('ok')())
    const done = await client(mux, { maxRetries: 1 }).chat.completions.create(ask())
    assert.equal(done.choices[0].message.content, 'ok')
    assert.equal(mux.streams.length, 2)
  })

  test(`${name}: stream().finalChatCompletion() and runTools() with tool calls`, async () => {
    const mux = scriptedMux(toolAnswer)
    const c = client(mux)
    const tools = [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } }]
    const final = await c.chat.completions.stream(ask({ tools })).finalChatCompletion()
    assert.deepEqual(final.choices[0].message.tool_calls.map(t => [t.id, t.function.name, t.function.arguments]),
      [['call_1_0', 'get_weather', '{"city":"Paris"}'], ['call_1_1', 'get_weather', '{"city":"Tokyo"}']])
    assert.equal(final.choices[0].finish_reason, 'tool_calls')
    const calls = []
    const runner = c.chat.completions.runTools({
      ...ask(),
      tools: [{ type: 'function', function: { name: 'get_weather', parameters: tools[0].function.parameters, function: ({ city }) => { calls.push(city); return `sunny in ${city}` }, parse: JSON.parse } }],
    })
    assert.equal(await runner.finalContent(), 'The tool said sunny in Tokyo')
    assert.deepEqual(calls, ['Paris', 'Tokyo'])
  })
}

test('AI SDK: streamText and generateText via @ai-sdk/openai .chat() and openai-compatible; a tool loop', async () => {
  const mux = scriptedMux((request, n) => request.params?.tools ? toolAnswer(request) : textAnswer('Hel', 'lo')())
  const fetch = createFetch(mux)
  const models = [
    createOpenAI({ baseURL: 'http://127.0.0.1:9/v1', apiKey: 'muxgate', fetch }).chat('m'),
    createOpenAICompatible({ name: 'muxgate', baseURL: 'http://127.0.0.1:9/v1', fetch, includeUsage: true })('m'),
  ]
  for (const model of models) {
    const r = streamText({ model, prompt: 'hi' })
    let text = ''
    for await (const t of r.textStream) text += t
    assert.equal(text, 'Hello')
    assert.equal(await r.finishReason, 'stop')
    const usage = await r.usage
    assert.deepEqual([usage.inputTokens, usage.outputTokens, usage.totalTokens], [5, 3, 8])
    const g = await generateText({ model, prompt: 'hi' })
    assert.equal(g.text, 'Hello')
    assert.equal(g.usage.totalTokens, 8)

    const seen = []
    const weather = tool({
      description: 'the weather in a city',
      inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } }, required: ['city'] }),
      execute: async ({ city }) => { seen.push(city); return `sunny in ${city}` },
    })
    const withTool = streamText({ model, prompt: 'weather?', tools: { weather }, stopWhen: stepCountIs(2) })
    let answer = ''
    for await (const t of withTool.textStream) answer += t
    const steps = await withTool.steps
    assert.deepEqual(steps[0].toolCalls.map(c => [c.toolCallId, c.toolName, c.input]),
      [['call_1_0', 'weather', { city: 'Paris' }], ['call_1_1', 'weather', { city: 'Tokyo' }]])
    assert.deepEqual(seen, ['Paris', 'Tokyo'])
    assert.match(answer, /^The tool said /)
  }
})

test('the README\'s useChat recipe: a DirectChatTransport whose agent\'s model uses mux.fetch streams UI message chunks', async () => {
  const model = createOpenAICompatible({ name: 'muxgate', baseURL: 'http://127.0.0.1:9/v1', fetch: createFetch(scriptedMux(textAnswer('Hel', 'lo'))), includeUsage: true })('m')
  const transport = new DirectChatTransport({ agent: new ToolLoopAgent({ model, instructions: 'Be brief.' }) })
  const stream = await transport.sendMessages({
    chatId: 'c1', messageId: undefined, trigger: 'submit-message', abortSignal: undefined,
    messages: [{ id: 'u1', role: 'user', parts: [{ type: 'text', text: 'hi' }] }],
  })
  const chunks = []
  for await (const chunk of stream) chunks.push(chunk)
  assert.equal(chunks.filter(c => c.type === 'text-delta').map(c => c.delta).join(''), 'Hello')
  assert.deepEqual(chunks.at(-1), { type: 'finish', finishReason: 'stop' })
})

test('mux.fetch on a real Mux: bound and the same function each time; a follower tab\'s SDK call goes through the leader', async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const list = fakeTabs(2, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower').mux
    const { fetch } = follower
    assert.equal(fetch, follower.fetch)
    assert.notEqual(follower.createFetch(), fetch)
    const client = new OpenAI({ baseURL: 'http://127.0.0.1:9/v1', apiKey: 'muxgate', fetch })
    const { data, request_id: requestId } = await client.chat.completions.create({
      model: 'm', messages: [{ role: 'user', content: 'go chunks=5' }], stream: true,
    }).withResponse()
    let text = ''
    for await (const chunk of data) text += chunk.choices[0]?.delta?.content ?? ''
    assert.equal(text, fakeAnswer(requestId, 5))
    assert.ok(requestId.startsWith(`${follower.tabId}:`))
  } finally { closeAll(list) }
})
