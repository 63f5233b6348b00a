import { test } from 'node:test'
import assert from 'node:assert/strict'
import Timer, { backoffDelay } from '../src/timer.js'

test('backoff doubles per attempt within [d/2, d] and stops at the cap', () => {
  const opts = { baseMs: 100, maxMs: 1000 }
  assert.equal(backoffDelay(1, opts, () => 0), 50)
  assert.equal(backoffDelay(1, opts, () => 0.999999), 100)
  assert.equal(backoffDelay(2, opts, () => 0), 100)
  assert.equal(backoffDelay(3, opts, () => 1), 400)
  assert.equal(backoffDelay(4, opts, () => 1), 800)
  assert.equal(backoffDelay(5, opts, () => 1), 1000) // 1600 capped
  assert.equal(backoffDelay(5, opts, () => 0), 500)
  assert.equal(backoffDelay(1e9, opts, () => 0.5), 750) // no overflow to Infinity/NaN
  assert.equal(backoffDelay(0, opts, () => 0), 50) // treated as the first attempt
})

test('backoff jitter spreads clients out', () => {
  const seen = new Set()
  for (let i = 0; i < 50; i++) seen.add(backoffDelay(6))
  assert.ok(seen.size > 10, `only ${seen.size} distinct delays`)
  for (const d of seen) assert.ok(d >= 2500 && d <= 5000, `delay ${d} outside [2500, 5000]`)
})

test('Timer counts tries, reset starts over, fireNow runs at once', async () => {
  const delays = []
  let calls = 0
  const t = new Timer(() => { calls++ }, (tries) => { delays.push(tries); return 5 })
  t.scheduleTimeout()
  await new Promise(r => setTimeout(r, 20))
  t.scheduleTimeout()
  await new Promise(r => setTimeout(r, 20))
  assert.deepEqual(delays, [1, 2])
  assert.equal(calls, 2)
  t.reset()
  t.scheduleTimeout(10_000)
  assert.ok(t.pending)
  t.fireNow()
  assert.equal(calls, 3)
  assert.equal(t.pending, false)
  assert.equal(t.tries, 1)
})
