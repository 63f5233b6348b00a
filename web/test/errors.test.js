import { test } from 'node:test'
import assert from 'node:assert/strict'
import MuxError from '../src/errors.js'

const upstreamFrame = {
  type: 'error', id: 't:1', code: 'upstream_error', message: "This model's maximum context length is 8192 tokens",
  status: 400, upstream: { type: 'invalid_request_error', code: 'context_length_exceeded', param: 'messages' },
}

/** Sends `value` through a real BroadcastChannel, as the leader does to its followers. */
async function overTheBus (value) {
  const name = `errors-${process.pid}-${Math.random()}`
  const tx = new BroadcastChannel(name)
  const rx = new BroadcastChannel(name)
  try {
    const got = new Promise(resolve => { rx.onmessage = (e) => resolve(e.data) })
    tx.postMessage(value)
    return await got
  } finally { tx.close(); rx.close() }
}

test('an upstream error frame gives code, status and what the upstream said', () => {
  const e = MuxError.fromFrame(upstreamFrame)
  assert.ok(e instanceof MuxError && e instanceof Error)
  assert.equal(e.code, 'upstream_error')
  assert.equal(e.message, upstreamFrame.message)
  assert.equal(e.id, 't:1')
  assert.equal(e.status, 400)
  assert.deepEqual(e.upstream, upstreamFrame.upstream)
})

test('toJSON and fromFrame carry every field across a BroadcastChannel', async () => {
  const e = MuxError.fromFrame({ ...upstreamFrame, retry_after_ms: 1500 })
  const back = MuxError.fromFrame(await overTheBus(e.toJSON()))
  for (const key of ['code', 'message', 'id', 'retryAfterMs', 'status', 'upstream']) {
    assert.deepEqual(back[key], e[key], key)
  }
  assert.equal(back.retryAfterMs, 1500)
  // an Error itself loses its own fields on the way: that is why toJSON exists
  const raw = await overTheBus(e)
  assert.equal(raw.status, undefined)
})

test('an error not caused by the upstream has neither status nor upstream', async () => {
  const e = MuxError.fromFrame({ type: 'error', id: null, code: 'rate_limited', message: 'slow down', retry_after_ms: 200 })
  assert.ok(!('status' in e) && !('upstream' in e))
  const json = e.toJSON()
  assert.ok(!('status' in json) && !('upstream' in json))
  const back = MuxError.fromFrame(await overTheBus(json))
  assert.equal(back.retryAfterMs, 200)
  assert.equal(back.id, null)
  assert.ok(!('status' in back) && !('upstream' in back))
})

test('upstream keeps only string type, code and param; a numeric code becomes its string', () => {
  const e = MuxError.fromFrame({ code: 'upstream_error', message: 'm', status: 429, upstream: { code: 1008, type: null, param: 7, extra: 'x' } })
  assert.deepEqual(e.upstream, { code: '1008' })
  assert.ok(!('upstream' in MuxError.fromFrame({ code: 'upstream_error', upstream: { type: 1 } })))
  assert.ok(!('status' in MuxError.fromFrame({ code: 'upstream_error', status: '400' })))
  const built = new MuxError('upstream_error', 'm', { status: 503, upstream: { type: 'server_error' } })
  assert.deepEqual(built.toJSON(), { code: 'upstream_error', message: 'm', id: null, retry_after_ms: undefined, status: 503, upstream: { type: 'server_error' } })
})
