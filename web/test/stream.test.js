import { test } from 'node:test'
import assert from 'node:assert/strict'
import ChatStream from '../src/stream.js'
import { collect, collectParts } from './fakes.js'

const delta = (seq, text) => ({ type: 'delta', id: 't:1', seq, text })
const done = (seq) => ({ type: 'done', id: 't:1', seq, finish_reason: 'stop', usage: { prompt_tokens: 1, completion_tokens: seq - 1 }, cost_usd: 0.5 })

test('deltas stream in order and done resolves the result', async () => {
  const s = new ChatStream('t:1', {})
  const reading = collect(s)
  assert.equal(s.push(delta(1, 'Hel')), 'applied')
  assert.equal(s.push(delta(2, 'lo')), 'applied')
  assert.equal(s.push(done(3)), 'applied')
  assert.deepEqual(await reading, { text: 'Hello', error: null })
  assert.deepEqual(await s.result, {
    usage: { prompt_tokens: 1, completion_tokens: 2 }, finish_reason: 'stop', cost_usd: 0.5,
    text: 'Hello', reasoning: '', refusal: null, toolCalls: [],
  })
  assert.equal(s.push(delta(4, 'late')), 'ignored')
})

test('a replay after resume is deduplicated by seq', async () => {
  const s = new ChatStream('t:1', {})
  for (let i = 1; i <= 3; i++) s.push(delta(i, `w${i} `))
  // the new leader resumed from seq 2 (the tab had 3 by then): 2 and 3 come again
  assert.equal(s.push(delta(2, 'w2 ')), 'duplicate')
  assert.equal(s.push(delta(3, 'w3 ')), 'duplicate')
  s.push(delta(4, 'w4 '))
  s.push(done(5))
  assert.equal((await collect(s)).text, 'w1 w2 w3 w4 ')
  assert.equal(s.lastSeq, 5)
})

test('frames ahead of a gap wait for it, then apply in order', async () => {
  const s = new ChatStream('t:1', {})
  s.push(delta(1, 'a'))
  assert.equal(s.push(delta(3, 'c')), 'held')
  assert.equal(s.push(done(4)), 'held')
  assert.equal(s.push(delta(3, 'c')), 'duplicate')
  assert.equal(s.ended, false)
  assert.equal(s.push(delta(2, 'b')), 'applied')
  assert.equal(s.ended, true)
  assert.equal((await collect(s)).text, 'abc')
})

test('a gap that never fills ends the stream with sequence_gap', async () => {
  const s = new ChatStream('t:1', {}, { maxHeld: 2 })
  s.push(delta(1, 'a'))
  s.push(delta(3, 'c'))
  s.push(delta(4, 'd'))
  s.push(delta(5, 'e'))
  const { text, error } = await collect(s)
  assert.equal(text, 'a')
  assert.equal(error.code, 'sequence_gap')
  await assert.rejects(s.result, { code: 'sequence_gap' })
})

test('an error frame throws from the loop with its code and retry hint', async () => {
  const s = new ChatStream('t:1', {})
  const reading = collect(s)
  s.push(delta(1, 'x'))
  s.push({ type: 'error', id: 't:1', seq: 2, code: 'rate_limited', message: 'slow down', retry_after_ms: 1200 })
  const { text, error } = await reading
  assert.equal(text, 'x')
  assert.equal(error.code, 'rate_limited')
  assert.equal(error.retryAfterMs, 1200)
  assert.equal(error.id, 't:1')
  await assert.rejects(s.result, { code: 'rate_limited' })
})

test('an error without seq (refused at open) ends the stream at once', async () => {
  const s = new ChatStream('t:1', {})
  s.push({ type: 'error', id: 't:1', code: 'too_many_streams', message: 'max 32' })
  const { error } = await collect(s)
  assert.equal(error.code, 'too_many_streams')
})

test('cancel ends the loop quietly, rejects result with cancelled, tells the owner once', async () => {
  const cancelled = []
  const s = new ChatStream('t:1', {}, { onCancel: id => cancelled.push(id) })
  const reading = collect(s)
  s.push(delta(1, 'a'))
  await new Promise(r => setImmediate(r))
  s.cancel()
  s.cancel()
  assert.deepEqual(await reading, { text: 'a', error: null })
  await assert.rejects(s.result, { code: 'cancelled' })
  assert.deepEqual(cancelled, ['t:1'])
  assert.equal(s.push({ type: 'error', id: 't:1', seq: 2, code: 'cancelled' }), 'ignored')
})

