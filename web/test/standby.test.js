// The warm standby: the follower next in line holds a welcomed connection, and a handover
// moves every stream onto it with one `resume` frame instead of a new handshake.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import {
  ask, closeAll, collect, FakeGateway, fakeAnswer, fakeTabs, roles, settled, until,
} from './fakes.js'

/** The tab `leader` names as next in line. */
const headOf = (list, leader) => list.find(t => t.mux.tabId === leader.mux.part.roster.list()[1])

/** Once the tabs settled: the leader and the head of its roster, whose standby is welcomed. */
async function standbyReady (list) {
  await settled(list)
  const leader = list.find(t => t.mux.role === 'leader')
  const head = headOf(list, leader)
  await until(() => head.mux.standby?.ready, { what: 'the standby welcomed' })
  return { leader, head }
}

test('the head of the roster holds a welcomed standby, and a closing leader hands over on it with no new socket', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = fakeTabs(4, { gw, standby: true })
  try {
    const { leader, head } = await standbyReady(list)
    assert.equal(gw.live, 2, 'the leader and one standby: no other tab holds one')
    const streams = list.map(t => ask(t.mux, 60))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    const before = gw.created.length
    leader.page.pagehide()
    const results = await Promise.all(reads)
    const others = list.filter(t => t !== leader)
    for (const t of others) {
      const i = list.indexOf(t)
      assert.deepEqual(results[i], { text: fakeAnswer(streams[i].id, 60), error: null })
    }
    await until(() => roles(others).filter(r => r === 'leader').length === 1, { what: 'one new leader' })
    assert.equal(head.mux.role, 'leader')
    assert.equal(gw.resumeFrames.length, 1, 'one resume frame moved the streams')
    assert.equal(gw.resumeFrames[0].length, 3, 'every survivor\'s stream in it')
    // the only socket opened since is the new head's standby, never the leader's
    const opened = gw.created.slice(before)
    assert.ok(opened.every(ws => ws !== head.mux.part.owner.socket.conn.ws), 'the leader\'s connection is the old standby')
    const next = headOf(list, head)
    await until(() => next.mux.standby?.ready, { what: 'the new head\'s standby' })
    assert.equal(opened.length, 1, 'one new socket: the new head\'s standby')
  } finally { closeAll(list); gw.stop() }
})

test('a gateway without `resume` gets a hello on a new socket instead, and nothing is lost', async () => {
  const gw = new FakeGateway({ chunkMs: 4, knowsResume: false })
  const list = fakeTabs(3, { gw, standby: true })
  try {
    const { leader, head } = await standbyReady(list)
    const streams = list.map(t => ask(t.mux, 60))
    const reads = streams.map(collect)
    await until(() => streams.every(s => s.lastSeq >= 5), { what: 'streams under way' })
    const hellos = gw.resumes.length
    leader.page.pagehide()
    const results = await Promise.all(reads)
    for (const t of list.filter(t => t !== leader)) {
      const i = list.indexOf(t)
      assert.deepEqual(results[i], { text: fakeAnswer(streams[i].id, 60), error: null })
    }
    assert.equal(gw.resumeFrames.length, 0)
    assert.ok(gw.resumes.slice(hellos).some(r => r.length === 2), 'a hello resumed both survivors\' streams')
  } finally { closeAll(list); gw.stop() }
})

test('a standby refused with 4429 is not tried again for standbyRetryMs, and the real tabs are not refused', async () => {
  const gw = new FakeGateway({ chunkMs: 4, maxConnections: 1 })
  const list = fakeTabs(3, { gw, standby: true, standbyRetryMs: 60_000 })
  try {
    await settled(list)
    const leader = list.find(t => t.mux.role === 'leader')
    const head = headOf(list, leader)
    await until(() => gw.refusedCap === 1, { what: 'the standby refused' })
    // heartbeats go on naming the head; it must not knock again
    await new Promise(resolve => setTimeout(resolve, 400))
    assert.equal(gw.refusedCap, 1, 'one refusal: no retry within standbyRetryMs')
    assert.equal(head.mux.standby, null)
    const s = ask(head.mux, 10)
    assert.deepEqual(await collect(s), { text: fakeAnswer(s.id, 10), error: null })
  } finally { closeAll(list); gw.stop() }
})

test('no standby under a connection cap of 2: the user\'s other window keeps its room', async () => {
  const gw = new FakeGateway({ chunkMs: 4, maxConnections: 2 })
  const list = fakeTabs(3, { gw, standby: true })
  try {
    await settled(list)
    await until(() => gw.attempts >= 2, { what: 'the standby\'s hello' })
    await until(() => gw.live === 1, { what: 'the standby closed' })
    await new Promise(resolve => setTimeout(resolve, 300))
    assert.equal(gw.attempts, 2, 'not tried again')
  } finally { closeAll(list); gw.stop() }
})

test('when the head of the roster changes, the old standby closes and the new head opens one', async () => {
  const gw = new FakeGateway({ chunkMs: 4 })
  const list = fakeTabs(3, { gw, standby: true })
  try {
    const { leader, head } = await standbyReady(list)
    const ws = head.mux.standby.ws
    head.mux.close()
    await until(() => ws.readyState === 3, { what: 'the old standby closed' })
    const next = list.find(t => t !== leader && t !== head)
    await until(() => headOf(list, leader) === next && next.mux.standby?.ready, { what: 'the new head\'s standby' })
    assert.equal(gw.live, 2)
  } finally { closeAll(list); gw.stop() }
})
