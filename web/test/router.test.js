import { test } from 'node:test'
import assert from 'node:assert/strict'
import Router from '../src/router.js'

const open = id => ({ type: 'open', id, model: 'm', messages: [{ role: 'user', content: 'hi' }] })

test('frames go only to the tab that owns the stream', () => {
  const r = new Router()
  r.add('tabA', open('tabA:1'))
  r.add('tabB', open('tabB:1'))
  assert.deepEqual(r.route({ type: 'delta', id: 'tabA:1', seq: 1, text: 'a' })?.tab, 'tabA')
  assert.deepEqual(r.route({ type: 'delta', id: 'tabB:1', seq: 1, text: 'b' })?.tab, 'tabB')
  assert.equal(r.route({ type: 'delta', id: 'tabC:1', seq: 1, text: '?' }), null)
  assert.equal(r.route({ type: 'queued', id: 'tabA:1', position: 2 }).tab, 'tabA')
})

test('a replayed frame already forwarded is dropped; lastSeq tracks the max', () => {
  const r = new Router()
  r.add('t', open('t:1'))
  assert.ok(r.route({ type: 'delta', id: 't:1', seq: 1, text: 'a' }))
  assert.ok(r.route({ type: 'delta', id: 't:1', seq: 2, text: 'b' }))
  assert.equal(r.route({ type: 'delta', id: 't:1', seq: 2, text: 'b' }), null)
  assert.equal(r.get('t:1').lastSeq, 2)
})

test('terminal frames remove the route and leave a tombstone', () => {
  const r = new Router({ tombstoneLimit: 2 })
  r.add('t', open('t:1'))
  assert.ok(r.route({ type: 'done', id: 't:1', seq: 1 }))
  assert.equal(r.has('t:1'), false)
  assert.equal(r.tombstone('t:1'), 'ended')
  assert.equal(r.route({ type: 'delta', id: 't:1', seq: 2 }), null)
  r.add('t', open('t:2')); r.route({ type: 'error', id: 't:2', code: 'internal' })
  r.add('t', open('t:3')); r.remove('t:3', 'lost')
  assert.equal(r.tombstone('t:1'), undefined, 'oldest tombstone evicted')
  assert.equal(r.tombstones.size, 2)
})

test('duplicate adds are refused', () => {
  const r = new Router()
  assert.ok(r.add('t', open('t:1')))
  assert.equal(r.add('t', open('t:1')), null)
})

test('resume lists only streams the gateway may have, after their last seq', () => {
  const r = new Router()
  r.add('a', open('a:1'), { sent: true, lastSeq: 4 })
  r.add('b', open('b:1'))
  r.add('b', open('b:2'), { sent: true })
  assert.deepEqual(r.resumeList(1), [{ id: 'a:1', after: 4 }, { id: 'b:2', after: 0 }])
  assert.deepEqual(r.pending().map(x => x.id), ['b:1'])
  assert.equal(r.pendingCount(), 1)
})

test('after welcome: unknown streams with no text are re-sent, others are lost', () => {
  const r = new Router()
  r.add('a', open('a:1'), { sent: true, lastSeq: 4 })   // resumed
  r.add('a', open('a:2'), { sent: true, lastSeq: 0 })   // never reached the gateway
  r.add('b', open('b:1'), { sent: true, lastSeq: 9 })   // gateway restarted: lost
  r.add('b', open('b:2'), { sent: true, lastSeq: 2, cancelled: true }) // resumed, cancel it
  r.resumeList(7)
  r.add('c', open('c:1'), { sent: true, lastSeq: 1 }) // reported after the hello went out
  const { lost, cancel, renew } = r.afterWelcome(7, ['a:1', 'b:2'])
  assert.deepEqual(lost.map(x => x.id), ['b:1'])
  assert.deepEqual(cancel.map(x => x.id), ['b:2'])
  assert.equal(renew, true)
  assert.equal(r.get('a:2').sent, false, 'a:2 goes out as a fresh open')
  assert.deepEqual(r.pending().map(x => x.id), ['a:2'])
  assert.equal(r.tombstone('b:1'), 'lost')
  // the gateway's own not_found for a:2 must not end the re-opened stream
  assert.equal(r.route({ type: 'error', id: 'a:2', code: 'not_found' }), null)
  assert.ok(r.has('a:2'))
  // ...but a later not_found for it is real
  assert.ok(r.route({ type: 'error', id: 'a:2', code: 'not_found' }))
})

test('frames of a cancelled stream are dropped until its terminal frame', () => {
  const r = new Router()
  r.add('t', open('t:1'), { sent: true }).cancelled = true
  assert.equal(r.route({ type: 'delta', id: 't:1', seq: 1, text: 'x' }), null)
  assert.equal(r.route({ type: 'error', id: 't:1', seq: 2, code: 'cancelled' }), null)
  assert.equal(r.has('t:1'), false)
})

test('routesOf, tabs and snapshot describe the table', () => {
  const r = new Router()
  r.add('a', open('a:1'), { sent: true, lastSeq: 3 })
  r.add('b', open('b:1'))
  assert.deepEqual(r.routesOf('a').map(x => x.id), ['a:1'])
  assert.deepEqual([...r.tabs()].sort(), ['a', 'b'])
  assert.deepEqual(r.snapshot(x => x.tab === 'a'), [{ id: 'a:1', tab: 'a', open: open('a:1'), after: 3, sent: true, cancelled: false }])
})

test('cancel, markSent: a cancelled stream is dropped from routing and the resume list keeps only sent ones', () => {
  const r = new Router()
  r.add('t', open('t:1'))
  r.add('t', open('t:2'))
  assert.deepEqual(r.resumeList(1), [])
  r.markSent('t:1')
  assert.deepEqual(r.pending().map(x => x.id), ['t:2'])
  assert.deepEqual(r.resumeList(2), [{ id: 't:1', after: 0 }])
  r.cancel('t:1')
  assert.equal(r.route({ type: 'delta', id: 't:1', seq: 1, text: 'a' }), null, 'its tab gave it up')
  r.cancel('nope') // unknown ids are ignored
  r.markSent('nope')
  assert.equal(r.size, 2)
})

test('markVanished: the route, or once ended its tombstone, remembers that the tab went silent', () => {
  const r = new Router()
  r.add('t', open('t:1'))
  r.markVanished('t:1')
  assert.ok(r.route({ type: 'done', id: 't:1', seq: 1 }))
  assert.equal(r.tombstone('t:1'), 'vanished')
  r.add('t', open('t:2'))
  r.remove('t:2', 'ended')
  r.markVanished('t:2')
  assert.equal(r.tombstone('t:2'), 'vanished')
})

test('rewind lowers a resume point, never raises it', () => {
  const r = new Router()
  r.add('t', open('t:1'), { lastSeq: 10, sent: true })
  assert.equal(r.rewind('t:1', 12), false)
  assert.equal(r.rewind('t:1', 10), false)
  assert.equal(r.rewind('t:1', 4), true)
  assert.deepEqual(r.resumeList(1), [{ id: 't:1', after: 4 }])
  assert.equal(r.rewind('nope', 1), false)
})

test('clear ends every stream and returns those whose tab must hear of it', () => {
  const r = new Router()
  r.add('a', open('a:1'))
  r.add('b', open('b:1'), { sent: true })
  r.cancel('b:1')
  const ended = r.clear('ended')
  assert.deepEqual(ended.map(x => x.id), ['a:1'], 'the cancelled stream needs no error')
  assert.equal(r.size, 0)
  assert.equal(r.tombstone('a:1'), 'ended')
  assert.equal(r.tombstone('b:1'), 'ended')
})
