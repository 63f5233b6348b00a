// The clean handover's critical path: the next leader's WebSocket handshake runs while the
// lock is still on its way, and a warm socket nobody takes is closed without a hello.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import {
  ask, closeAll, collect, FakeGateway, fakeAnswer, FakeLocks, fakeTabs, roles, settled, until,
} from './fakes.js'

test('the head of the roster opens its socket on resign, before the lock reaches it, and says hello on it', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const locks = new FakeLocks()
  const list = fakeTabs(4, { gw, locks })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const streams = list.map(t => ask(t.mux, 50))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    const others = list.filter(t => t !== leader)
    const successorId = leader.mux.part.roster.list()[1]
    const successor = others.find(t => t.mux.tabId === successorId)
    let ledAt = null
    successor.mux.on('status', s => { if (s.role === 'leader' && ledAt === null) ledAt = performance.now() })
    // a slow grant, as on a busy machine: the handshake must not wait for it
    locks.grantDelayMs = 120
    const before = gw.created.length
    leader.page.pagehide()
    const results = await Promise.all(reads)
    for (const t of others) {
      const i = list.indexOf(t)
      assert.deepEqual(results[i], { text: fakeAnswer(streams[i].id, 50), error: null })
    }
    await until(() => roles(others).filter(r => r === 'leader').length === 1, { what: 'one new leader' })
    assert.equal(successor.mux.role, 'leader', 'the head of the roster got the lock (first in its queue)')
    const opened = gw.created.slice(before)
    assert.equal(opened.length, 1, 'one socket for the handover: the warm one was used')
    assert.ok(opened[0].hello, 'the warm socket carried the hello')
    assert.ok(opened[0].createdAt < ledAt - 60, `the socket was opened before the lock came (${Math.round(ledAt - opened[0].createdAt)} ms before)`)
    assert.equal(gw.connectionsTotal, 2)
  } finally { closeAll(list); gw.stop() }
})

test('a warm socket nobody takes is closed after warmSocketMs, without a hello', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = fakeTabs(2, { gw, warmSocketMs: 60 })
  try {
    await settled(list)
    const follower = list.find(t => t.mux.role === 'follower')
    const before = gw.created.length
    follower.mux.warmUp()
    const warm = gw.created[before]
    assert.ok(warm, 'the follower opened a socket')
    await until(() => warm.readyState === 3, { what: 'the warm socket closed', timeoutMs: 1000 })
    assert.equal(warm.hello, false)
    assert.equal(gw.connectionsTotal, 1)
    assert.equal(follower.mux.role, 'follower')
  } finally { closeAll(list); gw.stop() }
})

test('a follower whose warm socket the next leader does not need closes it when that leader claims', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = fakeTabs(3, { gw, warmSocketMs: 10_000 })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const last = list.find(t => t.mux.tabId === leader.mux.part.roster.list()[2])
    const before = gw.created.length
    last.mux.warmUp() // as if it had expected to lead next
    const warm = gw.created[before]
    leader.page.pagehide()
    const others = list.filter(t => t !== leader)
    await until(() => roles(others).filter(r => r === 'leader').length === 1, { what: 'one new leader' })
    assert.equal(last.mux.role, 'follower')
    await until(() => warm.readyState === 3, { what: 'the unneeded warm socket closed on the claim', timeoutMs: 1000 })
    assert.equal(warm.hello, false)
    assert.equal(gw.connectionsTotal, 2)
  } finally { closeAll(list); gw.stop() }
})
