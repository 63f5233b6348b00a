// The OpenAI encoding (src/openai.js) against docs/openai-compat.md, byte for byte: the
// gateway's HTTP endpoint is written to the same text, so these strings are the contract.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ChunkEncoder, HTTP_ERROR, completion, errorResponse } from '../src/openai.js'

const head = '"id":"chatcmpl-t1:8","object":"chat.completion.chunk","created":1732650000,"model":"m"'
const event = (json) => `data: {${json}}\n\n`

test('each part is one chunk: role on the first, then reasoning, refusal, text, tool-call fragments', () => {
  const enc = new ChunkEncoder({ id: 't1:8', created: 1732650000, model: 'm', includeUsage: true })
  const logprobs = { content: [{ token: 'Hi', logprob: -0.1, bytes: [72, 105], top_logprobs: [] }] }
  let out = ''
  out += enc.part({ type: 'reasoning', text: 'Let me think' })
  out += enc.part({ type: 'text', text: 'Hi', logprobs })
  out += enc.part({ type: 'refusal', text: 'No.' })
  out += enc.part({ type: 'tool_call', index: 0, id: 'call_a', name: 'get_weather', arguments: '' })
  out += enc.part({ type: 'tool_call', index: 0, arguments: '{"city":"Ha' })
  out += enc.part({ type: 'text', text: '' })
  out += enc.done({
    finish_reason: 'tool_calls',
    usage: { prompt_tokens: 12, completion_tokens: 40, total_tokens: 52, prompt_tokens_details: { cached_tokens: 8 } },
    system_fingerprint: 'fp_1',
    cost_usd: 0.5,
  })
  assert.equal(out,
    event(`${head},"choices":[{"index":0,"delta":{"role":"assistant","reasoning_content":"Let me think"},"finish_reason":null}]`) +
    event(`${head},"choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":{"content":[{"token":"Hi","logprob":-0.1,"bytes":[72,105],"top_logprobs":[]}]},"finish_reason":null}]`) +
    event(`${head},"choices":[{"index":0,"delta":{"refusal":"No."},"finish_reason":null}]`) +
    event(`${head},"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]},"finish_reason":null}]`) +
    event(`${head},"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\":\\"Ha"}}]},"finish_reason":null}]`) +
    event(`${head},"system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]`) +
    event(`${head},"system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":40,"total_tokens":52,"prompt_tokens_details":{"cached_tokens":8}}`) +
    'data: [DONE]\n\n')
})

test('an answer with no part: the finish chunk carries the role; no usage chunk unless asked; a fallback model names itself at the end', () => {
  const enc = new ChunkEncoder({ id: 't1:8', created: 1732650000, model: 'm' })
  assert.equal(enc.done({ finish_reason: 'length', usage: { prompt_tokens: 1 }, model: 'fallback-m' }),
    event('"id":"chatcmpl-t1:8","object":"chat.completion.chunk","created":1732650000,"model":"fallback-m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":"length"}]') +
    'data: [DONE]\n\n')
})

test('a missing finish reason is tool_calls after tool calls, stop otherwise; usage absent is null in the usage chunk', () => {
  const tools = new ChunkEncoder({ id: 'a:1', created: 1, model: 'm', includeUsage: true })
  tools.part({ type: 'tool_call', index: 0, id: 'c', name: 'f', arguments: '{}' })
  assert.match(tools.done({}), /"finish_reason":"tool_calls".*\n\ndata: \{.*"choices":\[\],"usage":null\}\n\ndata: \[DONE\]\n\n$/s)
  const text = new ChunkEncoder({ id: 'a:1', created: 1, model: 'm' })
  text.part({ type: 'text', text: 'x' })
  assert.match(text.done({ finish_reason: null }), /"finish_reason":"stop"/)
})

