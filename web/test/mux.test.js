// The cross-tab logic end to end in node: several Mux instances ("tabs") share node's
// BroadcastChannel and a fake Web Locks manager, and talk to an in-memory fake gateway.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import {
  ask, closeAll, collect, collectParts, FAKE_TOOL_USAGE, FakeGateway, fakeAnswer, fakeTabs,
  fakeToolAnswer, fakeUpstreamError, hang, roles, settled, until,
} from './fakes.js'

const tabs = fakeTabs

test('many tabs, one socket: every stream exact, one connection', async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const list = tabs(4, { gw })
  try {
    await settled(list)
    const streams = list.map(t => ask(t.mux, 20))
    const results = await Promise.all(streams.map(collect))
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 20), error: null }))
    assert.equal(gw.connectionsTotal, 1)
    const usage = await streams[1].result
    assert.equal(usage.finish_reason, 'stop')
    assert.ok(streams.every((s, i) => s.id.startsWith(list[i].mux.tabId + ':')))
  } finally { closeAll(list); gw.stop() }
})

test('leader leaves mid-stream: followers finish exact, a new leader resumes', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const others = list.filter(t => t !== leader)
    const streams = list.map(t => ask(t.mux, 60))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    const abortedBefore = gw.aborted
    leader.page.pagehide()
    const results = await Promise.all(reads)
    const li = list.indexOf(leader)
    assert.equal(results[li].error?.code, 'closed')
    for (const t of others) {
      const i = list.indexOf(t)
      assert.deepEqual(results[i], { text: fakeAnswer(streams[i].id, 60), error: null })
    }
    await until(() => roles(others).filter(r => r === 'leader').length === 1 && others.every(t => t.mux.tabs === 2), { what: 'new leader' })
    assert.equal(gw.connectionsTotal, 2)
    assert.equal(gw.aborted, abortedBefore + 1, "the leaving leader's own stream was cancelled")
    const resumed = gw.resumes.at(-1).map(r => r.id).sort()
    assert.deepEqual(resumed, others.map(t => streams[list.indexOf(t)].id).sort())
  } finally { closeAll(list); gw.stop() }
})

test('follower leaves mid-stream: its upstream stream is cancelled', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    const streams = list.map(t => ask(t.mux, 40))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 3), { what: 'streams under way' })
    follower.page.pagehide()
    await until(() => gw.aborted === 1, { what: 'upstream abort' })
    const results = await Promise.all(reads)
    list.forEach((t, i) => {
      if (t === follower) assert.equal(results[i].error.code, 'closed')
      else assert.deepEqual(results[i], { text: fakeAnswer(streams[i].id, 40), error: null })
    })
  } finally { closeAll(list); gw.stop() }
})

test('a follower that goes silent is dropped by heartbeat and its stream cancelled', async () => {
  const gw = new FakeGateway({ chunkMs: 10 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    const s = ask(follower.mux, 200)
    await until(() => s.lastSeq >= 2, { what: 'stream under way' })
    // simulate a crashed renderer: no pagehide, no more messages
    follower.mux.bus.close()
    follower.mux.part.stop()
    follower.mux.running = false
    await until(() => gw.aborted === 1, { what: 'vanished follower cancelled', timeoutMs: 3000 })
    await until(() => list.find(t => t !== follower).mux.tabs === 1, { what: 'roster shrinks' })
  } finally { closeAll(list); gw.stop() }
})

test('dropped socket: reconnect with backoff and resume exact text', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const streams = list.map(t => ask(t.mux, 60))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    gw.refuse = true
    gw.dropAll()
    await until(() => list.every(t => t.mux.connection === 'reconnecting'), { what: 'everyone sees reconnecting' })
    await new Promise(r => setTimeout(r, 100))
    gw.refuse = false
    const results = await Promise.all(reads)
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 60), error: null }))
    assert.ok(gw.connectionsTotal >= 2)
    assert.equal(gw.sockets.size, 1)
  } finally { closeAll(list); gw.stop() }
})

