import { test } from 'node:test'
import assert from 'node:assert/strict'
import ChatStream from '../src/stream.js'
import { collect } from './fakes.js'

const delta = (seq, text) => ({ type: 'delta', id: 't:1', seq, text })
const done = (seq) => ({ type: 'done', id: 't:1', seq, finish_reason: 'stop', usage: { prompt_tokens: 1, completion_tokens: seq - 1 }, cost_usd: 0.5 })

test('deltas stream in order and done resolves the result', async () => {
  const s = new ChatStream('t:1', {})
  const reading = collect(s)
  assert.equal(s.push(delta(1, 'Hel')), 'applied')
  assert.equal(s.push(delta(2, 'lo')), 'applied')
  assert.equal(s.push(done(3)), 'applied')
  assert.deepEqual(await reading, { text: 'Hello', error: null })
  assert.deepEqual(await s.result, { usage: { prompt_tokens: 1, completion_tokens: 2 }, finish_reason: 'stop', cost_usd: 0.5 })
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