test('breaking out of for-await cancels the stream', async () => {
  const cancelled = []
  const s = new ChatStream('t:1', {}, { onCancel: id => cancelled.push(id) })
  s.push(delta(1, 'a'))
  s.push(delta(2, 'b'))
  for await (const t of s) { assert.equal(t, 'a'); break }
  assert.deepEqual(cancelled, ['t:1'])
})

test('queued and start update the position', () => {
  const changes = []
  const s = new ChatStream('t:1', {}, { onChange: st => changes.push(st.position) })
  s.push({ type: 'queued', id: 't:1', position: 3 })
  assert.equal(s.position, 3)
  s.push({ type: 'queued', id: 't:1', position: 1 })
  s.push({ type: 'start', id: 't:1', model: 'm' })
  assert.equal(s.position, null)
  assert.equal(s.model, 'm')
  assert.deepEqual(changes, [3, 1, null])
})

test('an end held behind a gap that never fills fails with sequence_gap after gapTimeoutMs', async () => {
  const s = new ChatStream('t:1', {}, { gapTimeoutMs: 30 })
  s.push(delta(1, 'a'))
  assert.equal(s.push(done(3)), 'held')
  const { text, error } = await collect(s)
  assert.equal(text, 'a')
  assert.equal(error.code, 'sequence_gap')
})

test('a gap filled in time clears the gap timer', async () => {
  const s = new ChatStream('t:1', {}, { gapTimeoutMs: 30 })
  s.push(done(2))
  s.push(delta(1, 'a'))
  await new Promise(r => setTimeout(r, 60))
  assert.deepEqual(await collect(s), { text: 'a', error: null })
  assert.equal((await s.result).finish_reason, 'stop')
})

// Issue 12: the whole answer, not only its text.
const toolDelta = (seq, fragments) => ({ type: 'delta', id: 't:1', seq, text: '', tool_calls: fragments })

test('two parallel tool calls, interleaved, arguments split mid-escape, merge by index', async () => {
  const s = new ChatStream('t:1', {})
  const reading = collectParts(s)
  // JSON texts cut inside `\"` and inside `\u00e9`: only the merged string parses
  const a = JSON.stringify({ city: 'Ha"noi', note: 'caf\u00e9 \\ ok' }).replace('é', '\\u00e9')
  const b = JSON.stringify({ tz: 'Asia/Tokyo', n: 2 })
  const aCut = [a.slice(0, 12), a.slice(12, 33), a.slice(33)]
  assert.ok(aCut[0].endsWith('\\') && aCut[1].includes('\\u00') && !aCut[1].includes('\\u00e9'), `cuts: ${aCut}`)
  s.push(toolDelta(1, [{ index: 0, id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: '' } }]))
  s.push(toolDelta(2, [{ index: 1, id: 'call_b', type: 'function', function: { name: 'get_time', arguments: b.slice(0, 5) } }]))
  s.push(toolDelta(3, [{ index: 0, function: { arguments: aCut[0] } }]))
  s.push(toolDelta(4, [{ index: 1, function: { arguments: b.slice(5) } }, { index: 0, function: { arguments: aCut[1] } }]))
  s.push(toolDelta(5, [{ index: 0, function: { arguments: aCut[2] } }]))
  s.push({ type: 'done', id: 't:1', seq: 6, finish_reason: 'tool_calls', usage: { prompt_tokens: 5, completion_tokens: 9, total_tokens: 14 } })
  const { parts, error } = await reading
  assert.equal(error, null)
  assert.deepEqual(parts, [
    { type: 'tool_call', index: 0, id: 'call_a', name: 'get_weather', arguments: '' },
    { type: 'tool_call', index: 1, id: 'call_b', name: 'get_time', arguments: b.slice(0, 5) },
    { type: 'tool_call', index: 0, arguments: aCut[0] },
    { type: 'tool_call', index: 1, arguments: b.slice(5) },
    { type: 'tool_call', index: 0, arguments: aCut[1] },
    { type: 'tool_call', index: 0, arguments: aCut[2] },
  ])
  const result = await s.result
  assert.deepEqual(result.toolCalls, [
    { id: 'call_a', type: 'function', function: { name: 'get_weather', arguments: a } },
    { id: 'call_b', type: 'function', function: { name: 'get_time', arguments: b } },
  ])
  assert.deepEqual(JSON.parse(result.toolCalls[0].function.arguments), { city: 'Ha"noi', note: 'café \\ ok' })
  assert.equal(result.finish_reason, 'tool_calls')
  assert.equal(result.text, '')
})