test('goaway: streams move to a new connection without loss', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const streams = list.map(t => ask(t.mux, 50))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    gw.goawayAll(30)
    const results = await Promise.all(reads)
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 50), error: null }))
    assert.equal(gw.connectionsTotal, 2)
    await until(() => gw.sockets.size === 1, { what: 'old connection closed' })
  } finally { closeAll(list); gw.stop() }
})

test('gateway restart: running streams end with not_found, new ones work', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const streams = list.map(t => ask(t.mux, 400))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 2), { what: 'streams under way' })
    gw.restart()
    const results = await Promise.all(reads)
    for (const r of results) assert.equal(r.error?.code, 'not_found')
    await until(() => list.every(t => t.mux.connection === 'open'), { what: 'reconnected' })
    const again = list.map(t => ask(t.mux, 5))
    const more = await Promise.all(again.map(collect))
    more.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(again[i].id, 5), error: null }))
  } finally { closeAll(list); gw.stop() }
})

test('fallback without BroadcastChannel: each tab solo with its own socket', async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const list = tabs(3, { gw, shared: false })
  try {
    assert.deepEqual(roles(list), ['solo', 'solo', 'solo'])
    const streams = list.map(t => ask(t.mux, 10))
    const results = await Promise.all(streams.map(collect))
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 10), error: null }))
    assert.equal(gw.connectionsTotal, 3)
  } finally { closeAll(list); gw.stop() }
})

test('a hung leader is replaced by a follower that steals the lock', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const others = list.filter(t => t !== leader)
    const streams = others.map(t => ask(t.mux, 120))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 3), { what: 'streams under way' })
    // hang it: it holds the lock and its socket, but hears and says nothing
    hang(leader)
    const results = await Promise.all(reads)
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 120), error: null }))
    assert.equal(roles(others).filter(r => r === 'leader').length, 1)
  } finally { closeAll(list); gw.stop() }
})

test('freeze hands leadership over; resume rejoins as follower', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const others = list.filter(t => t !== leader)
    const streams = others.map(t => ask(t.mux, 80))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 3), { what: 'streams under way' })
    leader.page.freeze()
    assert.notEqual(leader.mux.role, 'leader')
    await until(() => roles(others).includes('leader'), { what: 'new leader' })
    const results = await Promise.all(reads)
    results.forEach((r, i) => assert.deepEqual(r, { text: fakeAnswer(streams[i].id, 80), error: null }))
    leader.page.resume()
    await settled(list)
    assert.equal(leader.mux.role, 'follower')
  } finally { closeAll(list); gw.stop() }
})

test('bfcache: pagehide(persisted) then pageshow rejoins', async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    follower.page.pagehide(true)
    await until(() => list.find(t => t !== follower).mux.tabs === 1, { what: 'follower gone' })
    follower.page.pageshow(true)
    await settled(list)
    const s = ask(follower.mux, 5)
    assert.deepEqual(await collect(s), { text: fakeAnswer(s.id, 5), error: null })
  } finally { closeAll(list); gw.stop() }
})

test('bfcache in fallback: a stream asked for while hidden goes out on the new socket after pageshow', async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const [solo] = tabs(1, { gw, shared: false })
  try {
    await until(() => solo.mux.connection === 'open', { what: 'the solo socket' })
    solo.page.pagehide(true)
    const s = ask(solo.mux, 5) // the page's script still runs on its way into the cache
    const read = collect(s)
    await new Promise(r => setTimeout(r, 30))
    assert.equal(gw.opened, 0, 'nothing sent while hidden')
    solo.page.pageshow(true)
    assert.deepEqual(await read, { text: fakeAnswer(s.id, 5), error: null })
    assert.equal(gw.opened, 1, 'opened once, on the new socket')
    assert.deepEqual(gw.resumes.at(-1), [], 'sent as new, not resumed: the gateway never had it')
    assert.equal(gw.connectionsTotal, 2)
  } finally { solo.mux.close(); gw.stop() }
})

