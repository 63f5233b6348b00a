import { test } from 'node:test'
import assert from 'node:assert/strict'
import Bus from '../src/bus.js'
import { until } from './fakes.js'

let seq = 0
function buses (n) {
  const name = `bustest-${process.pid}-${++seq}`
  return Array.from({ length: n }, (_, i) => {
    const got = []
    const bus = new Bus(BroadcastChannel, name, `t${i}`, m => got.push(m))
    bus.open()
    return { bus, got }
  })
}

/** Counts every message any BroadcastChannel object receives, listener or not. */
function countingChannel () {
  const counts = new Map()
  class Counting extends BroadcastChannel {
    constructor (name) {
      super(name)
      this.addEventListener('message', () => counts.set(name, (counts.get(name) ?? 0) + 1))
    }
  }
  return { Counting, counts }
}

test('a message to one tab reaches that tab only; one without `to` reaches all but the sender', async () => {
  const list = buses(3)
  try {
    list[0].bus.post({ t: 'frames', to: 't2', frames: [1] }, { keep: true })
    list[0].bus.post({ t: 'ack', to: 't2' })
    list[1].bus.post({ t: 'hb' })
    await until(() => list[2].got.length === 3 && list[0].got.length === 1, { what: 'delivery' })
    await new Promise(r => setTimeout(r, 30))
    // (no order between channels: a tab's inbox and the shared channel are two)
    assert.deepEqual(list[2].got.map(m => m.t).sort(), ['ack', 'frames', 'hb'])
    assert.deepEqual(list[1].got, [])
    assert.deepEqual(list[0].got.map(m => [m.t, m.from]), [['hb', 't1']])
    assert.equal(list[2].got.find(m => m.t === 'frames').from, 't0')
  } finally { list.forEach(x => x.bus.close()) }
})

test('only a kept handle stays open: followers writing to the leader do not wake each other', async () => {
  const { Counting, counts } = countingChannel()
  const name = `bustest-${process.pid}-${++seq}`
  const list = Array.from({ length: 4 }, (_, i) => {
    const bus = new Bus(Counting, name, `t${i}`, () => {})
    bus.open()
    return bus
  })
  try {
    // t1..t3 write to t0 (the leader) ten times each; t0 writes frames to each of them
    for (let k = 0; k < 10; k++) {
      for (const b of list.slice(1)) b.post({ t: 'ack', to: 't0' })
      for (const tab of ['t1', 't2', 't3']) list[0].post({ t: 'frames', to: tab, frames: [k] }, { keep: true })
    }
    await until(() => counts.get(`${name}#t0`) === 30 && counts.get(`${name}#t3`) === 10, { what: 'delivery' })
    await new Promise(r => setTimeout(r, 30))
    // the leader's inbox got 30 acks and nothing else heard them; each follower's inbox got
    // its 10 batches (and no other object holds a handle on it that would hear them too)
    assert.equal(counts.get(`${name}#t0`), 30)
    for (const tab of ['t1', 't2', 't3']) assert.equal(counts.get(`${name}#${tab}`), 10)
    assert.equal(counts.get(name) ?? 0, 0)
    assert.equal(list[0].outboxes.size, 3)
    list[0].forget('t1')
    assert.equal(list[0].outboxes.size, 2)
    list[0].forgetAll()
    assert.equal(list[0].outboxes.size, 0)
  } finally { list.forEach(b => b.close()) }
})

test('kept handles are bounded, least recently used closed first', () => {
  const name = `bustest-${process.pid}-${++seq}`
  const bus = new Bus(BroadcastChannel, name, 'me', () => {}, { maxOutboxes: 2 })
  bus.open()
  try {
    bus.post({ t: 'x', to: 'a' }, { keep: true })
    bus.post({ t: 'x', to: 'b' }, { keep: true })
    bus.post({ t: 'x', to: 'a' }, { keep: true })
    bus.post({ t: 'x', to: 'c' }, { keep: true })
    assert.deepEqual([...bus.outboxes.keys()], ['a', 'c'])
  } finally { bus.close() }
})