test('tool calls come out in index order whatever order their first fragments came in', async () => {
  const s = new ChatStream('t:1', {})
  s.push(toolDelta(1, [{ index: 1, id: 'c1', type: 'function', function: { name: 'f1', arguments: '{}' } }]))
  s.push(toolDelta(2, [{ index: 0, id: 'c0', type: 'function', function: { name: 'f0', arguments: '{"x":1}' } }]))
  s.push({ type: 'done', id: 't:1', seq: 3, finish_reason: 'tool_calls' })
  assert.deepEqual((await s.result).toolCalls.map(c => [c.id, c.function.name, c.function.arguments]),
    [['c0', 'f0', '{"x":1}'], ['c1', 'f1', '{}']])
})

test('an upstream without tool-call indexes: one call per new id, id-less fragments continue the last', async () => {
  const s = new ChatStream('t:1', {})
  s.push(toolDelta(1, [{ id: 'x', type: 'function', function: { name: 'a', arguments: '{"k":' } }]))
  s.push(toolDelta(2, [{ function: { arguments: '1}' } }]))
  s.push(toolDelta(3, [{ id: 'y', function: { name: 'b', arguments: '{}' } }]))
  s.push({ type: 'done', id: 't:1', seq: 4, finish_reason: 'tool_calls' })
  assert.deepEqual((await s.result).toolCalls, [
    { id: 'x', type: 'function', function: { name: 'a', arguments: '{"k":1}' } },
    { id: 'y', type: 'function', function: { name: 'b', arguments: '{}' } },
  ])
})

test('parts of one delta come in the order reasoning, refusal, text, tool calls', async () => {
  const s = new ChatStream('t:1', {})
  s.push({
    type: 'delta', id: 't:1', seq: 1, text: 'Hi',
    tool_calls: [{ index: 0, id: 'c', type: 'function', function: { name: 'f', arguments: '{' } }, { index: 1, id: 'd', type: 'function', function: { name: 'g', arguments: '' } }],
    refusal: 'no', reasoning: 'hmm',
  })
  s.push({ type: 'delta', id: 't:1', seq: 2, text: '' }) // nothing in it: no part
  s.push({ type: 'delta', id: 't:1', seq: 3, text: '!', reasoning: '' })
  s.push({ type: 'done', id: 't:1', seq: 4, finish_reason: 'stop' })
  const { parts } = await collectParts(s)
  assert.deepEqual(parts.map(p => p.type), ['reasoning', 'refusal', 'text', 'tool_call', 'tool_call', 'text'])
  assert.deepEqual(parts.slice(0, 3), [{ type: 'reasoning', text: 'hmm' }, { type: 'refusal', text: 'no' }, { type: 'text', text: 'Hi' }])
})

test('text iteration is unchanged: parts without text yield nothing, whether queued or awaited', async () => {
  const frames = [
    { type: 'delta', id: 't:1', seq: 1, text: '', reasoning: 'thinking' },
    { type: 'delta', id: 't:1', seq: 2, text: 'A' },
    toolDelta(3, [{ index: 0, id: 'c', type: 'function', function: { name: 'f', arguments: '{}' } }]),
    { type: 'delta', id: 't:1', seq: 4, text: '', refusal: 'nope' },
    { type: 'delta', id: 't:1', seq: 5, text: 'B', reasoning: 'more' },
    { type: 'done', id: 't:1', seq: 6, finish_reason: 'stop' },
  ]
  // all queued before the reader starts
  const queued = new ChatStream('t:1', {})
  for (const f of frames) queued.push(f)
  const seen = []
  for await (const t of queued) seen.push(t)
  assert.deepEqual(seen, ['A', 'B'])
  // a reader already waiting when each frame arrives
  const live = new ChatStream('t:1', {})
  const reading = (async () => { const out = []; for await (const t of live) out.push(t); return out })()
  for (const f of frames) {
    await new Promise(r => setImmediate(r))
    live.push(f)
  }
  assert.deepEqual(await reading, ['A', 'B'])
  const result = await live.result
  assert.equal(result.text, 'AB')
  assert.equal(result.reasoning, 'thinkingmore')
  assert.equal(result.refusal, 'nope')
})

test('a parts reader waiting gets each part as it arrives, and break cancels the stream', async () => {
  const cancelled = []
  const s = new ChatStream('t:1', {}, { onCancel: id => cancelled.push(id) })
  const got = []
  const reading = (async () => {
    for await (const p of s.parts()) {
      got.push(p)
      if (p.type === 'text') break
    }
  })()
  await new Promise(r => setImmediate(r))
  s.push({ type: 'delta', id: 't:1', seq: 1, text: '', reasoning: 'r' })
  await new Promise(r => setImmediate(r))
  s.push({ type: 'delta', id: 't:1', seq: 2, text: 'x' })
  await reading
  assert.deepEqual(got, [{ type: 'reasoning', text: 'r' }, { type: 'text', text: 'x' }])
  assert.deepEqual(cancelled, ['t:1'])
  await assert.rejects(s.result, { code: 'cancelled' })
})