test('a refused token string is fatal: streams fail with unauthorized', async () => {
  const gw = new FakeGateway()
  const [t] = tabs(1, { gw, shared: false, token: 'bad' })
  const errors = []
  t.mux.on('error', e => errors.push(e.code))
  try {
    const s = ask(t.mux, 5)
    const r = await collect(s)
    assert.equal(r.error?.code, 'unauthorized')
    assert.equal(t.mux.connection, 'closed')
    assert.ok(errors.includes('unauthorized'))
    const later = await collect(ask(t.mux, 5))
    assert.equal(later.error?.code, 'unauthorized', 'new streams fail at once instead of waiting forever')
  } finally { t.mux.close(); gw.stop() }
})

test('a token function is called again after 4401 and the stream still gets through', async () => {
  const gw = new FakeGateway()
  let calls = 0
  const [t] = tabs(1, { gw, shared: false, token: async () => (++calls === 1 ? 'bad' : 'good') })
  try {
    const s = ask(t.mux, 5)
    assert.deepEqual(await collect(s), { text: fakeAnswer(s.id, 5), error: null })
    assert.equal(calls, 2)
  } finally { t.mux.close(); gw.stop() }
})

test('the send buffer is bounded while no connection is up', async () => {
  const gw = new FakeGateway()
  gw.refuse = true
  const [t] = tabs(1, { gw, shared: false, sendBufferLimit: 2 })
  try {
    const a = ask(t.mux, 3)
    const b = ask(t.mux, 3)
    const c = ask(t.mux, 3)
    assert.equal((await collect(c)).error?.code, 'buffer_full')
    gw.refuse = false
    assert.deepEqual(await collect(a), { text: fakeAnswer(a.id, 3), error: null })
    assert.deepEqual(await collect(b), { text: fakeAnswer(b.id, 3), error: null })
  } finally { t.mux.close(); gw.stop() }
})

test('cancel and AbortSignal stop the upstream stream', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    const ac = new AbortController()
    const s = follower.mux.chat({ model: 'm', messages: [{ role: 'user', content: 'chunks=500' }], signal: ac.signal })
    await until(() => s.lastSeq >= 2, { what: 'under way' })
    ac.abort()
    assert.deepEqual((await collect(s)).error, null)
    await assert.rejects(s.result, { code: 'cancelled' })
    await until(() => gw.aborted === 1, { what: 'upstream abort' })
    const l = list.find(t => t.mux.role === 'leader')
    const s2 = ask(l.mux, 500)
    await until(() => s2.lastSeq >= 2, { what: 'under way' })
    s2.cancel()
    await until(() => gw.aborted === 2, { what: 'leader stream abort' })
  } finally { closeAll(list); gw.stop() }
})

test('status reports role, connection, tabs and queue position', async () => {
  const gw = new FakeGateway()
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const seen = []
    const follower = list.find(t => t.mux.role === 'follower')
    follower.mux.on('status', s => seen.push(s))
    const st = seen.at(-1)
    assert.equal(st.role, 'follower')
    assert.equal(st.connection, 'open')
    assert.equal(st.tabs, 2)
    assert.equal(st.user, 'u')
    assert.equal(st.tier, 'pro')
    const s = ask(follower.mux, 50)
    follower.mux.deliverLocal({ type: 'queued', id: s.id, position: 2 })
    assert.deepEqual(seen.at(-1).queue, [{ id: s.id, position: 2 }])
    s.cancel()
  } finally { closeAll(list); gw.stop() }
})

test('a visible follower takes over from a leader hidden for preferVisibleMs', async () => {
  const gw = new FakeGateway({ chunkMs: 5 })
  const list = tabs(2, { gw, preferVisibleMs: 200 })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const follower = list.find(t => t !== leader)
    const s = ask(follower.mux, 80)
    const reading = collect(s)
    await until(() => s.lastSeq >= 3, { what: 'under way' })
    leader.page.document.visibilityState = 'hidden'
    leader.page.document.dispatchEvent(new Event('visibilitychange'))
    await until(() => follower.mux.role === 'leader', { what: 'the visible tab to lead' })
    assert.deepEqual(await reading, { text: fakeAnswer(s.id, 80), error: null })
    await until(() => leader.mux.role === 'follower', { what: 'the hidden tab to follow' })
  } finally { closeAll(list); gw.stop() }
})

