// Issue 10, the idle share: the cross-tab heartbeat no longer wakes every follower in the same
// instant (the leader spreads it over its period, on the followers' inboxes), and an idle
// follower runs no timer of its own while its leader beats (its silence timer is re-armed by
// each word of the leader). What it detects, a hung leader or follower, it still detects.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import Follower from '../src/follower.js'
import { closeAll, FakeGateway, FakeLocks, fakeTabs, hang, roles, settled, until } from './fakes.js'

const sleep = ms => new Promise(r => setTimeout(r, ms))
const leaderOf = list => list.find(t => t.mux.role === 'leader')

/**
 * Records when each follower reads a heartbeat of `leader` (after the bus's own filtering), and
 * which of the leader's beats it was (`beat`, set by the test on the leader's post).
 */
function heartbeatTimes (followers, leader) {
  const times = new Map(followers.map(t => [t.mux.tabId, []]))
  for (const t of followers) {
    const inner = t.mux.bus.onMessage
    t.mux.bus.onMessage = (m) => {
      if (m.t === 'hb' && m.from === leader.mux.tabId) times.get(t.mux.tabId).push({ at: performance.now(), beat: m.beat })
      inner(m)
    }
  }
  return times
}

test('the leader\'s heartbeat reaches its followers spread over the period, each once a period', async () => {
  const P = 200
  const gw = new FakeGateway()
  const list = fakeTabs(9, { gw, tabHeartbeatMs: P, tabMaxMissed: 4, leaderMaxSilent: 4 })
  try {
    await settled(list)
    await sleep(P) // the joins' status broadcast is out
    const leader = leaderOf(list)
    const followers = list.filter(t => t !== leader)
    const beatsAt = []
    const beat = leader.mux.part.beat.bind(leader.mux.part)
    leader.mux.part.beat = () => { beatsAt.push(performance.now()); beat() }
    // each heartbeat says which beat sent it: on a loaded box a read late by a quarter period
    // falls in the next period, so the reads are told apart by beat, not by when they came
    const post = leader.mux.bus.post.bind(leader.mux.bus)
    leader.mux.bus.post = (m, o) => post(m.t === 'hb' ? { ...m, beat: beatsAt.length - 1 } : m, o)
    const times = heartbeatTimes(followers, leader)
    await until(() => beatsAt.length >= 5, { timeoutMs: 20000, what: 'five heartbeats' })
    const last = beatsAt.length - 2
    const readAll = () => [...times.values()].every(ts => ts.some(r => r.beat === last))
    await until(readAll, { timeoutMs: 20000, what: `every follower's read of beat ${last}` })
    // of each whole beat: every follower read exactly one heartbeat, and not all at once
    for (let b = 1; b <= last; b++) {
      const from = beatsAt[b]
      const offsets = []
      for (const [tab, ts] of times) {
        const ofBeat = ts.filter(r => r.beat === b)
        assert.equal(ofBeat.length, 1, `tab ${tab} read ${ofBeat.length} heartbeats of beat ${b}`)
        offsets.push(ofBeat[0].at - from)
      }
      const spread = Math.max(...offsets) - Math.min(...offsets)
      // 8 followers in 4 slots: offsets of about 0, P/4, P/2, 3P/4 (one broadcast: all within ms)
      assert.ok(spread >= P / 2, `period ${b}: heartbeats read within ${Math.round(spread)} ms of each other`)
    }
    assert.equal(leader.mux.tabs, 9, 'nobody was dropped')
  } finally { closeAll(list); gw.stop() }
})

test('an idle follower runs no timer of its own while its leader beats; a hung leader is still replaced', async () => {
  // long enough that a loaded box's timer lag (200 ms and more seen) does not add up to the
  // leaderMaxSilent periods after which a follower takes over from a live leader
  const P = 200
  // the stagger between two followers' steals: long enough that the first one's claim reaches
  // the second before it decides, on a loaded box too (with 40 ms a slow CI run saw 2 steals)
  const S = 250
  const gw = new FakeGateway()
  const locks = new FakeLocks()
  // when each follower last heard its leader, and its silent periods counted sooner than 1¼
  // periods after that: a timer of its own would run within a period of each heartbeat. A
  // heartbeat that a loaded box delivers later than that is silence, and counts (it must).
  const heardAt = new Map()
  const heard = new Map()
  const early = []
  const silentBeats = new Map()
  const noteLeader = Follower.prototype.noteLeader
  Follower.prototype.noteLeader = function (m, claim) {
    const before = this.heard
    const r = noteLeader.call(this, m, claim)
    if (this.heard !== before) {
      heardAt.set(this.tab.tabId, performance.now())
      heard.set(this.tab.tabId, (heard.get(this.tab.tabId) ?? 0) + 1)
    }
    return r
  }
  const beat = Follower.prototype.beat
  Follower.prototype.beat = function () {
    const since = performance.now() - (heardAt.get(this.tab.tabId) ?? -Infinity)
    // a timer fires no sooner than asked, give or take the event loop's 1 ms clock
    if (since < 1.25 * P - 2) early.push(`${this.tab.tabId} ${Math.round(since)} ms after its leader's word`)
    silentBeats.set(this.tab.tabId, (silentBeats.get(this.tab.tabId) ?? 0) + 1)
    return beat.call(this)
  }
  const list = fakeTabs(5, { gw, locks, tabHeartbeatMs: P, leaderMaxSilent: 4, stealStaggerMs: S })
  try {
    await settled(list)
    await sleep(2 * P)
    silentBeats.clear()
    heard.clear()
    early.length = 0
    await sleep(12 * P)
    const counted = [...silentBeats.values()].reduce((a, b) => a + b, 0)
    // with a timer of its own every period, each of the 4 followers would have run ~12, each
    // within a period of the heartbeat before
    assert.deepEqual(early, [], `${counted} silent periods counted by followers of a live leader`)
    const followers = list.filter(t => t.mux.role === 'follower')
    assert.equal(followers.length, 4)
    for (const t of followers) assert.ok((heard.get(t.mux.tabId) ?? 0) >= 4, `${t.mux.tabId} heard its leader ${heard.get(t.mux.tabId)} times in 12 periods`)
    const leader = leaderOf(list)
    const others = list.filter(t => t !== leader)
    const t0 = performance.now()
    hang(leader)
    await until(() => roles(others).includes('leader'), { timeoutMs: 20000, what: 'a new leader' })
    const after = performance.now() - t0
    // never before leaderMaxSilent periods of silence (the first from 1¼ periods after the last word)
    assert.ok(after >= 3 * P, `replaced ${Math.round(after)} ms after the leader hung`)
    await sleep(6 * P + 2 * S) // the next in line has decided, and stood down
    assert.equal(roles(others).filter(r => r === 'leader').length, 1)
    assert.equal(locks.steals, 1, `${locks.steals} steals`)
  } finally {
    Follower.prototype.beat = beat
    Follower.prototype.noteLeader = noteLeader
    closeAll(list)
    gw.stop()
  }
})