test('a mid-stream error is one error event in OpenAI\'s shape: the upstream\'s code, type and param when it said them', () => {
  const enc = new ChunkEncoder({ id: 'a:1', created: 1, model: 'm' })
  assert.equal(enc.error({ code: 'upstream_error', message: 'too long', status: 400, upstream: { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' } }),
    'event: error\ndata: {"error":{"message":"too long","type":"invalid_request_error","param":"messages","code":"context_length_exceeded","muxgate_code":"upstream_error"}}\n\n')
  assert.equal(enc.error({ code: 'upstream_timeout', message: 'silent' }),
    'event: error\ndata: {"error":{"message":"silent","type":"timeout_error","param":null,"code":"upstream_timeout","muxgate_code":"upstream_timeout"}}\n\n')
})

test('the non-streaming completion merges the answer: content null when only tools, refusal always, usage and model', () => {
  const result = {
    text: '', reasoning: 'hmm', refusal: null, finish_reason: 'tool_calls', cost_usd: 0.1,
    toolCalls: [{ id: 'call_1', type: 'function', function: { name: 'f', arguments: '{"a":1}' } }],
    usage: { prompt_tokens: 3, completion_tokens: 4, total_tokens: 7 }, system_fingerprint: 'fp', model: 'fb',
  }
  assert.equal(JSON.stringify(completion({ id: 't:2', created: 5, model: 'm' }, result)),
    '{"id":"chatcmpl-t:2","object":"chat.completion","created":5,"model":"fb","system_fingerprint":"fp","choices":[{"index":0,' +
    '"message":{"role":"assistant","content":null,"reasoning_content":"hmm","refusal":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"f","arguments":"{\\"a\\":1}"}}]},' +
    '"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}')
  const plain = completion({ id: 't:3', created: 5, model: 'm' }, { text: 'Hi', reasoning: '', refusal: null, toolCalls: [], finish_reason: null, usage: null })
  assert.deepEqual(plain, {
    id: 'chatcmpl-t:3', object: 'chat.completion', created: 5, model: 'm',
    choices: [{ index: 0, message: { role: 'assistant', content: 'Hi', refusal: null }, finish_reason: 'stop' }],
  })
})

test('the status table: every protocol code has a status, type and retry verdict', () => {
  const table = Object.fromEntries(Object.entries(HTTP_ERROR).map(([code, r]) => [code, [r.status, r.retry]]))
  assert.deepEqual(table, {
    bad_request: [400, false],
    unauthorized: [401, false],
    not_found: [404, false],
    duplicate_id: [409, false],
    rate_limited: [429, true],
    too_many_streams: [429, true],
    too_many_connections: [429, false],
    budget_exceeded: [429, false],
    cancelled: [499, false],
    internal: [500, true],
    upstream_error: [502, false],
    overloaded: [503, true],
    upstream_timeout: [504, false],
  })
})

test('errors as HTTP: retry hints in seconds (rounded up) and milliseconds, the upstream status, budget never retried', () => {
  const rate = errorResponse({ code: 'rate_limited', message: 'slow down', retry_after_ms: 1200 }, 't:1')
  assert.equal(rate.status, 429)
  assert.deepEqual(rate.headers, [['content-type', 'application/json'], ['x-request-id', 't:1'],
    ['x-should-retry', 'true'], ['retry-after', '2'], ['retry-after-ms', '1200']])
  assert.equal(rate.body, '{"error":{"message":"slow down","type":"rate_limit_error","param":null,"code":"rate_limited","muxgate_code":"rate_limited"}}')

  const budget = errorResponse({ code: 'budget_exceeded', message: 'spent', retryAfterMs: 3_600_000 })
  assert.equal(budget.status, 429)
  assert.deepEqual(budget.headers, [['content-type', 'application/json'], ['x-should-retry', 'false'],
    ['retry-after', '3600'], ['retry-after-ms', '3600000']])
  assert.equal(JSON.parse(budget.body).error.type, 'insufficient_quota')

  const upstream = errorResponse({ code: 'upstream_error', message: 'bad', status: 400, upstream: { code: 'context_length_exceeded' } })
  assert.equal(upstream.status, 400)
  assert.deepEqual(upstream.headers.find(([k]) => k === 'x-should-retry'), ['x-should-retry', 'false'])
  assert.equal(JSON.parse(upstream.body).error.code, 'context_length_exceeded')
  assert.equal(errorResponse({ code: 'upstream_error', message: 'refused' }).status, 502)
  assert.equal(errorResponse({ code: 'upstream_error', message: 'odd', status: 200 }).status, 502)

  // the circuit breaker named a time: worth a retry then
  const open = errorResponse({ code: 'upstream_error', message: 'circuit open', retry_after_ms: 0 })
  assert.deepEqual(open.headers.slice(1), [['x-should-retry', 'true'], ['retry-after', '0'], ['retry-after-ms', '0']])
  assert.equal(errorResponse({ code: 'overloaded', message: 'full' }).status, 503)
  assert.equal(errorResponse({ code: 'something_new', message: '?' }).status, 500)
})