test('followers get reasoning and tool calls through the leader, merged once across a leader handover', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = tabs(3, { gw })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const followers = list.filter(t => t !== leader)
    const shape = { reasoning: 12, tools: 3 }
    const streams = followers.map(t => t.mux.chat({ model: 'm', messages: [{ role: 'user', content: 'weather? reasoning=12 tools=3' }] }))
    const reads = streams.map(collectParts)
    const expected = streams.map(s => fakeToolAnswer(s.id, shape))
    // the leader leaves while the followers are inside the tool calls' fragments
    await until(() => streams.every(s => s.lastSeq >= shape.reasoning + shape.tools + 2), { what: 'tool calls under way' })
    leader.page.pagehide()
    const results = await Promise.all(reads)
    for (const [i, s] of streams.entries()) {
      const { parts, error } = results[i]
      assert.equal(error, null)
      const want = expected[i]
      // every fragment exactly once, in order: nothing replayed by the new leader was merged twice
      const fromFrames = want.frames.flatMap(f => f.reasoning ? [{ type: 'reasoning', text: f.reasoning }] : f.tool_calls.map(c => ({
        type: 'tool_call', index: c.index, ...(c.id ? { id: c.id, name: c.function.name } : {}), arguments: c.function.arguments,
      })))
      assert.deepEqual(parts, fromFrames)
      const result = await s.result
      assert.deepEqual(result.toolCalls, want.toolCalls)
      assert.deepEqual(result.toolCalls.map(c => JSON.parse(c.function.arguments).stream), [s.id, s.id, s.id])
      assert.equal(result.reasoning, want.reasoning)
      assert.equal(result.text, '')
      assert.equal(result.finish_reason, 'tool_calls')
      assert.deepEqual(result.usage, FAKE_TOOL_USAGE)
      assert.equal(result.completion_id, `chatcmpl-${s.id}`)
      assert.equal(result.system_fingerprint, 'fp_fake')
    }
    assert.equal(gw.connectionsTotal, 2, 'the new leader resumed them on one new connection')
  } finally { closeAll(list); gw.stop() }
})

test("an upstream's error reaches a follower with its status and the upstream's code", async () => {
  const gw = new FakeGateway({ chunkMs: 3 })
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    const s = follower.mux.chat({ model: 'm', messages: [{ role: 'user', content: 'too long chunks=2 fail=400' }] })
    const { text, error } = await collect(s)
    assert.equal(text, fakeAnswer(s.id, 2))
    const want = fakeUpstreamError(s.id, 400)
    assert.equal(error.code, 'upstream_error')
    assert.equal(error.status, 400)
    assert.deepEqual(error.upstream, want.upstream)
    assert.equal(error.id, s.id)
    await assert.rejects(s.result, { code: 'upstream_error', status: 400, upstream: want.upstream })
  } finally { closeAll(list); gw.stop() }
})

test('a connection error reaches every tab with all its fields', async () => {
  const gw = new FakeGateway()
  const list = tabs(2, { gw })
  try {
    await settled(list)
    const seen = list.map(() => [])
    list.forEach((t, i) => t.mux.on('error', e => seen[i].push(e)))
    const ws = [...gw.sockets].find(w => w.hello)
    gw.frame(ws, { type: 'error', id: null, code: 'rate_limited', message: 'too many frames', retry_after_ms: 750 })
    await until(() => seen.every(s => s.length === 1), { what: 'the error in both tabs' })
    const [leaderSaw, followerSaw] = list[0].mux.role === 'leader' ? seen : [seen[1], seen[0]]
    assert.equal(followerSaw[0].retryAfterMs, 750)
    assert.deepEqual(followerSaw[0].toJSON(), leaderSaw[0].toJSON())
  } finally { closeAll(list); gw.stop() }
})
