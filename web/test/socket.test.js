// The Socket on its own (no tabs): hello with the resume list, welcome, reconnect with
// resume, goaway, the no-reconnect close codes, and the warm WebSocket of a handover.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import Socket, { closeWarm, openWarm } from '../src/socket.js'
import { FakeGateway, until } from './fakes.js'

/** A Socket on `gw` that records its hooks' calls. */
function socketOn (gw, opts = {}) {
  const seen = { welcomes: [], frames: [], states: [], fatal: [], resumes: 0 }
  const socket = new Socket('ws://gw.test/v1/ws', {
    token: 'tok',
    WebSocket: gw.WebSocket,
    backoffBaseMs: 10,
    backoffMaxMs: 40,
    resume: () => { seen.resumes++; return opts.resume?.() ?? [] },
    onWelcome: f => seen.welcomes.push(f),
    onFrame: f => seen.frames.push(f),
    onState: s => seen.states.push(s),
    onFatal: e => seen.fatal.push(e),
    ...opts,
  })
  return { socket, seen }
}

test('hello carries the resume list; send() is refused until welcome', async () => {
  const gw = new FakeGateway()
  const { socket, seen } = socketOn(gw, { resume: () => [{ id: 'x:1', after: 3 }] })
  try {
    assert.equal(socket.send({ type: 'open', id: 'a:1', model: 'm', messages: [] }), false)
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    assert.deepEqual(gw.resumes, [[{ id: 'x:1', after: 3 }]])
    assert.equal(socket.ready, true)
    assert.deepEqual(seen.states, ['connecting', 'open'])
    assert.equal(socket.send({ type: 'open', id: 'a:1', model: 'm', messages: [{ role: 'user', content: 'chunks=2' }] }), true)
    await until(() => seen.frames.some(f => f.type === 'done'), { what: 'the stream to end' })
    assert.deepEqual(seen.frames.filter(f => f.type === 'delta').map(f => f.seq), [1, 2])
  } finally { socket.disconnect(); gw.stop() }
})

test('a dropped connection reconnects with backoff and asks for the resume list again', async () => {
  const gw = new FakeGateway()
  const { socket, seen } = socketOn(gw)
  try {
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    gw.dropAll()
    await until(() => seen.welcomes.length === 2, { what: 'the second welcome' })
    assert.equal(seen.resumes, 2)
    assert.deepEqual(seen.states, ['connecting', 'open', 'reconnecting', 'open'])
    assert.equal(gw.connectionsTotal, 2)
  } finally { socket.disconnect(); gw.stop() }
})

test('goaway: the old connection stays until the new one is welcomed', async () => {
  const gw = new FakeGateway()
  // reconnect at the end of reconnect_after_ms, so the test sees the time in between
  const { socket, seen } = socketOn(gw, { random: () => 0.999 })
  try {
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    const first = [...gw.sockets][0]
    gw.goawayAll(300)
    await until(() => socket.old !== null, { what: 'the old connection set aside' })
    assert.equal(first.readyState, 1, 'still open while the new one connects')
    await until(() => seen.welcomes.length === 2, { what: 'the new welcome' })
    assert.equal(first.readyState, 3, 'closed once the new one took over')
    assert.equal(socket.old, null)
  } finally { socket.disconnect(); gw.stop() }
})

test('close 4429 (over the per-user cap) gives up at once with too_many_connections', async () => {
  const gw = new FakeGateway({ maxConnections: 0 })
  const { socket, seen } = socketOn(gw)
  try {
    socket.connect()
    await until(() => seen.fatal.length === 1, { what: 'the fatal error' })
    assert.equal(seen.fatal[0].code, 'too_many_connections')
    await new Promise(r => setTimeout(r, 100)) // several backoff periods
    assert.equal(gw.attempts, 1, 'no retry')
    assert.equal(socket.state, 'closed')
  } finally { socket.disconnect(); gw.stop() }
})

