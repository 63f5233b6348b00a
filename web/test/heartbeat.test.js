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
 * Records when each follower reads a heartbeat of `leader` (after the bus's own filtering),
 * and of which of its beats (`beat`: the leader's count when it posted it, if tagged).
 */
function heartbeatTimes (followers, leader) {
  const times = new Map(followers.map(t => [t.mux.tabId, []]))
  const beats = new Map(followers.map(t => [t.mux.tabId, []]))
  for (const t of followers) {
    const inner = t.mux.bus.onMessage
    t.mux.bus.onMessage = (m) => {
      if (m.t === 'hb' && m.from === leader.mux.tabId) {
        times.get(t.mux.tabId).push(performance.now())
        beats.get(t.mux.tabId).push([m.beat, performance.now()])
      }
      inner(m)
    }
  }
  times.beats = beats
  return times
}

/**
 * Counts, per follower, the gaps of more than 1¼ periods between two heartbeats it read while
 * `stop()` was not called yet: the leader's timers were late (a loaded box).
 */
function watchGaps (list, P) {
  const leader = leaderOf(list)
  const followers = list.filter(t => t !== leader)
  const times = heartbeatTimes(followers, leader)
  const started = performance.now()
  let stoppedAt = null
  return {
    stop () { stoppedAt = performance.now() },
    late () {
      let n = 0
      for (const ts of times.values()) {
        const seen = [started, ...ts.filter(t => t <= stoppedAt), stoppedAt]
        for (let i = 1; i < seen.length; i++) if (seen[i] - seen[i - 1] > 1.2 * P) n += Math.floor((seen[i] - seen[i - 1]) / P)
      }
      return n
    },
  }
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
    // each heartbeat tagged with the beat that sent it: on a loaded box a part sent late may
    // be read after the next beat, so a reader's period is not the beat's
    const part = leader.mux.part
    const post = leader.mux.bus.post.bind(leader.mux.bus)
    leader.mux.bus.post = (msg, how) => post(msg.t === 'hb' && msg.to ? { ...msg, beat: part.beats } : msg, how)
    const first = part.beats + 1
    const times = heartbeatTimes(followers, leader)
    await until(() => part.beats >= first + 4, { timeoutMs: 5000, what: 'five heartbeats' })
    await sleep(P) // the last beat's parts are out
    // every follower read exactly one heartbeat of each beat, and not all at once
    for (let b = first; b < first + 4; b++) {
      const offsets = []
      for (const [tab, reads] of times.beats) {
        const of = reads.filter(([beat]) => beat === b)
        assert.equal(of.length, 1, `tab ${tab} read ${of.length} heartbeats of beat ${b - first}`)
        offsets.push(of[0][1])
      }
      const spread = Math.max(...offsets) - Math.min(...offsets)
      // 8 followers in 4 slots: read about 0, P/4, P/2, 3P/4 after the beat (one broadcast: all within ms)
      assert.ok(spread >= P / 2, `beat ${b - first}: heartbeats read within ${Math.round(spread)} ms of each other`)
    }
    // and a period apart for each follower: one heartbeat a period, not several at once
    for (const [tab, reads] of times.beats) {
      const at = b => reads.find(([beat]) => beat === b)[1]
      const apart = at(first + 3) - at(first)
      assert.ok(apart >= 2 * P, `tab ${tab}: beats 0 and 3 read ${Math.round(apart)} ms apart`)
    }
    assert.equal(leader.mux.tabs, 9, 'nobody was dropped')
  } finally { closeAll(list); gw.stop() }
})

test('an idle follower runs no timer of its own while its leader beats; a hung leader is still replaced', async () => {
  const P = 60
  // the stagger between two followers' steals: long enough that the first one's claim reaches
  // the second before it decides, on a loaded box too (with 40 ms a slow CI run saw 2 steals)
  const S = 250
  const gw = new FakeGateway()
  const locks = new FakeLocks()
  const silentBeats = new Map()
  /** When each follower last heard its leader (a heartbeat, claim or pong). */
  const lastWord = new Map()
  /** Silent periods counted although the leader had spoken less than 1¼ periods before. */
  let early = 0
  const beat = Follower.prototype.beat
  Follower.prototype.beat = function () {
    silentBeats.set(this.tab.tabId, (silentBeats.get(this.tab.tabId) ?? 0) + 1)
    // 1.2: a timer may fire up to a millisecond before its time
    if (performance.now() - (lastWord.get(this.tab.tabId) ?? -Infinity) < 1.2 * P) early++
    return beat.call(this)
  }
  const noteLeader = Follower.prototype.noteLeader
  Follower.prototype.noteLeader = function (m, claim) {
    lastWord.set(this.tab.tabId, performance.now())
    return noteLeader.call(this, m, claim)
  }
  const list = fakeTabs(5, { gw, locks, tabHeartbeatMs: P, leaderMaxSilent: 4, stealStaggerMs: S })
  try {
    await settled(list)
    await sleep(2 * P)
    silentBeats.clear()
    early = 0
    const gaps = watchGaps(list, P)
    await sleep(12 * P)
    gaps.stop()
    const counted = [...silentBeats.values()].reduce((a, b) => a + b, 0)
    // with a timer of its own every period, each of the 4 followers would have run ~12, most
    // of them soon after a heartbeat; a silent period is counted only after 1¼ periods without
    // a word, so the only ones allowed are those the leader's own late timers caused (a loaded
    // box delays them by more than ¼ period now and then)
    assert.equal(early, 0, `${early} silent periods counted less than 1¼ periods after the leader spoke`)
    assert.ok(counted <= 2 + gaps.late(), `${counted} silent periods counted by followers of a live leader (its heartbeats came late ${gaps.late()} times)`)
    const leader = leaderOf(list)
    const others = list.filter(t => t !== leader)
    const t0 = performance.now()
    hang(leader)
    await until(() => roles(others).includes('leader'), { timeoutMs: 3000, what: 'a new leader' })
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
