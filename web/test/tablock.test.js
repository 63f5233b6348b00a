// Issue 10, the idle share: a follower's close or crash reaches the leader as the grant of
// that tab's own Web Lock, so followers that hold it answer only one heartbeat in
// `tabAckEvery` (the acks are left to catch a tab that is alive but stuck); without the lock
// they answer every heartbeat, as before.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ask, closeAll, FakeGateway, FakeLocks, fakeTabs, hang, settled, until } from './fakes.js'

const sleep = ms => new Promise(r => setTimeout(r, ms))
const leaderOf = list => list.find(t => t.mux.role === 'leader')

/** Counts the `ack`s the leader reads. */
function countAcks (t) {
  const count = { n: 0 }
  const inner = t.mux.bus.onMessage
  t.mux.bus.onMessage = (m) => { if (m.t === 'ack') count.n++; inner(m) }
  return count
}

/**
 * A renderer crash of a follower: it says nothing more (no pagehide, no `bye`, no acks) and the
 * browser frees its locks. On a shim without tab locks only the silence is there.
 */
function crashFollower (t) {
  t.mux.part.stop()
  t.mux.bus.close()
  t.mux.running = false
  t.mux.releaseTabLock?.()
}

/** Web Locks that refuse the tab locks (only the election's lock works). */
class NoTabLocks extends FakeLocks {
  request (name, options, cb) {
    if (name.includes(':tab:')) return Promise.reject(new DOMException('refused', 'NotSupportedError'))
    return super.request(name, options, cb)
  }
}

test('a crashed follower is dropped when its tab lock is granted, not heartbeats later', async () => {
  const gw = new FakeGateway({ chunkMs: 20 })
  // heartbeats of 1 s and 4 misses: by the heartbeat count alone the leader would need ~5 s
  const list = fakeTabs(3, { gw, tabHeartbeatMs: 1000, tabMaxMissed: 4 })
  try {
    await settled(list)
    const leader = leaderOf(list)
    const victim = list.find(t => t.mux.role === 'follower')
    const stream = ask(victim.mux, 2000) // 40 s of chunks: still running when it crashes
    await until(() => gw.opened === 1, { what: 'the victim\'s stream opened' })
    await sleep(100)
    const t0 = Date.now()
    crashFollower(victim)
    await until(() => leader.mux.tabs === 2 && gw.aborted === 1, { timeoutMs: 1500, what: 'the crashed tab dropped and its stream cancelled upstream' })
    assert.ok(Date.now() - t0 < 1500)
    assert.ok(!leader.mux.part.roster.has(victim.mux.tabId))
    stream.cancel?.()
  } finally { closeAll(list); gw.stop() }
})

test('followers that hold their tab lock answer one heartbeat in tabAckEvery', async () => {
  const gw = new FakeGateway()
  const list = fakeTabs(4, { gw, tabAckEvery: 10, tabMaxMissed: 30 })
  try {
    await settled(list)
    const leader = leaderOf(list)
    await until(() => list.every(t => t.mux.holdsTabLock) && leader.mux.part.watches.size === 3, { what: 'every tab lock held and watched' })
    const acks = countAcks(leader)
    const beats0 = leader.mux.part.beats
    // 30 heartbeats of 40 ms, however late a loaded box fires them (a fixed 1.2 s saw 14)
    await until(() => leader.mux.part.beats - beats0 >= 30, { timeoutMs: 20000, what: '30 heartbeats' })
    const beats = leader.mux.part.beats - beats0
    assert.ok(beats >= 15, `heartbeats went out (${beats})`)
    // 3 followers: every beat would be 3 × beats acks; one in ten, at most 3 × (beats / 10 + 1)
    assert.ok(acks.n <= 3 * (Math.ceil(beats / 10) + 1), `${acks.n} acks for ${beats} heartbeats`)
    assert.ok(acks.n >= 3, `the ack beats were answered (${acks.n})`)
    assert.equal(leader.mux.tabs, 4, 'nobody was dropped')
  } finally { closeAll(list); gw.stop() }
})

test('a stuck follower that holds its lock is still dropped, after as long a silence as before', async () => {
  const gw = new FakeGateway()
  const list = fakeTabs(3, { gw, tabAckEvery: 4, tabMaxMissed: 4 })
  try {
    await settled(list)
    const leader = leaderOf(list)
    await until(() => leader.mux.part.watches.size === 2, { what: 'both tab locks watched' })
    const stuck = list.find(t => t.mux.role === 'follower')
    const beats0 = leader.mux.part.beats
    hang(stuck) // alive (its lock stays held) but it hears and says nothing
    clearInterval(stuck.mux.part.beatTimer)
    await until(() => leader.mux.tabs === 2, { timeoutMs: 4000, what: 'the stuck follower dropped' })
    const beats = leader.mux.part.beats - beats0
    assert.ok(!leader.mux.part.roster.has(stuck.mux.tabId))
    // more than tabMaxMissed (4) heartbeats of silence, rounded up to the next ack beat
    assert.ok(beats >= 5 && beats <= 9, `dropped after ${beats} heartbeats`)
  } finally { closeAll(list); gw.stop() }
})

test('without tab locks followers answer every heartbeat and a silent one goes as before', async () => {
  const gw = new FakeGateway()
  const list = fakeTabs(3, { gw, locks: new NoTabLocks(), tabAckEvery: 1000 })
  try {
    await settled(list)
    const leader = leaderOf(list)
    const acks = countAcks(leader)
    const beats0 = leader.mux.part.beats
    await sleep(400)
    const beats = leader.mux.part.beats - beats0
    assert.equal(leader.mux.part.watches.size, 0)
    assert.ok(acks.n >= 2 * (beats - 2), `${acks.n} acks for ${beats} heartbeats from 2 followers`)
    const silent = list.find(t => t.mux.role === 'follower')
    hang(silent)
    clearInterval(silent.mux.part.beatTimer)
    // 3 misses of 40 ms: well before one ack beat in 1000
    await until(() => leader.mux.tabs === 2, { timeoutMs: 1500, what: 'the silent follower dropped' })
  } finally { closeAll(list); gw.stop() }
})

test('a follower that closes releases its tab lock; a closed leader does too', async () => {
  const gw = new FakeGateway()
  const locks = new FakeLocks()
  const list = fakeTabs(3, { gw, locks })
  try {
    await settled(list)
    const tabLocks = () => [...locks.held.keys()].filter(k => k.includes(':tab:'))
    await until(() => tabLocks().length === 3, { what: 'three tab locks held' })
    const follower = list.find(t => t.mux.role === 'follower')
    follower.mux.close()
    await until(() => tabLocks().length === 2 && leaderOf(list).mux.tabs === 2, { what: 'the closed follower\'s lock freed and it left' })
    leaderOf(list).mux.close()
    await until(() => tabLocks().length === 1, { what: 'the closed leader\'s lock freed' })
  } finally { closeAll(list); gw.stop() }
})