test('a warm WebSocket carries the first hello: no second socket is opened', async () => {
  const gw = new FakeGateway()
  const warm = openWarm(gw.WebSocket, 'ws://gw.test/v1/ws')
  await until(() => warm.readyState === 1, { what: 'the warm socket open' })
  assert.equal(warm.hello, false, 'nothing said on it yet')
  const { socket, seen } = socketOn(gw, { warm })
  try {
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    assert.equal(gw.created.length, 1)
    assert.equal(warm.hello, true)
  } finally { socket.disconnect(); gw.stop() }
})

test('a warm WebSocket still connecting says hello once it opens; a dead one is replaced', async () => {
  const gw = new FakeGateway()
  const connecting = openWarm(gw.WebSocket, 'ws://gw.test/v1/ws')
  const a = socketOn(gw, { warm: connecting })
  const dead = openWarm(gw.WebSocket, 'ws://gw.test/v1/ws')
  closeWarm(dead)
  const b = socketOn(gw, { warm: dead })
  try {
    a.socket.connect() // before the warm socket's open event
    b.socket.connect()
    await until(() => a.seen.welcomes.length === 1 && b.seen.welcomes.length === 1, { what: 'both welcomed' })
    assert.equal(connecting.hello, true)
    assert.equal(dead.hello, false)
    assert.equal(gw.created.length, 3, 'the two warm ones and one replacing the dead one')
  } finally { a.socket.disconnect(); b.socket.disconnect(); gw.stop() }
})

test('disconnect() closes a warm WebSocket that was never used', async () => {
  const gw = new FakeGateway()
  const warm = openWarm(gw.WebSocket, 'ws://gw.test/v1/ws')
  const { socket } = socketOn(gw, { warm })
  socket.disconnect()
  await until(() => warm.readyState === 3, { what: 'the warm socket closed' })
  assert.equal(gw.attempts, 0)
  gw.stop()
})

test('hello asks for batch; a batched message is each of its frames in order, then one onBatchEnd', async () => {
  const gw = new FakeGateway()
  const during = []
  let ends = 0
  const { socket, seen } = socketOn(gw, {
    onFrame: f => { seen.frames.push(f); during.push(socket.delivering) },
    onBatchEnd: () => ends++,
  })
  try {
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    assert.equal(seen.welcomes[0].batch, true)
    const ws = gw.created[0]
    // three frames written in one task: one message, an array
    for (const seq of [1, 2, 3]) gw.frame(ws, { type: 'delta', id: 'a:1', seq, text: `${seq} ` })
    await until(() => seen.frames.length === 3, { what: 'three frames' })
    assert.deepEqual(seen.frames.map(f => f.seq), [1, 2, 3])
    assert.deepEqual(gw.messages.at(-1), [3, true])
    assert.equal(ends, 1, 'once after the array (the welcome came before the connection was batched)')
    assert.deepEqual(during, [true, true, true], 'routed inside the batch: onBatchEnd follows')
    assert.equal(socket.delivering, false)
    // a lone frame on a batched connection is a bare object, and a batch of one
    gw.frame(ws, { type: 'delta', id: 'a:1', seq: 4, text: '4 ' })
    await until(() => seen.frames.length === 4, { what: 'the fourth frame' })
    assert.deepEqual(gw.messages.at(-1), [1, false])
    assert.equal(ends, 2)
  } finally { socket.disconnect(); gw.stop() }
})

test('a gateway without batch (v1): one frame per message, no onBatchEnd, frames as before', async () => {
  const gw = new FakeGateway({ knowsBatch: false })
  let ends = 0
  const { socket, seen } = socketOn(gw, { onBatchEnd: () => ends++ })
  try {
    socket.connect()
    await until(() => seen.welcomes.length === 1, { what: 'welcome' })
    assert.equal(seen.welcomes[0].batch, undefined)
    const ws = gw.created[0]
    for (const seq of [1, 2, 3]) gw.frame(ws, { type: 'delta', id: 'a:1', seq, text: `${seq} ` })
    await until(() => seen.frames.length === 3, { what: 'three frames' })
    assert.deepEqual(seen.frames.map(f => f.seq), [1, 2, 3])
    assert.deepEqual(gw.messages.slice(-3), [[1, false], [1, false], [1, false]])
    assert.equal(ends, 0)
  } finally { socket.disconnect(); gw.stop() }
})