test('result: full usage with details, completion id, system fingerprint, reasoning, refusal', async () => {
  const s = new ChatStream('t:1', {})
  const usage = {
    prompt_tokens: 12, completion_tokens: 40, total_tokens: 52,
    prompt_tokens_details: { cached_tokens: 8 }, completion_tokens_details: { reasoning_tokens: 20 },
  }
  s.push({ type: 'delta', id: 't:1', seq: 1, text: '', reasoning: 'Let me ' })
  s.push({ type: 'delta', id: 't:1', seq: 2, text: '', reasoning: 'think' })
  s.push({ type: 'delta', id: 't:1', seq: 3, text: 'Hel' })
  s.push({ type: 'delta', id: 't:1', seq: 4, text: 'lo' })
  s.push({ type: 'done', id: 't:1', seq: 5, finish_reason: 'stop', usage, cost_usd: 0.000018, completion_id: 'chatcmpl-abc', system_fingerprint: 'fp_1' })
  assert.deepEqual(await s.result, {
    usage, finish_reason: 'stop', cost_usd: 0.000018, text: 'Hello', reasoning: 'Let me think',
    refusal: null, toolCalls: [], completion_id: 'chatcmpl-abc', system_fingerprint: 'fp_1',
  })
  const refused = new ChatStream('t:2', {})
  refused.push({ type: 'delta', id: 't:2', seq: 1, text: '', refusal: "I can't " })
  refused.push({ type: 'delta', id: 't:2', seq: 2, text: '', refusal: 'help with that.' })
  refused.push({ type: 'done', id: 't:2', seq: 3, finish_reason: 'stop', usage: { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 }, usage_estimated: true })
  const r = await refused.result
  assert.equal(r.refusal, "I can't help with that.")
  assert.equal(r.text, '')
  assert.equal(r.usage_estimated, true)
  assert.ok(!('completion_id' in r) && !('system_fingerprint' in r) && !('logprobs' in r))
})

test('logprobs ride on the part they score and are concatenated in the result', async () => {
  const s = new ChatStream('t:1', {})
  const lp = (token) => ({ content: [{ token, logprob: -0.1, bytes: [...Buffer.from(token)], top_logprobs: [] }] })
  s.push({ type: 'delta', id: 't:1', seq: 1, text: 'Hi', logprobs: lp('Hi') })
  s.push({ type: 'delta', id: 't:1', seq: 2, text: ' there', logprobs: lp(' there') })
  s.push({ type: 'done', id: 't:1', seq: 3, finish_reason: 'stop' })
  const { parts } = await collectParts(s)
  assert.deepEqual(parts, [{ type: 'text', text: 'Hi', logprobs: lp('Hi') }, { type: 'text', text: ' there', logprobs: lp(' there') }])
  assert.deepEqual((await s.result).logprobs, { content: [...lp('Hi').content, ...lp(' there').content] })

  const refused = new ChatStream('t:2', {})
  const rl = { refusal: lp('No').content }
  refused.push({ type: 'delta', id: 't:2', seq: 1, text: '', refusal: 'No', logprobs: rl })
  refused.push({ type: 'done', id: 't:2', seq: 2, finish_reason: 'stop' })
  assert.deepEqual((await collectParts(refused)).parts, [{ type: 'refusal', text: 'No', logprobs: rl }])
  assert.deepEqual((await refused.result).logprobs, rl)
})

test('fragments replayed after a resume, or held behind a gap, are merged once', async () => {
  const s = new ChatStream('t:1', {})
  const first = toolDelta(1, [{ index: 0, id: 'c', type: 'function', function: { name: 'f', arguments: '{"a":' } }])
  const second = { type: 'delta', id: 't:1', seq: 2, text: '', reasoning: 'r', tool_calls: [{ index: 0, function: { arguments: '"b' } }] }
  const third = toolDelta(3, [{ index: 0, function: { arguments: '"}' } }])
  s.push(first)
  s.push(second)
  // the new leader resumed from seq 1: 2 comes again, then 4 (ahead of the gap) before 3
  assert.equal(s.push(second), 'duplicate')
  assert.equal(s.push(first), 'duplicate')
  assert.equal(s.push({ type: 'done', id: 't:1', seq: 4, finish_reason: 'tool_calls' }), 'held')
  assert.equal(s.push(third), 'applied')
  const { parts } = await collectParts(s)
  assert.equal(parts.length, 4)
  const result = await s.result
  assert.deepEqual(result.toolCalls, [{ id: 'c', type: 'function', function: { name: 'f', arguments: '{"a":"b"}' } }])
  assert.equal(result.reasoning, 'r')
})
