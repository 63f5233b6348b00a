import { test } from 'node:test'
import assert from 'node:assert/strict'
import Roster from '../src/roster.js'

test('a follower that misses more than maxMissed heartbeats vanishes', () => {
  const r = new Roster('L', { maxMissed: 2 })
  r.touch('A')
  r.touch('B')
  assert.equal(r.size, 3)
  assert.deepEqual(r.beat(), [])
  r.ack('A')
  assert.deepEqual(r.beat(), [])
  assert.deepEqual(r.beat(), ['B'])
  assert.deepEqual(r.list(), ['L', 'A'])
  assert.ok(!r.has('B'))
})

test('touch reports new members; the leader is never a member', () => {
  const r = new Roster('L')
  assert.equal(r.touch('A', { visible: false }), true)
  assert.equal(r.touch('A'), false)
  assert.equal(r.members.get('A').visible, false)
  assert.equal(r.touch('L'), false)
  assert.ok(r.has('L'))
  assert.equal(r.leave('A'), true)
  assert.equal(r.size, 1)
})

test('an ack does not bring back a dropped tab: it must join again', () => {
  const r = new Roster('L', { maxMissed: 0 })
  r.touch('A')
  assert.deepEqual(r.beat(), ['A'])
  assert.equal(r.ack('A'), false)
  assert.ok(!r.has('A'))
  r.touch('A')
  assert.equal(r.ack('A'), true)
})

test('a heartbeat counts as many beats per member as its weight says', () => {
  const r = new Roster('L', { maxMissed: 4 })
  r.touch('A')
  r.touch('B')
  // A is asked every 4th beat (1 when it answered the last ask, 4 when not); B every beat
  const weight = ack => (t, missed) => t === 'B' ? 1 : !ack ? 0 : missed > 0 ? 4 : 1
  assert.deepEqual(r.beat(weight(false)), [])
  assert.equal(r.members.get('A').missed, 0)
  assert.deepEqual(r.beat(weight(true)), []) // A: 1, B: 2
  r.ack('A')
  assert.deepEqual(r.beat(weight(true)), []) // A answered: 1 again; B: 3
  assert.equal(r.members.get('A').missed, 1)
  r.ack('B')
  assert.deepEqual(r.beat(weight(true)), ['A']) // A did not: 1 + 4 > 4; B: 1
  assert.deepEqual(r.list(), ['L', 'B'])
})
